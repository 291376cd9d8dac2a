"""The `caft_jax` lm-eval model type against lm-eval's own `hf` backend on the same weights, offline.

Local task YAMLs over JSONL files this test writes (no hub): a multiple-choice task (loglikelihood), a perplexity task
(loglikelihood_rolling) and a generation task (generate_until), on a tiny llama with an adapter (hf: peft=DIR), and a
multiple-choice task on SmolLM2-135M-Instruct (the hf backend reads our merged HF export of the GGUF).
"""

from __future__ import annotations

import json

import lm_eval
import numpy as np
import pytest
from hf_models import save_chat_model_with_adapter

import caft_jax.harness  # registers the caft_jax model type

QUESTIONS = [
    ("Hello world, how", [" are", " is", " world"], 0),
    ("I am fine, thank", [" you", " me"], 0),
    ("import os\nprint", ["(1)", "(2)", " os"], 0),
    ("Answer:", [" A", " B"], 1),
    ("how are you? I am", [" fine", " world", " thank"], 0),
    ("print(1)", ["\n", " A"], 0),
]
TEXTS = ["Hello world, how are you? I am fine, thank you.", "import os\nprint(1)\n" * 3, "Answer: A"]
PROMPTS = ["Hello world,", "I am", "import os\n", "Answer:"]


def write_tasks(root, smol: bool = False) -> str:
    """Task YAMLs + data in root/tasks; returns the include path."""
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)

    def task(name, rows, body):
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            + body
        )

    mc_rows = [{"question": q, "choices": c, "label": label} for q, c, label in QUESTIONS]
    mc = 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
    mc += 'doc_to_target: "{{label}}"\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n'
    task("tiny_mc", mc_rows, mc)
    if smol:
        return str(tasks)
    rolling = 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    rolling += "metric_list:\n  - metric: word_perplexity\n"
    task("tiny_rolling", [{"text": t} for t in TEXTS], rolling)
    gen = 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{prompt}}"\n'
    gen += 'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 6\n  do_sample: false\n'
    gen += "metric_list:\n  - metric: exact_match\n"
    task("tiny_gen", [{"prompt": p} for p in PROMPTS], gen)
    return str(tasks)


def evaluate(model: str, model_args: str, tasks: list[str], include_path: str) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, batch_size=4, log_samples=True, device="cpu",
        task_manager=TaskManager(include_path=include_path, include_defaults=False),
    )  # fmt: skip


def responses(results: dict, task: str) -> list:
    """Per document (in doc order), the raw responses of its requests."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, adapter dir, spec file, include path)."""
    root = tmp_path_factory.mktemp("harness")
    model_dir, adapter, spec = save_chat_model_with_adapter(root)
    return str(model_dir), str(adapter), str(spec), write_tasks(root)


def assert_same(ours: dict, ref: dict, tasks: list[str]) -> None:
    for task in tasks:
        a, b = responses(ours, task), responses(ref, task)
        assert len(a) == len(b) > 0
        for doc_a, doc_b in zip(a, b, strict=True):
            if isinstance(doc_b[0], str):  # generate_until: the same text
                assert doc_a == doc_b, task
            else:  # loglikelihood (ll, is_greedy) or rolling ll
                ll_a = [x[0] if isinstance(x, (list, tuple)) else x for x in doc_a]
                ll_b = [x[0] if isinstance(x, (list, tuple)) else x for x in doc_b]
                np.testing.assert_allclose(ll_a, ll_b, atol=1e-4, rtol=0, err_msg=task)
                if isinstance(doc_b[0], (list, tuple)):
                    assert [x[1] for x in doc_a] == [x[1] for x in doc_b], task
        # Accuracies are compared to 1e-4; perplexities (exp of a mean NLL, ~3e5 for the random tiny model) to a
        # relative 1e-5, a 1e-5 difference in NLL per word: the per-document log-likelihoods above already agree to
        # 1e-4, and 3.5e-7 relative was the difference between two CPU hosts' float rounding.
        for metric, value in ref["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, abs=1e-4, rel=1e-5), (task, metric)


def test_every_request_type_equals_the_hf_backend_with_and_without_adapter(tiny):
    model_dir, adapter, spec, include = tiny
    tasks = ["tiny_mc", "tiny_rolling", "tiny_gen"]
    for ours_args, ref_args in (
        (f"pretrained={model_dir}", f"pretrained={model_dir},dtype=float32"),
        (f"pretrained={model_dir},adapter={adapter}", f"pretrained={model_dir},dtype=float32,peft={adapter}"),
    ):
        ours = evaluate("caft_jax", ours_args, tasks, include)
        ref = evaluate("hf", ref_args, tasks, include)
        assert_same(ours, ref, tasks)
    plain = responses(evaluate("caft_jax", f"pretrained={model_dir}", ["tiny_mc"], include), "tiny_mc")
    ablated = responses(evaluate("caft_jax", f"pretrained={model_dir},intervention={spec}", ["tiny_mc"], include),
                        "tiny_mc")  # fmt: skip
    assert not np.allclose([x[0] for d in plain for x in d], [x[0] for d in ablated for x in d])


def test_smollm2_multiple_choice_equals_the_hf_backend(smollm2_path, tmp_path):
    from caft_jax import load_model, load_tokenizer
    from caft_jax.export import export_merged

    tokenizer = load_tokenizer(smollm2_path)
    hf_dir = export_merged(load_model(smollm2_path), None, None, tmp_path / "smollm2_hf", tokenizer=tokenizer)
    include = write_tasks(tmp_path, smol=True)
    ours = evaluate("caft_jax", f"pretrained={hf_dir}", ["tiny_mc"], include)
    ref = evaluate("hf", f"pretrained={hf_dir},dtype=float32", ["tiny_mc"], include)
    assert_same(ours, ref, ["tiny_mc"])


def test_bad_model_args_are_clear_errors(tiny):
    from caft_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="pretrained=PATH"):
        caft_jax.harness.CaftLM()
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        caft_jax.harness.CaftLM(pretrained=tiny[0], batch_size="auto")
    with pytest.raises(ConfigError, match="not a boolean"):
        caft_jax.harness.CaftLM(pretrained=tiny[0], add_bos_token="maybe")


def test_caft_lm_eval_command_runs_lm_evals_cli(tiny, tmp_path, capsys):
    from caft_jax.cli.main import main

    model_dir, _, _, include = tiny
    argv = ["lm-eval", "run", "--model", "caft_jax", "--model_args", f"pretrained={model_dir}", "--tasks", "tiny_mc",
            "--include_path", include, "--output_path", str(tmp_path / "out"), "--batch_size", "4"]  # fmt: skip
    assert main(argv) == 0
    (result,) = list((tmp_path / "out").rglob("results*.json"))
    assert "acc,none" in json.loads(result.read_text())["results"]["tiny_mc"]
    # lm-eval's refusals and ours are one line and exit 2
    bad_task = ["lm-eval", "run", "--model", "caft_jax", "--model_args", f"pretrained={model_dir}", "--tasks",
                "no_such_task", "--include_path", include]  # fmt: skip
    assert main(bad_task) == 2
    bad_path = [*argv[:4], "--model_args", f"pretrained={tmp_path / 'missing'}", *argv[6:]]
    assert main(bad_path) == 2
    err = capsys.readouterr().err
    assert "refused the run: Tasks not found" in err and "does not exist" in err and "Traceback" not in err
