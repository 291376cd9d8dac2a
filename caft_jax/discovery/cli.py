"""`python -m caft_jax.discover COMMAND`: direction discovery from the command line.

Each command writes into ``--out-dir`` (created if needed) and prints what it wrote; it refuses to replace a file of
a previous command there unless ``--overwrite`` is given (so pca, display and select can share one folder). Every
input (layer indices, files) is checked against the model's config before its weights are read.

  pca      PCA of (fine-tuned - base) activations on the same tokens  -> pca.safetensors
  sae      SAE latents ranked by attribution or by fine-tuned minus base activations -> sae_ranking.json
  concept  supervised concept directions (class mean / LEACE / INLP) from labelled prompts -> ablation_spec.safetensors
  display  max/min-activating contexts of PCs or SAE latents over a text corpus -> displays.html + displays.json
  select   an ablation spec from a selection file or a baseline (top-k, random, random orthonormal) of PCs or of
           the latents of an SAE ranking
  train-sae  BatchTopK SAEs trained on a corpus's residual stream -> layer_L/ae.pt + config.json (the format `sae`
           reads), sae_report.json (explained variance, L0, dead latents on held-out text) and sae_training.png
  check    erasure check of an ablation spec: a fresh probe for the unwanted concept on ablated activations
  persona  persona-vector directions: mean activations of the model's answers under a trait-eliciting minus a
           trait-suppressing system prompt (response / prompt / last-prompt-token averages) -> persona.safetensors
  screen   training records ranked by their projection on a spec direction -> screening.jsonl / .png, and
           kept.jsonl without the top --drop-top fraction (train on it with data.train=.../kept.jsonl)
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from caft_jax.batching import Bucketer
from caft_jax.cli.handler import guarded
from caft_jax.discovery.cli_args import (
    adapter_of,
    checked_layers,
    claim_outputs,
    layer_list,
    model_and_tokenizer,
    training_batches,
    tuned_model,
)
from caft_jax.discovery.cli_sae import add_sae_parsers, display_latents, select_latents
from caft_jax.errors import ConfigError


def _labelled_sequences(args, model, tokenizer, layers):
    """Activations [n_seq, t, d] per layer, attention masks and labels of a {"prompt", "label"} JSONL file."""
    from caft_jax import data
    from caft_jax.discovery.capture import capture_sequences

    records = [json.loads(line) for line in open(args.labelled) if line.strip()]
    if not records or any("prompt" not in r or "label" not in r for r in records):
        raise ConfigError(f"{args.labelled} must hold JSON lines with 'prompt' and 'label' fields.")
    records = records[: args.limit] if args.limit else records
    values = sorted({str(r["label"]) for r in records})
    labels = np.asarray([values.index(str(r["label"])) for r in records])
    ids = [tokenizer(r["prompt"])["input_ids"][: args.max_len] for r in records]
    length = Bucketer().length_for(max(len(i) for i in ids))
    acts, mask = capture_sequences(
        model, ids, layers, data.pad_token_id(tokenizer), site=args.site, batch_size=args.batch_size, length=length
    )
    return acts, mask, labels, values


def cmd_pca(args) -> int:
    from caft_jax.discovery.capture import pair_pca
    from caft_jax.discovery.pca import save_pca

    if not (args.adapter or args.tuned):
        raise ConfigError("pca needs the fine-tuned model: pass --adapter DIR (PEFT) or --tuned MODEL_DIR.")
    layers = checked_layers(args, layer_list(args.layers))
    out = claim_outputs(args, "pca.safetensors")
    model, tokenizer = model_and_tokenizer(args)
    tuned, settings = tuned_model(args, model)
    results = pair_pca(
        model,
        tuned,
        training_batches(args, tokenizer),
        layers,
        n_components=args.n_components,
        lora_settings=settings,
        site=args.site,
        mask=args.mask,
        exclude_first=args.exclude_sink,
    )
    meta = dict(
        model=args.model,
        adapter=args.adapter or args.tuned,
        layers=layers,
        data=args.data,
        mask=args.mask,
        site=args.site,
        token_count=int(next(iter(results.values())).n_tokens),
        exclude_sink=args.exclude_sink,
    )
    path = save_pca(out / "pca.safetensors", results, meta)
    for layer, r in results.items():
        print(
            f"layer {layer}: {r.n_tokens} tokens; explained variance ratio of the top 5: "
            f"{np.round(r.explained_variance_ratio[:5], 3).tolist()}"
        )
    print(f"wrote {path}")
    return 0


def cmd_concept(args) -> int:
    from caft_jax.discovery.select import fit_concepts, from_concepts

    layers = checked_layers(args, layer_list(args.layers))
    out = claim_outputs(args, "ablation_spec.safetensors")
    model, tokenizer = model_and_tokenizer(args)
    acts, mask, labels, values = _labelled_sequences(args, model, tokenizer, layers)
    erasures = fit_concepts(acts, labels, mask, method=args.method)
    selection = from_concepts(erasures, mean_ablation=args.mean_ablation)
    path = selection.save(
        out / "ablation_spec.safetensors", {"model": args.model, "labels": values, "data": args.labelled}
    )
    for layer, e in erasures.items():
        print(f"layer {layer}: {len(e.directions)} direction(s); outliers: {json.dumps(e.info.get('outliers', {}))}")
    print(f"wrote {path}")
    return 0


def cmd_display(args) -> int:
    from caft_jax.discovery.display_report import write_display_report
    from caft_jax.discovery.displays import top_contexts_by_layer
    from caft_jax.discovery.pca import load_pca

    if bool(args.pca) == bool(args.sae):
        raise ConfigError("display shows PCs (--pca FILE) or SAE latents (--sae LAYER=PATH ... --ranking F); give one.")
    if args.sae:
        return display_latents(args)
    results, _ = load_pca(args.pca)
    layers = layer_list(args.layers) if args.layers else sorted(results)
    missing = sorted(set(layers) - set(results))
    if missing:
        raise ConfigError(f"{args.pca} has no PCs at layers {missing} (it has {sorted(results)}); fix --layers.")
    checked_layers(args, layers)
    out = claim_outputs(args, "displays.html", "displays.json")
    model, tokenizer = model_and_tokenizer(args)
    features = {layer: results[layer].components[: args.n_features] for layer in layers}
    scores = {layer: results[layer].explained_variance_ratio[: args.n_features] for layer in layers}
    displays = top_contexts_by_layer(
        model,
        tokenizer,
        args.corpus,
        features,
        k=args.k,
        window=args.window,
        site=args.site,
        scores=scores,
        score_name="explained variance ratio",
        max_texts=args.limit or None,
    )
    paths = write_display_report(displays, out, title=f"PCs of {args.pca}")
    print(f"wrote {paths['html']} and {paths['json']}")
    return 0


def cmd_select(args) -> int:
    from caft_jax.discovery import select
    from caft_jax.discovery.pca import load_pca

    if bool(args.pca) == bool(args.sae):
        raise ConfigError("select chooses among PCs (--pca FILE) or SAE latents (--sae LAYER=PATH ...); give one.")
    claim_outputs(args, args.name, create=False)  # refuse an existing output before any work; create it after
    if args.sae:
        chosen = select_latents(args)
        path = chosen.save(claim_outputs(args, args.name) / args.name)
        print(f"wrote {path} ({chosen.counts()} SAE decoder directions per layer)")
        return 0
    pcs = load_pca(args.pca)
    if args.selection:
        chosen = select.from_selection_file(pcs, select.read_selection(args.selection))
    elif args.top_k:
        chosen = select.top_k_pcs(pcs, args.top_k, layers=layer_list(args.layers) if args.layers else None)
    elif args.random_like:
        chosen = select.random_pcs_like(pcs, select.read_selection(args.random_like), seed=args.seed)
    elif args.random_orthonormal:
        counts = select.read_selection(args.random_orthonormal)
        d_model = next(iter(pcs[0].values())).components.shape[1]
        chosen = select.random_orthonormal(d_model, {k: len(v) for k, v in counts.items()}, seed=args.seed)
    elif args.autointerp:
        chosen = _autointerp_selection(args, pcs)
    else:
        raise ConfigError(
            "select needs one of --selection, --top-k, --random-like, --random-orthonormal or --autointerp."
        )
    path = chosen.save(claim_outputs(args, args.name) / args.name)
    print(f"wrote {path} ({chosen.counts()} directions per layer)")
    return 0


def _autointerp_selection(args, pcs):
    """Explain and score the --displays features with an OpenAI-compatible explainer; keep those >= threshold."""
    from caft_jax.discovery import autointerp
    from caft_jax.discovery.display_report import load_display_json, with_explanations, write_display_report
    from caft_jax.jsonio import write_jsonl

    if not args.displays:
        raise ConfigError("--autointerp needs --displays (the displays.json that `discover display` wrote).")
    if args.autointerp_timeout <= 0:
        raise ConfigError(f"--autointerp-timeout must be a positive number of seconds; got {args.autointerp_timeout}.")
    out = claim_outputs(args, args.name)
    client = autointerp.autointerp_client(
        args.autointerp_base_url,
        args.autointerp_model,
        api_key_env=args.autointerp_api_key_env,
        cache_path=out / "autointerp_cache.jsonl",
        timeout=args.autointerp_timeout,
    )
    records = autointerp.autointerp_scores(
        load_display_json(args.displays), args.autointerp, client, progress=True, scoring=args.autointerp_score
    )
    write_jsonl(out / "autointerp.jsonl", records)
    features = with_explanations(load_display_json(args.displays), records)
    paths = write_display_report(features, out, title=f"PCs of {args.pca} with autointerp", name="displays_autointerp")
    scored = [r for r in records if r["score"] is not None]
    print(f"autointerp: {len(scored)} of {len(records)} feature sides scored; records in {out / 'autointerp.jsonl'}, "
          f"displays with the explanations in {paths['html']}")  # fmt: skip
    return autointerp.from_autointerp(
        pcs, records, threshold=args.threshold, rubric=args.autointerp, model=client.model
    )


def cmd_check(args) -> int:
    from caft_jax.ablation_spec import load_ablation_spec
    from caft_jax.discovery.erasure import erasure_check

    directions, means, _ = load_ablation_spec(args.spec)
    layers = checked_layers(args, sorted(directions))
    out = claim_outputs(args, "erasure_check.json")
    model, tokenizer = model_and_tokenizer(args)
    acts, mask, labels, _ = _labelled_sequences(args, model, tokenizer, layers)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(labels))
    train, test = order[: len(order) // 2], order[len(order) // 2 :]
    report = {}
    for layer in layers:
        # one pooled vector per sequence: the mean over its real tokens (the probe's view of the concept)
        pooled = (acts[layer] * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
        report[str(layer)] = erasure_check(
            pooled[train], labels[train], pooled[test], labels[test], directions[layer], means.get(layer)
        )
        r = report[str(layer)]
        print(
            f"layer {layer}: probe accuracy {r['probe_accuracy_before']:.3f} -> {r['probe_accuracy_after']:.3f} "
            f"(chance {r['chance']:.3f})"
        )
    path = out / "erasure_check.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


def cmd_persona(args) -> int:
    from caft_jax import data
    from caft_jax.ablation_spec import save_ablation_spec
    from caft_jax.discovery.persona import chat_means, load_trait, persona_directions
    from caft_jax.generate import SamplingConfig, generate
    from caft_jax.jsonio import write_jsonl

    pairs, questions = load_trait(args.trait)
    layers = checked_layers(args, layer_list(args.layers))
    out = claim_outputs(args, "persona.safetensors", "persona_answers.jsonl")
    model, tokenizer = model_and_tokenizer(args)
    lora, lora_settings = adapter_of(args, model)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=True)
    answers, chats = [], {"pos": [], "neg": []}
    for pair_index, pair in enumerate(pairs):
        for side, system in zip(("pos", "neg"), pair, strict=True):
            texts = generate(
                model, tokenizer, questions, sampling, lora=lora, lora_settings=lora_settings,
                batch_size=args.batch_size, chat=True, system=system, progress=False,
            )  # fmt: skip
            for question, result in zip(questions, texts, strict=True):
                messages = [{"role": "system", "content": system}, {"role": "user", "content": question},
                            {"role": "assistant", "content": result["text"]}]  # fmt: skip
                chats[side].append(data.tokenize_chat(tokenizer, messages, args.max_len))
                answers.append({"instruction": pair_index, "side": side, "messages": messages})
    pad_id = data.pad_token_id(tokenizer)
    means = {
        side: chat_means(
            model,
            list(data.make_batches(examples, args.batch_size, seed=0, epoch=0, pad_id=pad_id, shuffle=False)),
            layers,
            args.variant,
            lora=lora,
            lora_settings=lora_settings,
        )  # fmt: skip
        for side, examples in chats.items()
    }
    directions = persona_directions(means["pos"], means["neg"])
    norms = {str(layer): float(np.linalg.norm(d)) for layer, d in directions.items()}
    meta = {"model": args.model, "adapter": args.adapter, "trait": args.trait, "variant": args.variant,
            "chats_per_side": len(chats["pos"]), "norms": norms}  # fmt: skip
    path = save_ablation_spec(out / "persona.safetensors", directions, metadata=meta)
    write_jsonl(out / "persona_answers.jsonl", answers)
    for layer, norm in norms.items():
        print(f"layer {layer}: |mean(pos) - mean(neg)| = {norm:.4g}")
    print(f"wrote {path} and {out / 'persona_answers.jsonl'}")
    return 0


def cmd_screen(args) -> int:
    from caft_jax import data
    from caft_jax.ablation_spec import load_ablation_spec
    from caft_jax.discovery.screen import OUTPUTS, projection_scores, split_top, write_screening

    split_top(np.zeros(1), args.drop_top)  # a bad fraction fails before anything loads
    directions, _, _ = load_ablation_spec(args.spec)
    layer = args.layer if args.layer is not None else min(directions)
    if layer not in directions:
        raise ConfigError(f"{args.spec} has no direction at layer {layer} (it has {sorted(directions)}); fix --layer.")
    checked_layers(args, [layer])
    out = claim_outputs(args, *OUTPUTS)
    model, tokenizer = model_and_tokenizer(args)
    lora, lora_settings = adapter_of(args, model)
    records = data.load_chat_jsonl(args.data) if args.format == "chat" else data.load_mc_jsonl(args.data)
    records = records[: args.limit] if args.limit else records
    scores = projection_scores(
        model, training_batches(args, tokenizer), layer, directions[layer][0], site=args.site, lora=lora,
        lora_settings=lora_settings,
    )  # fmt: skip
    title = f"{pathlib.Path(args.data).name}: projection on {pathlib.Path(args.spec).name}, layer {layer}"
    paths = write_screening(out, records, scores, drop_top=args.drop_top, title=title)
    finite = scores[np.isfinite(scores)]
    print(f"{len(scores)} records, score mean {finite.mean():.4g}, max {finite.max():.4g}" if len(finite) else
          f"{len(scores)} records, none with a response token")  # fmt: skip
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def build_parser(prog: str = "python -m caft_jax.discover") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, model=True):
        if model:
            p.add_argument("--model", required=True, help="base model: HF directory or .gguf")
            p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        p.add_argument("--out-dir", required=True)
        p.add_argument("--overwrite", action="store_true", help="replace this command's files in --out-dir")
        p.add_argument("--site", default="resid_post", choices=["resid_post", "resid_mid"])
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-len", type=int, default=512)
        p.add_argument("--limit", type=int, default=0, help="use only the first N records (0 = all)")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("pca", help="PCA of fine-tuned minus base activations")
    common(p)
    p.add_argument("--adapter", help="PEFT adapter of the fine-tuned model")
    p.add_argument("--tuned", help="or: the fine-tuned model directory")
    p.add_argument("--data", required=True, help="chat or multiple-choice JSONL")
    p.add_argument("--format", default="chat", choices=["chat", "mc"])
    p.add_argument("--layers", required=True, help="comma-separated, e.g. 12,32,50")
    p.add_argument("--mask", default="answer", choices=["answer", "nonpad"])
    p.add_argument("--n-components", type=int, default=20)
    p.add_argument("--exclude-sink", action="store_true", help="leave out each sequence's first token")
    p.set_defaults(run=cmd_pca)

    add_sae_parsers(sub, common)

    p = sub.add_parser("concept", help="supervised concept directions from labelled prompts")
    common(p)
    p.add_argument("--labelled", required=True, help='JSONL of {"prompt": ..., "label": ...}')
    p.add_argument("--layers", required=True)
    p.add_argument("--method", default="leace", choices=["class_mean", "leace", "inlp"])
    p.add_argument("--mean-ablation", action="store_true", help="store per-layer means (mean-ablation)")
    p.set_defaults(run=cmd_concept)

    p = sub.add_parser("display", help="max/min-activating contexts of PCs")
    common(p)
    p.add_argument("--pca", help="pca.safetensors from the pca command")
    p.add_argument("--sae", action="append", help="or: SAE latents, LAYER=PATH (repeat), with --ranking")
    p.add_argument("--ranking", help="with --sae: the sae_ranking.json whose first --n-features latents to show")
    p.add_argument("--corpus", required=True, help="text or JSONL corpus")
    p.add_argument("--layers", default="")
    p.add_argument("--n-features", type=int, default=20)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--window", type=int, default=16)
    p.set_defaults(run=cmd_display)

    p = sub.add_parser("select", help="write an ablation spec")
    common(p, model=False)
    p.add_argument("--pca", help="choose among the PCs of this pca.safetensors")
    p.add_argument("--sae", action="append", help="or: among the latents of these SAEs, LAYER=PATH; repeat")
    p.add_argument("--ranking", help="with --sae: the sae_ranking.json of `discover sae` (--top-k, --random-like)")
    p.add_argument("--selection", help='JSON {"layer": [ids]} written by a person')
    p.add_argument("--top-k", type=int, default=0, help="baseline: top-k PCs per layer (with --sae: of the ranking)")
    p.add_argument("--layers", default="")
    p.add_argument("--random-like", help="baseline: random PCs with the counts of this selection file")
    p.add_argument("--random-orthonormal", help="baseline: random orthonormal vectors with these counts")
    p.add_argument("--autointerp", metavar="RUBRIC", help="LLM autointerp: keep PCs whose explanation scores >= "
                   "--threshold for relevance to RUBRIC (the concept to remove)")  # fmt: skip
    p.add_argument("--displays", help="displays.json of `discover display` (the contexts the explainer reads)")
    p.add_argument("--threshold", type=float, default=70.0, help="autointerp score to keep a PC (authors: 70 or 90)")
    p.add_argument("--autointerp-base-url", help="OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (caft serve)")
    p.add_argument("--autointerp-model", help="explainer model name (default: $CAFT_AUTOINTERP_MODEL or gpt-4.1-mini)")
    p.add_argument("--autointerp-api-key-env", default="OPENAI_API_KEY", help="env variable holding the API key")
    p.add_argument("--autointerp-timeout", type=float, default=60.0, help="seconds per request (a local explainer "
                   "on a CPU batches many 200-token explanations into one call: give it minutes)")  # fmt: skip
    p.add_argument("--autointerp-score", default="logprob", choices=["logprob", "text"],
                   help="text: the number the explainer writes (digit-splitting tokenizers, e.g. SmolLM2)")  # fmt: skip
    p.add_argument("--name", default="ablation_spec.safetensors")
    p.set_defaults(run=cmd_select)

    p = sub.add_parser("check", help="erasure check of an ablation spec")
    common(p)
    p.add_argument("--spec", required=True)
    p.add_argument("--labelled", required=True, help='JSONL of {"prompt": ..., "label": ...}')
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("persona", help="persona-vector directions from contrasting system prompts")
    common(p)
    p.add_argument("--trait", required=True, help="YAML/JSON: instruction [{pos, neg}], questions [...]")
    p.add_argument("--layers", required=True, help="comma-separated, e.g. 10,20")
    p.add_argument("--variant", default="response", choices=["response", "prompt", "last_prompt"])
    p.add_argument("--adapter", help="a PEFT adapter on the model (e.g. a fine-tune's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy answer length")
    p.set_defaults(run=cmd_persona)

    p = sub.add_parser("screen", help="rank training records by their projection on a direction")
    common(p)
    p.add_argument("--spec", required=True, help="directions file (the first direction of --layer is used)")
    p.add_argument("--layer", type=int, help="the spec layer to project at (default: its first)")
    p.add_argument("--adapter", help="score with this PEFT adapter on the model (e.g. a fine-tune's)")
    p.add_argument("--data", required=True, help="chat or multiple-choice JSONL (the training file)")
    p.add_argument("--format", default="chat", choices=["chat", "mc"])
    p.add_argument("--drop-top", type=float, default=0.0, help="write kept.jsonl without this top fraction")
    p.set_defaults(run=cmd_screen)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m caft_jax.discover") -> int:
    args = build_parser(prog).parse_args(argv)
    return guarded(lambda: args.run(args))
