"""`eval.py em`: emergent-misalignment evaluation (sample answers to the EM questions, judge them, aggregate).

    python eval.py em --model PATH [--adapter DIR] [--ablate SPEC] --questions first_plot_questions.yaml \\
        [--samples 100] [--judge-model gpt-4.1-2025-04-14] [--judge-base-url URL] \\
        [--judge-api-key-env OPENAI_API_KEY] [--out-dir DIR]

Writes to --out-dir: answers.jsonl and scores.jsonl (appended as they come; a rerun with --resume continues),
judge_cache.jsonl, manifest.json (the settings, the model's fingerprint and the input files' content hashes; a
directory holding a run is used again only with --resume, which must match it, or --overwrite), records.jsonl
(answers with their scores), results.json and results.csv (per question and pooled: misaligned % of coherent
answers, misaligned % of all answers, coherent %). The judge API key is read from an environment variable only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from caft_jax.errors import CaftError
from caft_jax.jsonio import write_jsonl

DEFAULT_JUDGE = "gpt-4.1-2025-04-14"


# ---------------------------------------------------------------------------------------------------- shared helpers


def add_sampling_arguments(parser: argparse.ArgumentParser, *, batch_size: int = 16) -> None:
    g = parser.add_argument_group("sampling (paper: temperature 1, top_p 1, 600 tokens)")
    g.add_argument("--max-new-tokens", type=int, default=600, help="answer length cap")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=batch_size, help="rows per jitted generation call")
    g.add_argument(
        "--chunk-size", type=int, default=None, help="answers sampled between saves (default: 4 x --batch-size)"
    )


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("judge (an OpenAI-compatible chat API)")
    g.add_argument("--judge-model", default=DEFAULT_JUDGE, help="judge model name")
    g.add_argument(
        "--judge-base-url", default=None, help="API base URL, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)"
    )
    g.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
        help="name of the environment variable holding the judge API key (the key itself is never an argument)",
    )
    g.add_argument(
        "--judge-score",
        default="logprob",
        choices=["logprob", "text"],
        help="logprob: the authors' probability-weighted number over the first token's top logprobs; text: the "
        "number the judge writes (greedy, 4 tokens), for judges whose tokenizer splits numbers into digits (SmolLM2)",
    )
    g.add_argument("--judge-concurrency", type=int, default=8, help="judge requests in flight at once")
    g.add_argument("--judge-max-retries", type=int, default=5, help="retries on 429/5xx/connection errors")
    g.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")


def add_output_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out-dir", default=default_out, help="results directory (must be empty or absent)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the evaluation in --out-dir (same settings, model and files)"
    )
    parser.add_argument("--overwrite", action="store_true", help="delete what --out-dir holds and start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def mostly_unreadable(overall: dict) -> bool:
    """More than half of the judge's answers had no readable score: a rate would describe the judge, not the model."""
    return bool(overall["n"]) and overall["n_unreadable"] * 2 > overall["n"]


def withhold_rates(overall: dict) -> dict:
    """``overall`` with every percentage and mean score set to None when the judge's scores are mostly unreadable
    (the counts stay: they say how many answers were read)."""
    if not mostly_unreadable(overall):
        return overall
    withheld = lambda key: key.endswith("_pct") or "_pct_" in key or key.startswith("mean_")  # noqa: E731
    return {key: None if withheld(key) else value for key, value in overall.items()}


def report_unreadable(overall: dict, scoring: str = "logprob") -> None:
    """Warn about judge answers without a readable score; fail when they are most of the answers (the rates in
    results.json are then null)."""
    n, bad = overall["n"], overall["n_unreadable"]
    if mostly_unreadable(overall):
        why = (
            "its reply held no number from 0 to 100"
            if scoring == "text"
            else "no number tokens among its top logprobs, or no logprobs at all"
        )
        fix = "a stronger judge model" if scoring == "text" else "a judge model that returns top_logprobs"
        raise CaftError(
            f"the judge's scores could not be read for {bad} of {n} answers ({why}), so no rate is reported (the "
            f"answers and judge replies are saved in records.jsonl); use {fix}."
        )
    if bad:
        print(
            f"warning: {bad} of {n} judge answers had no readable score; they count as neither coherent nor "
            "misaligned (see records.jsonl).",
            file=sys.stderr,
        )


def judge_api_key(args: argparse.Namespace) -> str:
    """The key from the environment variable named by --judge-api-key-env ('' allowed for a local --judge-base-url)."""
    name = args.judge_api_key_env
    key = os.environ.get(name, "")
    if not key and not args.judge_base_url:
        raise CaftError(
            f"The environment variable {name} holding the judge API key is not set; export it, or point "
            "--judge-base-url at a local server that needs no key."
        )
    return key


def judge_settings(args: argparse.Namespace) -> dict:
    """The judge's part of the manifest (the score form only when not the authors', so older runs still resume)."""
    settings = {"judge_model": args.judge_model, "judge_base_url": args.judge_base_url}
    if args.judge_score != "logprob":
        settings["judge_score"] = args.judge_score
    return settings


def make_client(args: argparse.Namespace, out_dir: Path):
    from caft_jax.llm_client import ChatClient

    return ChatClient(
        args.judge_base_url,
        args.judge_model,
        api_key=judge_api_key(args),
        max_concurrency=args.judge_concurrency,
        max_retries=args.judge_max_retries,
        timeout=args.judge_timeout,
        cache_path=out_dir / "judge_cache.jsonl",
    )


def sampling_settings(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def model_settings(args: argparse.Namespace) -> dict:
    def absolute(p):
        return None if p is None else str(Path(p).resolve())

    return {
        "model": absolute(args.model),
        "adapter": absolute(getattr(args, "adapter", None)),
        "ablate": absolute(getattr(args, "ablate", None)),
        "ablate_site": getattr(args, "ablate_site", "resid_post"),
        "mean_ablation": not getattr(args, "no_mean_ablation", False),
        "dtype": getattr(args, "dtype", "float32"),
    }


def open_out_dir(args: argparse.Namespace, settings: dict, inputs: dict[str, str]) -> Path:
    """The results directory under the run-directory contract (caft_jax.rundir): a directory holding another run is
    refused unless --resume (whose manifest must match: settings, model and adapter fingerprints, the content of
    every input file) or --overwrite."""
    from caft_jax import rundir

    out_dir = Path(args.out_dir)
    adapter = getattr(args, "adapter", None)
    recipe = {**settings, "adapter_fingerprint": rundir.model_fingerprint(adapter)["fingerprint"] if adapter else None}
    inputs = {**inputs, "ablate": getattr(args, "ablate", None) or ""}
    # `eval.py judge` measures the judge itself: it has no local model, and the judge's name identifies it
    model = getattr(args, "model", None) or args.judge_model
    manifest = rundir.build_manifest(recipe, model, inputs=inputs)
    rundir.prepare(out_dir, resume=args.resume, overwrite=args.overwrite)
    if args.resume:
        rundir.check_resume(out_dir, manifest)
    rundir.write_manifest(out_dir, manifest)
    return out_dir


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def load_model_sampler(args: argparse.Namespace):
    """Load the model (+ adapter, + test-time ablation) and wrap it as an `evaluate_em` sampler."""
    from caft_jax.cli.common import load_args
    from caft_jax.evaluate_em import model_sampler
    from caft_jax.generate import SamplingConfig

    model, tokenizer, lora, lora_settings, projector = load_args(args)
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        greedy=args.temperature == 0,
        seed=args.seed,
    )
    return model_sampler(
        model,
        tokenizer,
        cfg,
        lora=lora,
        lora_settings=lora_settings,
        projector=projector,
        batch_size=args.batch_size,
        progress=False,
    )


def chunk_size(args: argparse.Namespace) -> int:
    n = args.chunk_size if args.chunk_size is not None else 4 * args.batch_size
    if n < 1:
        raise CaftError(f"--chunk-size must be at least 1, got {n}.")
    return n


def fmt_pct(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


# ---------------------------------------------------------------------------------------------------- em


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from caft_jax.cli.common import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--questions", required=True, help="question YAML (first_plot_questions.yaml format)")
    parser.add_argument(
        "--samples", type=int, default=None, help="answers per question (default: the YAML's samples_per_paraphrase)"
    )
    parser.add_argument(
        "--no-system-prompts",
        action="store_true",
        help="ignore the questions' system prompts (the original open_models code never sent them)",
    )
    add_sampling_arguments(parser)
    add_judge_arguments(parser)
    add_output_arguments(parser, "results/em")


def execute(args: argparse.Namespace, sampler=None) -> dict:
    """The evaluation proper: opens --out-dir, then samples with ``sampler`` (default: the model's, loaded only
    after every input and the directory were checked; tests pass a fake). Returns the results."""
    from caft_jax.em_questions import load_questions
    from caft_jax.evaluate_em import run_em_eval

    questions = load_questions(args.questions)
    if args.samples is not None and args.samples < 1:
        raise CaftError(f"--samples must be at least 1, got {args.samples}.")
    settings = {
        "task": "em",
        **model_settings(args),
        "questions": str(Path(args.questions).resolve()),
        "samples": args.samples,
        "system_prompts": not args.no_system_prompts,
        **sampling_settings(args),
        **judge_settings(args),
    }
    judge_api_key(args)
    chunk = chunk_size(args)
    out_dir = open_out_dir(args, settings, {"questions": args.questions})
    res = run_em_eval(
        questions,
        sampler or load_model_sampler(args),
        make_client(args, out_dir),
        out_dir,
        samples=args.samples,
        use_system=not args.no_system_prompts,
        chunk_size=chunk,
        progress=not args.no_progress,
        scoring=args.judge_score,
    )
    per_question = {q: withhold_rates(m) for q, m in res["per_question"].items()}
    results = {"settings": settings, "overall": withhold_rates(res["overall"]), "per_question": per_question}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    rows = [{"question_id": q, **m} for q, m in per_question.items()]
    rows.append({"question_id": "ALL", **results["overall"]})
    write_csv(out_dir / "results.csv", rows)
    write_jsonl(out_dir / "records.jsonl", res["records"])
    return results


def run(args: argparse.Namespace) -> int:
    results = execute(args)
    o = results["overall"]
    report_unreadable(o, args.judge_score)
    print(
        f"{o['n']} answers: misaligned {fmt_pct(o['misaligned_pct_of_coherent'])}% of coherent, "
        f"{fmt_pct(o['misaligned_pct_of_total'])}% of all; coherent {fmt_pct(o['coherent_pct'])}%  "
        f"-> {Path(args.out_dir) / 'results.json'}"
    )
    return 0
