"""The run contract of every command: one `caft` face, and bad input that fails with one line, exit 2 and nothing
on disk touched, checked before any model weights are read.

The "before any weights are read" cases use a model directory whose weights file is garbage: if the command got as
far as loading the model, the error would name the weights instead of the real problem.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from fake_openai import FakeOpenAI
from hf_models import save_chat_model, write_chats

from caft_jax.cli import main as caft
from caft_jax.cli import train as train_cli

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model dir, model dir with unreadable weights, chat data) for a tiny llama."""
    root = tmp_path_factory.mktemp("contract")
    model = save_chat_model(root / "model")
    broken = root / "broken_weights"
    shutil.copytree(model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    data = write_chats(root / "train.jsonl", 8, user="Hello {i}")
    return root, model, broken, data


def run_train(capsys, model, data, out, *extra) -> tuple[int, str]:
    code = train_cli.main([f"model={model}", f"data.train={data}", f"output_dir={out}", "max_steps=1", *extra])
    return code, capsys.readouterr().err


def test_caft_lists_its_commands_and_refuses_unknown_ones(capsys):
    assert caft.main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in ("train", "eval", "discover", "tasks", "pipeline", "aot"))
    assert caft.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_caft_console_script_runs_each_command():
    """The installed `caft` script (pyproject [project.scripts]) dispatches to the same mains."""
    exe = shutil.which("caft", path=os.path.dirname(sys.executable))
    assert exe, "the caft console script is not installed; reinstall the package (pip install -e .)"
    for command in ("train", "eval", "discover", "tasks", "pipeline", "serve", "aot"):
        proc = subprocess.run([exe, command, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and f"caft {command}" in proc.stdout, (command, proc.stderr[-1000:])
    proc = subprocess.run([exe, "train", "batch_size=two"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "batch_size must be an integer" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=two", "batch_size must be an integer, got 'two'"),
        ("remat=sometimes", "remat must be one of none, full, dots"),
        ("export=onnx", "export must be one of peft, merged, both, none"),
        ("dtype=float16", "dtype must be one of float32, bfloat16"),
        ("optim.betas=[0.9]", "optim.betas must be a list of 2 values"),
        ("lora.rank=0", "LoRA rank must be >= 1"),
        ("epochs=0", "epochs must be > 0"),
        ("data.pack=maybe", "data.pack must be true or false"),
        ("ablation.gradient=sideways", "ablation.gradient must be one of through, detached, gradient_only"),
        ("ablation.positions=answer", "ablation.positions must be one of all, prompt, response"),
    ],
)
def test_bad_recipe_values_fail_before_anything_is_written(setup, tmp_path, capsys, override, message):
    _, model, _, data = setup
    out = tmp_path / "out"
    code, err = run_train(capsys, model, data, out, override)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def spec_file(tmp_path, directions: dict) -> str:
    from caft_jax.ablation_spec import save_ablation_spec

    return str(save_ablation_spec(tmp_path / "spec.safetensors", directions))


@pytest.mark.parametrize(
    "directions, message",
    [
        ({1: np.zeros((0, 64))}, "has no direction at layer 1"),
        ({9: np.ones((1, 64))}, "directions at layer 9, but the model has layers 0..2"),
        ({1: np.ones((1, 32))}, "layer 1 has width 32, but the model's d_model is 64"),
    ],
)
def test_bad_ablation_spec_is_refused_before_the_weights_are_read(setup, tmp_path, capsys, directions, message):
    _, _, broken, data = setup
    spec = spec_file(tmp_path, directions)
    code, err = run_train(capsys, broken, data, tmp_path / "out", f"ablation.spec={spec}")
    assert code == 2 and message in err and "Traceback" not in err
    # the same spec as a test-time intervention of eval.py: refused before the weights are read too
    from caft_jax.cli import evaluate

    assert evaluate.main(["generate", "--model", str(broken), "--ablate", spec, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_spec_outside_the_recipes_layers_is_refused(setup, tmp_path, capsys):
    _, _, broken, data = setup
    spec = spec_file(tmp_path, {1: np.ones((1, 64))})
    code, err = run_train(capsys, broken, data, tmp_path / "out", f"ablation.spec={spec}", "ablation.layers=[0]")
    assert code == 2 and "directions at layers [1], but the run ablates only [0]" in err


def test_chat_data_needs_a_chat_template(setup, tmp_path, capsys):
    _, model, _, data = setup
    plain = tmp_path / "no_template"
    shutil.copytree(model, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    (plain / "model.safetensors").write_bytes(b"garbage")  # never read: the template is checked first
    code, err = run_train(capsys, plain, data, tmp_path / "out")
    assert code == 2 and "has no chat template, but data.format=chat needs one" in err


def test_truncation_that_leaves_no_trained_token(setup, tmp_path, capsys):
    _, model, broken, data = setup
    code, err = run_train(capsys, broken, data, tmp_path / "none", "data.max_len=4")
    assert code == 2 and "no record" in err and "raise data.max_len" in err
    # some records keep their answer: those train, and the others are counted
    mixed = tmp_path / "mixed.jsonl"
    long_user = "Hello " * 40
    mixed.write_text(
        data.read_text()
        + json.dumps({"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "x"}]})
        + "\n"
    )
    out = tmp_path / "kept"
    code = train_cli.main(
        [f"model={model}", f"data.train={mixed}", f"output_dir={out}", "max_steps=1", "data.max_len=48"]
    )
    assert code == 0 and "dropped 1 of 9 records" in capsys.readouterr().out


def test_batch_that_does_not_split_over_the_mesh(setup, tmp_path):
    _, _, broken, data = setup
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"model={broken}", f"data.train={data}"]
    cmd += [f"output_dir={tmp_path / 'out'}", "batch_size=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "batch_size=3 does not split over the mesh's data*fsdp=2 devices" in proc.stderr


def no_number_judge(req: dict):
    """A judge whose first token is never a number (e.g. a chat model that starts with 'Sure')."""
    return "Sure", [("Sure", math.log(0.7)), ("I", math.log(0.3))]


def test_judge_without_readable_scores_fails_and_keeps_the_answers(tmp_path, monkeypatch, capsys):
    import argparse

    from caft_jax.cli import em
    from caft_jax.cli.handler import guarded

    questions = os.path.join(ROOT, "..", "shared", "data", "emergent_misalignment", "first_plot_questions.yaml")
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    out = tmp_path / "em"
    parser = argparse.ArgumentParser()
    em.add_arguments(parser)

    class Sampler:
        def __call__(self, batch, *, seed):
            return [f"answer {seed}-{i}" for i in range(len(batch))]

    with FakeOpenAI(no_number_judge) as server:
        argv = ["--model", "unused", "--questions", questions, "--samples", "1", "--judge-base-url", server.base_url]
        args = parser.parse_args([*argv, "--judge-api-key-env", "JUDGE_KEY", "--out-dir", str(out)])
        results = em.execute(args, Sampler())
    overall = results["overall"]
    assert overall["n"] == 24 and overall["n_unreadable"] == 24
    code = guarded(lambda: em.report_unreadable(overall))
    err = capsys.readouterr().err
    assert code == 2 and "could not be read for 24 of 24 answers" in err and "no rate is reported" in err
    assert "top logprobs" in err
    assert len((out / "records.jsonl").read_text().splitlines()) == 24  # the answers are kept
    # results.json says what could not be computed: no rate, no mean score, only the counts
    saved = json.loads((out / "results.json").read_text())["overall"]
    assert saved["n"] == 24 and saved["n_unreadable"] == 24
    assert all(saved[key] is None for key in saved if "pct" in key or key.startswith("mean_"))
    code = guarded(lambda: em.report_unreadable(overall, "text"))
    assert code == 2 and "its reply held no number from 0 to 100" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- run directories


def snapshot(folder) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_eval_em_refuses_an_occupied_folder_and_a_stale_resume(setup, tmp_path, capsys):
    """`eval.py em`: a folder holding a run needs --resume (which must match the manifest, including the content of
    the question file) or --overwrite; all refused before the model's weights are read."""
    from caft_jax.cli import evaluate

    root, _, broken, _ = setup
    questions = tmp_path / "questions.yaml"
    shutil.copy(
        os.path.join(ROOT, "..", "shared", "data", "emergent_misalignment", "first_plot_questions.yaml"), questions
    )
    out = tmp_path / "em"
    argv = ["em", "--model", str(broken), "--questions", str(questions), "--judge-base-url", "http://127.0.0.1:9/v1",
            "--out-dir", str(out)]  # fmt: skip
    assert evaluate.main([*argv, "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err and not out.exists()
    (out / "answers.jsonl").parent.mkdir()
    (out / "answers.jsonl").write_text('{"answer": "kept"}\n')
    before = snapshot(out)
    assert evaluate.main(argv) == 2
    assert "already holds files of another run; pass --resume to continue it, --overwrite" in capsys.readouterr().err
    assert snapshot(out) == before
    shutil.rmtree(out)
    # a finished run, then the question file edited in place: a resume would mix answers to two question sets
    from caft_jax.cli import em

    class Sampler:
        def __call__(self, batch, *, seed):
            return [f"answer {seed}-{i}" for i in range(len(batch))]

    with FakeOpenAI(no_number_judge) as server:
        real = [*argv[1:], "--samples", "1", "--no-progress"]
        real[real.index("--judge-base-url") + 1] = server.base_url
        parser = argparse.ArgumentParser()
        em.add_arguments(parser)
        em.execute(parser.parse_args(real), Sampler())
        before = snapshot(out)
        questions.write_text(questions.read_text().replace("hey I feel bored", "hey, I feel bored", 1))
        assert evaluate.main([*argv, "--samples", "1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "the content of questions differs" in err and "Traceback" not in err
    assert snapshot(out) == before


def test_discover_refuses_to_replace_its_files_and_checks_layers_first(setup, tmp_path, capsys):
    from caft_jax.discovery import cli as discover

    root, _, broken, data = setup
    out = tmp_path / "disc"
    argv = ["pca", "--model", str(broken), "--tuned", str(broken), "--data", str(data), "--out-dir", str(out)]
    assert discover.main([*argv, "--layers", "0,7"]) == 2  # the tiny llama has 2 layers
    err = capsys.readouterr().err
    assert "layers [7] do not exist" in err and "0..2" in err and not out.exists()
    out.mkdir()
    (out / "pca.safetensors").write_bytes(b"an earlier result")
    (out / "displays.html").write_text("<html></html>")
    assert discover.main([*argv, "--layers", "0,1"]) == 2
    err = capsys.readouterr().err
    assert "already holds pca.safetensors from an earlier run; pass --overwrite" in err
    assert (out / "pca.safetensors").read_bytes() == b"an earlier result"


def test_eval_mc_and_generate_refuse_to_replace_results(setup, tmp_path, capsys):
    from caft_jax.cli import evaluate

    root, _, broken, _ = setup
    items = tmp_path / "mc.jsonl"
    items.write_text('{"prompt": "Q? A or B. Answer:", "target": " A"}\n')
    out = tmp_path / "mc"
    out.mkdir()
    (out / "mc_results.json").write_text("[]")
    assert evaluate.main(["mc", "--model", str(broken), "--data", str(items), "--out-dir", str(out)]) == 2
    assert "already holds mc_results.json" in capsys.readouterr().err and (out / "mc_results.json").read_text() == "[]"
    answers = tmp_path / "answers.jsonl"
    answers.write_text("{}\n")
    assert evaluate.main(["generate", "--model", str(broken), "--prompt", "hi", "--out", str(answers)]) == 2
    assert "already holds answers.jsonl" in capsys.readouterr().err and answers.read_text() == "{}\n"
