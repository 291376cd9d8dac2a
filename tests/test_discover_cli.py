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
