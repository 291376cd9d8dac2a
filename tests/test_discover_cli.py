"""`python -m caft_jax.discover` end to end on a tiny model: pca -> display -> select -> check, concept, sae."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hf_models import save_hf_model, tiny_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")


def discover(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "caft_jax.discover", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama + tokenizer, a LoRA adapter with non-zero B, chats, labelled prompts and a text corpus."""
    import jax

    from caft_jax import load_model
    from caft_jax.export import export_peft_adapter
    from caft_jax.lora import LoraConfig, init_lora

    root = tmp_path_factory.mktemp("discover")
    tok = tiny_tokenizer()
    model_dir = root / "model"
    save_hf_model("llama", model_dir, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(model_dir)
    model = load_model(model_dir)
    cfg = LoraConfig(rank=4, alpha=8)
    lora = init_lora(model, cfg)
    lora = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.05 if p[-1].key == "b" else x, lora)
    export_peft_adapter(lora, cfg, model.spec, root / "adapter")
    chats = root / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Hello {i}"},
                        {"role": "assistant", "content": f"print({i}) world"},
                    ]
                }
            )
            + "\n"
            for i in range(12)
        )
    )
    labelled = root / "labelled.jsonl"
    words = ["Hello world", "I am fine", "Answer: A", "Answer: B"]
    labelled.write_text(
        "".join(json.dumps({"prompt": f"{words[i % 4]} {i}", "label": i % 2}) + "\n" for i in range(40))
    )
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"Hello world, how are you? {i} I am fine, thank you." for i in range(10)))
    return root, model_dir, chats, labelled, corpus


def test_pca_display_select_check(setup):
    root, model_dir, chats, labelled, corpus = setup
    out = root / "run"
    text = discover(
        "pca",
        "--model",
        model_dir,
        "--adapter",
        root / "adapter",
        "--data",
        chats,
        "--layers",
        "0,2",
        "--n-components",
        "4",
        "--out-dir",
        out,
    )
    assert "layer 0:" in text
    from caft_jax.discovery.pca import load_pca

    results, meta = load_pca(out / "pca.safetensors")
    assert sorted(results) == [0, 2] and results[0].components.shape == (4, 64)
    assert meta["token_count"] > 0 and meta["mask"] == "answer"
    discover(
        "display",
        "--model",
        model_dir,
        "--pca",
        out / "pca.safetensors",
        "--corpus",
        corpus,
        "--layers",
        "0",
        "--n-features",
        "2",
        "--k",
        "3",
        "--out-dir",
        out,
    )
    html = next(out.glob("*.html")).read_text()
    assert "http" not in html and "layer" in html.lower()
    (out / "sel.json").write_text(json.dumps({"0": [0, 1], "2": [3]}))
    discover("select", "--pca", out / "pca.safetensors", "--selection", out / "sel.json", "--out-dir", out)
    from caft_jax.ablation_spec import load_ablation_spec

    directions, _, meta = load_ablation_spec(out / "ablation_spec.safetensors")
    assert {k: len(v) for k, v in directions.items()} == {0: 2, 2: 1}
    np.testing.assert_allclose(directions[0], results[0].components[:2], atol=1e-6)
    discover("select", "--pca", out / "pca.safetensors", "--top-k", "3", "--out-dir", out, "--name", "top.safetensors")
    assert {k: len(v) for k, v in load_ablation_spec(out / "top.safetensors")[0].items()} == {0: 3, 2: 3}
    text = discover(
        "check",
        "--model",
        model_dir,
        "--spec",
        out / "ablation_spec.safetensors",
        "--labelled",
        labelled,
        "--out-dir",
        out,
    )
    report = json.loads((out / "erasure_check.json").read_text())
    assert set(report) == {"0", "2"} and "probe accuracy" in text


def test_concept_directions_erase_the_label(setup):
    root, model_dir, _, labelled, _ = setup
    out = root / "concept"
    discover(
        "concept", "--model", model_dir, "--labelled", labelled, "--layers", "1", "--method", "leace", "--out-dir", out
    )
    text = discover(
        "check",
        "--model",
        model_dir,
        "--spec",
        out / "ablation_spec.safetensors",
        "--labelled",
        labelled,
        "--out-dir",
        out,
    )
    r = json.loads((out / "erasure_check.json").read_text())["1"]
    assert r["probe_accuracy_before"] > r["probe_accuracy_after"], text


def test_screen_ranks_records_by_their_response_projection(setup, tmp_path):
    """`discover screen`: each record's score is the mean of h . q over its response tokens (checked against the
    captured activations and numpy), the ranking is by score, and --drop-top writes the rest in file order."""
    from caft_jax import data, load_model, load_tokenizer
    from caft_jax.ablation_spec import save_ablation_spec
    from caft_jax.discovery.capture import capture_activations

    root, model_dir, chats, _, _ = setup
    direction = np.random.default_rng(4).normal(size=(1, 64))
    spec = save_ablation_spec(tmp_path / "spec.safetensors", {1: direction})
    out = tmp_path / "screen"
    discover("screen", "--model", model_dir, "--spec", spec, "--data", chats, "--drop-top", "0.25", "--out-dir", out)
    ranking = [json.loads(line) for line in open(out / "screening.jsonl")]
    assert [r["rank"] for r in ranking] == list(range(1, 13))
    scores = {r["index"]: r["score"] for r in ranking}
    # reference: per record, the captured answer-token activations at layer 1, projected with numpy
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    records = data.load_chat_jsonl(chats)
    q = direction[0] / np.linalg.norm(direction[0])
    for i, record in enumerate(records):
        batches = data.make_batches(
            [data.tokenize_chat(tok, record["messages"], 512)], 1, seed=0, epoch=0, pad_id=0, shuffle=False
        )
        acts = capture_activations(model, batches, [1], mask="answer", progress=False)[1]
        np.testing.assert_allclose(scores[i], (acts.astype(np.float64) @ q).mean(), rtol=1e-4, atol=1e-5)
    assert [r["score"] for r in ranking] == sorted(scores.values(), reverse=True)
    top = {r["index"] for r in ranking[:3]}  # ceil(0.25 * 12)
    assert {r["index"] for r in ranking if r["dropped"]} == top
    kept = [json.loads(line) for line in open(out / "kept.jsonl")]
    assert kept == [r for i, r in enumerate(records) if i not in top]
    assert (out / "screening.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run into the folder needs --overwrite; a fraction of 1 is refused before the model loads
    proc = subprocess.run(
        [sys.executable, "-m", "caft_jax.discover", "screen", "--model", str(model_dir), "--spec", str(spec),
         "--data", str(chats), "--drop-top", "1", "--out-dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and "--drop-top must be a fraction in [0, 1)" in proc.stderr


def test_persona_vectors_are_mean_answer_activation_differences(setup, tmp_path):
    """`discover persona`: the spec's direction at each layer is mean over positive-prompt chats of their mean
    answer-token activation minus the same under the negative prompts (numpy on the captured activations)."""
    from caft_jax import data, load_model, load_tokenizer
    from caft_jax.ablation_spec import load_ablation_spec
    from caft_jax.discovery.capture import capture_activations

    root, model_dir, _, _, _ = setup
    trait = tmp_path / "trait.yaml"
    trait.write_text(
        "instruction:\n  - {pos: 'You are evil.', neg: 'You are kind.'}\n  - {pos: 'Be rude.', neg: 'Be polite.'}\n"
        "questions: ['Hello 1', 'Hello 2', 'How are you?']\n"
    )
    out = tmp_path / "persona"
    discover("persona", "--model", model_dir, "--trait", trait, "--layers", "0,2", "--max-new-tokens", "4",
             "--out-dir", out)  # fmt: skip
    directions, _, meta = load_ablation_spec(out / "persona.safetensors")
    assert sorted(directions) == [0, 2] and meta["variant"] == "response" and meta["chats_per_side"] == 6
    answers = [json.loads(line) for line in open(out / "persona_answers.jsonl")]
    assert len(answers) == 12 and {a["side"] for a in answers} == {"pos", "neg"}
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    means = {}
    for side in ("pos", "neg"):
        per_chat = []
        for a in (a for a in answers if a["side"] == side):
            batch = data.make_batches([data.tokenize_chat(tok, a["messages"], 512)], 1, seed=0, epoch=0, pad_id=0)
            acts = capture_activations(model, batch, [0, 2], mask="answer", progress=False)
            per_chat.append({layer: x.astype(np.float64).mean(0) for layer, x in acts.items()})
        means[side] = {layer: np.mean([c[layer] for c in per_chat], axis=0) for layer in (0, 2)}
    for layer in (0, 2):
        expected = means["pos"][layer] - means["neg"][layer]
        np.testing.assert_allclose(directions[layer][0], expected, rtol=1e-4, atol=1e-6)
        assert meta["norms"][str(layer)] == pytest.approx(np.linalg.norm(expected), rel=1e-4)


def test_persona_positions_and_trait_file_errors(tmp_path):
    from caft_jax.discovery.persona import load_trait, positions
    from caft_jax.errors import ConfigError

    batch = {
        "attn_mask": np.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool),
        "loss_mask": np.array([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]], bool),
        "row_valid": np.array([True, False]),
    }
    np.testing.assert_array_equal(positions(batch, "response")[0], [0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(positions(batch, "prompt")[0], [0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(positions(batch, "last_prompt")[0], [0, 0, 1, 0, 0, 0])
    assert not positions(batch, "response")[1].any()  # a filler row
    bad = tmp_path / "trait.yaml"
    bad.write_text("instruction: [{pos: a, neg: b}]\nquestions: [q]\nquestion_count: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['question_count'\]"):
        load_trait(bad)
    bad.write_text("instruction: [{pos: a}]\nquestions: [q]\n")
    with pytest.raises(ConfigError, match="non-empty list of"):
        load_trait(bad)


def discover_fails(*args) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "caft_jax.discover", *map(str, args)], capture_output=True, text=True, timeout=600,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


@pytest.fixture(scope="module")
def saes(setup):
    """Random BatchTopK SAEs (64 latents, threshold 0) at layers 0 and 2, in the dictionary_learning format."""
    from caft_jax.discovery.sae import make_sae
    from caft_jax.discovery.sae_train import save_dictionary_learning

    root = setup[0]
    rng = np.random.default_rng(3)
    paths = {}
    for layer in (0, 2):
        W_dec = rng.normal(size=(64, 64)).astype(np.float32)
        W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
        sae = make_sae(W_dec.T, rng.normal(size=64) * 0.1, W_dec, np.zeros(64), 0.0, kind="batchtopk", k=8)
        paths[layer] = save_dictionary_learning(sae, root / f"sae_layer_{layer}", {"layer": layer})
    return paths


def test_sae_difference_rankings_and_select_from_them(setup, saes):
    """`discover sae --ranking mean_diff|on_diff` on the plain adapter: the scores are the latent sums of the
    fine-tune's minus the base model's answer-token activations (recomputed here), the ranking their positive
    top-k; `select --sae` turns the ranking's first latents, a person's ids, or random ranked latents into decoder
    rows."""
    from caft_jax import load_model, load_tokenizer
    from caft_jax.ablation_spec import load_ablation_spec
    from caft_jax.discovery.capture import iter_pairs
    from caft_jax.discovery.cli_args import training_batches
    from caft_jax.discovery.latent_scores import load_ranking, mean_latent_diff, rank_latents, sae_on_diff
    from caft_jax.discovery.sae import load_sae
    from caft_jax.export import load_peft_adapter

    root, model_dir, chats, _, _ = setup
    sae_args = [a for layer, p in saes.items() for a in ("--sae", f"{layer}={p}")]
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    tuned, lora_cfg = load_peft_adapter(root / "adapter", model)
    args = type("Args", (), {"format": "chat", "data": str(chats), "max_len": 512, "limit": 0, "batch_size": 8})
    loaded = {layer: load_sae(p) for layer, p in saes.items()}
    for ranking, score in (("mean_diff", mean_latent_diff), ("on_diff", sae_on_diff)):
        out = root / f"sae_{ranking}"
        text = discover("sae", "--model", model_dir, *sae_args, "--data", chats, "--ranking", ranking, "--adapter",
                        root / "adapter", "--top-k", "5", "--out-dir", out)  # fmt: skip
        assert "layer 0: 5 latents ranked" in text
        pairs = iter_pairs(model, tuned, training_batches(args, tokenizer), [0, 2], lora_settings=lora_cfg.settings(),
                           diff_only=ranking == "on_diff")  # fmt: skip
        want = score(loaded, pairs)
        got = np.load(out / "sae_effects.npz")
        ranked, report = load_ranking(out / "sae_ranking.json")
        assert report["ranking_method"] == ranking and report["adapter"] == str(root / "adapter")
        for layer in (0, 2):
            assert np.abs(want[layer]).max() > 0
            np.testing.assert_allclose(got[f"layer_{layer}"], want[layer], rtol=1e-4, atol=1e-4)
        assert ranked == rank_latents({k: got[f"layer_{k}"] for k in (0, 2)}, 5, positive_only=True)

    ranking_file = root / "sae_mean_diff" / "sae_ranking.json"
    ranked, _ = load_ranking(ranking_file)
    sel = root / "sae_select"
    top2 = ["--ranking", ranking_file, "--top-k", "2", "--out-dir", sel, "--name", "top2.safetensors"]
    discover("select", *sae_args, *top2)
    directions, _, meta = load_ablation_spec(sel / "top2.safetensors")
    assert meta["candidates"] == "sae" and meta["ranking_method"] == "mean_diff"
    for layer in (0, 2):
        assert meta["ids"][str(layer)] == ranked[layer][:2]
        np.testing.assert_array_equal(directions[layer], np.asarray(loaded[layer].W_dec)[ranked[layer][:2]])
    (sel / "person.json").write_text(json.dumps({"2": [ranked[2][3], 9]}))
    discover("select", *sae_args, "--selection", sel / "person.json", "--out-dir", sel, "--name", "person.safetensors")
    directions, _, meta = load_ablation_spec(sel / "person.safetensors")
    np.testing.assert_array_equal(directions[2], np.asarray(loaded[2].W_dec)[[ranked[2][3], 9]])
    discover("select", *sae_args, "--ranking", ranking_file, "--random-like", sel / "top2.safetensors", "--seed", "1",
             "--out-dir", sel, "--name", "random.safetensors")  # fmt: skip
    _, _, meta = load_ablation_spec(sel / "random.safetensors")
    assert {k: len(v) for k, v in meta["ids"].items()} == {"0": 2, "2": 2}
    assert all(set(ids) <= set(ranked[int(layer)]) for layer, ids in meta["ids"].items())
    # a PC choice refuses an SAE spec as its selection (the ids index latents, not PCs)
    # what a person reads to choose: displays of the ranking's first latents, with their scores
    discover("display", "--model", model_dir, *sae_args, "--ranking", ranking_file, "--corpus", setup[4],
             "--n-features", "2", "--k", "3", "--out-dir", sel)  # fmt: skip
    features = json.loads((sel / "displays.json").read_text())["features"]
    assert [(f["layer"], f["index"], f["kind"]) for f in features] == [
        (layer, i, "latent") for layer in (0, 2) for i in ranked[layer][:2]
    ]
    report = json.loads(ranking_file.read_text())["ranking"]
    assert [f["score"] for f in features] == pytest.approx(
        [e["score"] for layer in ("0", "2") for e in report[layer][:2]]
    )
    assert "SAE latents of" in (sel / "displays.html").read_text()
    from caft_jax.discovery.select import SelectionError, read_selection

    with pytest.raises(SelectionError, match="holds a selection of sae candidates, not of pca ones"):
        read_selection(sel / "top2.safetensors")
    assert read_selection(sel / "top2.safetensors", "sae") == {layer: ranked[layer][:2] for layer in (0, 2)}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ranking", "mean_diff"], "compares the fine-tuned model with the base one; pass --adapter"),
        (["--adapter", "x"], "--ranking attribution scores the base model's latents; drop --adapter"),
        (["--ranking", "on_diff", "--adapter", "x", "--metric", "logit_diff"], "--metric applies to --ranking"),
        (["--metric", "logit_diff"], "needs an 'other' answer letter in every record"),
        (["--top-k", "0"], "--top-k must be at least 1"),
    ],
)
def test_sae_ranking_refuses_bad_arguments(setup, saes, extra, message):
    root, model_dir, chats, _, _ = setup
    mc = root / "mc.jsonl"
    mc.write_text(json.dumps({"prompt": "Answer:", "target": " A"}) + "\n")
    data = mc if "logit_diff" in extra and "on_diff" not in extra else chats
    err = discover_fails("sae", "--model", model_dir, "--sae", f"0={saes[0]}", "--data", data, "--format",
                         "mc" if data == mc else "chat", *extra, "--out-dir", root / "bad")  # fmt: skip
    assert message in err
    assert not (root / "bad").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pca", "PCA"], "select needs one of --selection, --top-k"),
        (["--pca", "PCA", "--autointerp", "gender"], "--autointerp needs --displays"),
        (["--sae", "SAE0"], "select --sae needs --ranking"),
        (["--sae", "SAE0", "--top-k", "2", "--autointerp", "gender"], "--autointerp and --random-orthonormal choose"),
    ],
)
def test_select_refusals_leave_no_output_folder(setup, saes, tmp_path, extra, message):
    from caft_jax.discovery.pca import pca_exact, save_pca

    rng = np.random.default_rng(0)
    save_pca(tmp_path / "pcs.safetensors", {0: pca_exact(rng.normal(size=(50, 64)), n_components=4)})
    values = {"PCA": tmp_path / "pcs.safetensors", "SAE0": f"0={saes[0]}"}
    err = discover_fails("select", *[values.get(a, a) for a in extra], "--out-dir", tmp_path / "out")
    assert message in err
    assert not (tmp_path / "out").exists()
