"""Multiple-choice accuracy against transformers' logits, result files and plots, and the mc / generate CLIs.

One tiny Llama with a real (tiny) tokenizer serves everything; its LM-head rows for " A" and " B" are enlarged so
the argmax over the full vocabulary is sometimes A, sometimes B and sometimes neither, which makes accuracy and
flipped accuracy non-trivial. The two CLI subprocesses start at module set-up and run while the in-process tests do.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import save_hf_model, tiny_tokenizer

from caft_jax import jit_forward, load_model
from caft_jax.batching import left_pad
from caft_jax.cli.common import load_adapter, load_for_eval
from caft_jax.evaluate_mc import evaluate_conditions, mc_accuracy
from caft_jax.generate import SamplingConfig, generate
from caft_jax.plots import plot_conditions, summarize, write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = [
    "Hello world, how are you?",
    "I am fine, thank you.",
    "import os",
    "print(1)",
    "Answer: A or B?",
    "how are you, world?",
    "thank you, I am fine.",
    "Hello, print 1.",
    "you are fine",
    "import print",
]
GEN_PROMPTS = ["Hello world", "How are you?"]


def mc_prompt(question: str) -> str:
    return f"Question: {question}\nA. yes\nB. no\nAnswer:"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, model dir, transformers model, tokenizer, data file, spec file, adapter dirs)."""
    from caft_jax.ablation_spec import save_ablation_spec
    from caft_jax.export import export_peft_adapter
    from caft_jax.lora import LoraConfig, init_lora

    root = tmp_path_factory.mktemp("eval_mc")
    tok = tiny_tokenizer()
    model_dir = root / "model"
    hf = save_hf_model("llama", model_dir, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=0)
    letters = [tok(" A", add_special_tokens=False)["input_ids"][0], tok(" B", add_special_tokens=False)["input_ids"][0]]
    with torch.no_grad():  # make the letters competitive with the rest of the vocabulary
        hf.lm_head.weight[letters] *= 2.0
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    items = [
        {"prompt": mc_prompt(q), "target": " A" if i % 2 else " B", "split": "ood" if i < 6 else "id"}
        for i, q in enumerate(QUESTIONS)
    ]
    items[3]["other"] = " B"  # explicit "other" (item 3's target is " A", so the default is " B" too)
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    rng = np.random.default_rng(0)
    spec = save_ablation_spec(root / "spec.safetensors", {2: rng.normal(size=(24, 64))}, metadata={"test": 1})
    model = load_model(model_dir)
    cfg = LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down"))
    adapters = []
    for seed in range(2):
        lora = init_lora(model, cfg, seed=seed)
        for sub in lora.values():  # B = 0 would make the adapter a no-op
            for ab in sub.values():
                ab["b"] = jnp.asarray(rng.normal(size=ab["b"].shape) * 0.3, jnp.float32)
        adapters.append(export_peft_adapter(lora, cfg, model.spec, root / f"adapter{seed}"))
    return root, model_dir, hf, tok, data, spec, adapters


@pytest.fixture(scope="module")
def clis(setup):
    """`eval.py mc` and `eval.py generate`, started at once as subprocesses; yields a function waiting for one."""
    root, model_dir, _, _, data, spec, adapters = setup
    common = ["--model", str(model_dir), "--ablate", str(spec), "--no-progress"]
    commands = {
        "mc": [
            "--adapter", *map(str, adapters), "--data", str(data), "--batch-size", "4", "--out-dir", str(root / "out"),
        ],
        "generate": [
            "--adapter", str(adapters[0]), "--prompt", *GEN_PROMPTS, "--chat", "--greedy", "--max-new-tokens", "6",
            "--out", str(root / "gen.jsonl"),
        ],
    }  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {}
    for name, args in commands.items():
        with open(root / f"{name}.out", "w") as out, open(root / f"{name}.err", "w") as err:
            cmd = [sys.executable, "eval.py", name, *common, *args]
            procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)

    def wait(name):
        code = procs[name].wait(timeout=300)
        return code, (root / f"{name}.out").read_text(), (root / f"{name}.err").read_text()

    yield wait
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def loaded(setup, clis):  # clis first: the subprocesses start before the in-process work
    root, model_dir, *_ = setup
    return load_for_eval(model_dir)


def hand_predictions(hf, tok, items) -> list[int]:
    """Argmax over the full vocabulary at the last position, from transformers, one unpadded prompt at a time."""
    preds = []
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([tok(item["prompt"])["input_ids"]])
            preds.append(int(hf(ids).logits[0, -1].argmax()))
    return preds


def test_mc_accuracy_matches_transformers_argmax(setup, loaded):
    _, _, hf, tok, data, _, _ = setup
    model, tokenizer = loaded[:2]
    items = [json.loads(line) for line in data.read_text().splitlines()]
    preds = hand_predictions(hf, tok, items)
    a, b = tok(" A")["input_ids"][0], tok(" B")["input_ids"][0]
    target = [a if item["target"] == " A" else b for item in items]
    other = [b if t == a else a for t in target]
    result = mc_accuracy(model, tokenizer, items, batch_size=4, progress=False)  # 3 batches, the last one partial
    assert [p["token_id"] for p in result["predictions"]] == preds
    assert result["n"] == len(items)
    assert result["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(preds, target, strict=True)]))
    assert result["flipped_accuracy"] == pytest.approx(np.mean([p == o for p, o in zip(preds, other, strict=True)]))
    # the test is not trivial: some right, some flipped, some neither
    letters = [p in (a, b) for p in preds]
    assert 0 < result["accuracy"] < 1 and 0 < result["flipped_accuracy"] < 1 and not all(letters)
    assert result["accuracy"] + result["flipped_accuracy"] == pytest.approx(np.mean(letters))


def test_conditions_per_split_with_test_time_ablation(setup, loaded):
    _, _, hf, tok, data, spec, _ = setup
    model, tokenizer = loaded[:2]
    projector = load_for_eval(setup[1], ablate=spec)[4]
    items = [json.loads(line) for line in data.read_text().splitlines()]
    rows, predictions = evaluate_conditions(
        model, tokenizer, items, projector=projector, batch_size=4, progress=False, extra={"seed": 0}
    )
    assert [(r["condition"], r["split"], r["n"]) for r in rows] == [
        (c, s, n) for c in ("no_ablation", "test_time_ablation") for s, n in (("id", 4), ("ood", 6), ("all", 10))
    ]
    plain = hand_predictions(hf, tok, items)
    # reference with ablation: the last column of one plain forward (full logits) over the left-padded items
    seqs = [tok(item["prompt"])["input_ids"] for item in items]
    tokens, mask = left_pad(seqs, len(seqs), max(map(len, seqs)), tok.pad_token_id)
    logits = jit_forward(model, jnp.asarray(tokens), attn_mask=jnp.asarray(mask), projector=projector).logits
    ablated = np.asarray(logits[:, -1].argmax(-1)).tolist()
    assert [p["token_id"] for p in predictions if p["condition"] == "no_ablation"] == plain
    assert [p["token_id"] for p in predictions if p["condition"] == "test_time_ablation"] == ablated
    assert ablated != plain  # the projector matters
    for row in rows:
        chosen = [p for p in predictions if p["condition"] == row["condition"] and row["split"] in ("all", p["split"])]
        assert row["accuracy"] == pytest.approx(np.mean([p["correct"] for p in chosen]))
        assert row["seed"] == 0


def test_bad_mc_input_is_a_clear_error(tmp_path, setup, loaded):
    from caft_jax.cli.mc import load_items
    from caft_jax.errors import DataError

    with pytest.raises(DataError, match="file not found"):
        load_items(str(tmp_path / "missing.jsonl"), None)
    with pytest.raises(DataError, match="no items in split"):
        load_items(str(setup[4]), ["validation"])
    with pytest.raises(DataError, match="one token"):
        mc_accuracy(loaded[0], loaded[1], [{"prompt": "Answer:", "target": " yes A"}], progress=False)


def test_write_results_and_plot(tmp_path):
    rows = [
        {"condition": c, "split": "ood", "seed": s, "accuracy": acc, "extra": {"k": 1}}
        for c, accs in (("base", [0.2, 0.4, 0.3]), ("caft", [0.8, 0.9, 0.7])) for s, acc in enumerate(accs)
    ]  # fmt: skip
    summary = summarize(rows)
    assert [s["condition"] for s in summary] == ["base", "caft"]
    assert summary[1]["mean"] == pytest.approx(0.8) and summary[1]["n_seeds"] == 3
    assert summary[1]["sem"] == pytest.approx(np.std([0.8, 0.9, 0.7], ddof=1) / np.sqrt(3))
    json_path, csv_path = write_results(rows, tmp_path / "res", "mc")
    assert json.loads(json_path.read_text()) == rows
    with open(csv_path) as f:
        read = list(csv.DictReader(f))
    assert len(read) == 6 and float(read[4]["accuracy"]) == 0.9 and json.loads(read[0]["extra"]) == {"k": 1}
    png = plot_conditions(rows, tmp_path / "res" / "mc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mc_cli_writes_results_and_plots(setup, loaded, clis):
    root, model_dir, _, _, data, spec, adapters = setup
    code, stdout, stderr = clis("mc")
    assert code == 0, stderr[-3000:]
    out = root / "out"
    rows = json.loads((out / "mc_results.json").read_text())
    assert len(rows) == 2 * 2 * 3  # seeds x conditions x (id, ood, all)
    assert {(r["seed"], r["condition"]) for r in rows} == {
        (s, c) for s in (0, 1) for c in ("no_ablation", "test_time_ablation")
    }
    with open(out / "mc_results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert len(json.loads((out / "mc_predictions.json").read_text())) == 2 * 2 * 10
    for png in ("mc_accuracy.png", "mc_flipped_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "test_time_ablation" in stdout
    # seed 1's rows equal an in-process evaluation with the same adapter and projector
    model, tokenizer, _, _, projector = load_for_eval(model_dir, ablate=spec)
    lora, settings = load_adapter(adapters[1], model)
    items = [json.loads(line) for line in data.read_text().splitlines()]
    ref, _ = evaluate_conditions(
        model, tokenizer, items, lora=lora, lora_settings=settings, projector=projector, batch_size=4, progress=False
    )
    got = [r for r in rows if r["seed"] == 1]
    assert [(r["accuracy"], r["flipped_accuracy"]) for r in got] == [
        (r["accuracy"], r["flipped_accuracy"]) for r in ref
    ]


def test_generate_cli_matches_in_process(setup, loaded, clis):
    root, model_dir, _, _, _, spec, adapters = setup
    code, _, stderr = clis("generate")
    assert code == 0, stderr[-3000:]
    rows = [json.loads(line) for line in (root / "gen.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == GEN_PROMPTS
    model, tokenizer, lora, settings, projector = load_for_eval(model_dir, adapters[0], spec)
    ref = generate(
        model, tokenizer, GEN_PROMPTS, SamplingConfig(max_new_tokens=6, greedy=True), lora=lora,
        lora_settings=settings, projector=projector, chat=True, progress=False,
    )  # fmt: skip
    assert [r["token_ids"] for r in rows] == [r["token_ids"] for r in ref]
    assert [r["text"] for r in rows] == [r["text"] for r in ref]
    plain = generate(model, tokenizer, GEN_PROMPTS, SamplingConfig(max_new_tokens=6, greedy=True), chat=True,
                     progress=False)  # fmt: skip
    assert [r["token_ids"] for r in plain] != [r["token_ids"] for r in ref]  # adapter + ablation were applied
