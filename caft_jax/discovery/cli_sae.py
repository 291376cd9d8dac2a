"""The SAE commands of `python -m caft_jax.discover`: ``train-sae`` (BatchTopK SAEs on a corpus), ``sae`` (latents
ranked by attribution or by activation differences, caft_method.md 2.3-2.4) and the SAE side of ``select`` (decoder
rows of ranked or chosen latents as an ablation spec)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from caft_jax.discovery.cli_args import (
    checked_layers,
    claim_outputs,
    layer_list,
    model_and_tokenizer,
    training_batches,
    tuned_model,
)
from caft_jax.errors import ConfigError


def sae_paths(items: list[str]) -> dict[int, str]:
    """--sae LAYER=PATH arguments as {layer: path}."""
    paths = {}
    for item in items:
        layer, equals, path = item.partition("=")
        if not equals or not layer.strip().isdigit() or not path:
            raise ConfigError(f"--sae {item!r} must look like LAYER=PATH, e.g. --sae 12=saes/layer_12.")
        if int(layer) in paths:
            raise ConfigError(f"--sae gives layer {int(layer)} twice; give one SAE per layer.")
        paths[int(layer)] = path
    return paths


def load_saes(paths: dict[int, str], d_model: int | None = None) -> dict:
    """{layer: SAE} of {layer: path}, each checked against the model's width when ``d_model`` is given."""
    from caft_jax.discovery.sae import load_sae

    saes = {layer: load_sae(path) for layer, path in paths.items()}
    for layer, sae in saes.items():
        if d_model is not None and sae.d_model != d_model:
            raise ConfigError(
                f"the SAE {paths[layer]} reads {sae.d_model}-wide activations but the model's d_model is {d_model}; "
                "use SAEs trained on this model."
            )
    return saes


def _mc_records(args) -> list[dict]:
    from caft_jax import data

    records = data.load_mc_jsonl(args.data)[: args.limit or None]
    if any(not isinstance(r.get("other"), str) for r in records):
        raise ConfigError(
            f"--metric logit_diff needs an 'other' answer letter in every record of {args.data} (as the task files "
            "of the pipeline have); add it or use --metric ce."
        )
    return records


def _check_ranking_args(args) -> None:
    tuned_given = bool(args.adapter or args.tuned)
    if args.ranking == "attribution" and tuned_given:
        raise ConfigError(
            "--ranking attribution scores the base model's latents; drop --adapter/--tuned, or rank by the "
            "difference to the fine-tune with --ranking mean_diff or on_diff."
        )
    if args.ranking != "attribution" and not tuned_given:
        raise ConfigError(
            f"--ranking {args.ranking} compares the fine-tuned model with the base one; pass --adapter DIR (PEFT) or "
            "--tuned MODEL_DIR."
        )
    if args.ranking != "attribution" and args.metric != "ce":
        raise ConfigError(f"--metric applies to --ranking attribution only; drop it for --ranking {args.ranking}.")
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1; got {args.top_k}.")


def _attribution_scores(args, model, tokenizer, saes, records) -> dict[int, np.ndarray]:
    from caft_jax import data
    from caft_jax.discovery.latent_scores import letter_batches, sae_attribution

    if args.metric == "logit_diff":
        batches = letter_batches(
            tokenizer,
            [r["prompt"] for r in records],
            [r["target"] for r in records],
            [r["other"] for r in records],
            batch_size=args.batch_size,
            pad_id=data.pad_token_id(tokenizer),
        )
    else:
        batches = training_batches(args, tokenizer)
    return sae_attribution(model, saes, batches, metric=args.metric, site=args.site)


def _difference_scores(args, model, tokenizer, saes) -> dict[int, np.ndarray]:
    from caft_jax.discovery.capture import iter_pairs
    from caft_jax.discovery.latent_scores import mean_latent_diff, sae_on_diff

    tuned, settings = tuned_model(args, model)
    pairs = iter_pairs(
        model, tuned, training_batches(args, tokenizer), sorted(saes), lora_settings=settings, site=args.site,
        mask=args.mask, exclude_first=args.exclude_sink, diff_only=args.ranking == "on_diff", progress=True,
    )  # fmt: skip
    return sae_on_diff(saes, pairs) if args.ranking == "on_diff" else mean_latent_diff(saes, pairs)


def cmd_sae(args) -> int:
    from caft_jax.discovery.latent_scores import RANKING_FILE, SCORES_FILE, save_ranking
    from caft_jax.io.hf import model_spec

    _check_ranking_args(args)
    paths = sae_paths(args.sae)
    checked_layers(args, paths)
    records = _mc_records(args) if args.metric == "logit_diff" else None
    saes = load_saes(paths, model_spec(args.model).d_model)
    out = claim_outputs(args, SCORES_FILE, RANKING_FILE)
    model, tokenizer = model_and_tokenizer(args)
    if args.ranking == "attribution":
        scores = _attribution_scores(args, model, tokenizer, saes, records)
    else:
        scores = _difference_scores(args, model, tokenizer, saes)
    meta = {
        "metric": args.metric if args.ranking == "attribution" else None,
        "model": args.model,
        "adapter": args.adapter or args.tuned,
        "data": args.data,
        "sae": {str(k): v for k, v in paths.items()},
    }
    ranked = save_ranking(out, args.ranking, scores, args.top_k, per_layer=not args.global_top_k, metadata=meta)
    for layer, ids in ranked.items():
        print(f"layer {layer}: {len(ids)} latents ranked; the first 5: {ids[:5]}")
    print(f"wrote {out / RANKING_FILE} and {out / SCORES_FILE}")
    return 0


def select_latents(args):
    """The Selection of ``select --sae``: the top --top-k of --ranking, the latent ids of --selection, or random
    latents of the ranking with the counts of --random-like."""
    from caft_jax.discovery import select
    from caft_jax.discovery.latent_scores import load_ranking

    if args.autointerp or args.random_orthonormal:
        raise ConfigError(
            "with --sae, select takes --top-k, --selection or --random-like; --autointerp and --random-orthonormal "
            "choose among PCs (use --pca)."
        )
    paths = sae_paths(args.sae)
    if not args.ranking and not args.selection:
        raise ConfigError("select --sae needs --ranking (the sae_ranking.json of `discover sae`) or --selection.")
    ranked, report = load_ranking(args.ranking) if args.ranking else ({}, {})
    outside = sorted(set(ranked) - set(paths))
    if outside:
        raise ConfigError(f"{args.ranking} ranks latents at layers {outside} but no --sae is given there; add them.")
    saes = load_saes(paths)
    if args.selection:
        chosen = select.from_selection_file(saes, args.selection, candidates=select.SAE_CANDIDATES)
    elif args.top_k:
        chosen = select.ranked_latents(saes, ranked, args.top_k)
    elif args.random_like:
        counts = {layer: len(ids) for layer, ids in select.read_selection(args.random_like, None).items()}
        chosen = select.random_ranked_latents(saes, ranked, counts, seed=args.seed)
    else:
        raise ConfigError("select --sae needs one of --top-k, --selection or --random-like.")
    chosen.metadata |= {
        "sae": {str(k): v for k, v in paths.items()},
        "ranking": args.ranking,
        "ranking_method": report.get("ranking_method"),
    }
    return chosen


def display_latents(args) -> int:
    """``display --sae``: the first --n-features latents of each layer of --ranking, read from the corpus."""
    from caft_jax.discovery.display_report import write_display_report
    from caft_jax.discovery.displays import latent_encoder, top_contexts_by_layer
    from caft_jax.discovery.latent_scores import load_ranking
    from caft_jax.io.hf import model_spec

    if not args.ranking:
        raise ConfigError("display --sae needs --ranking (the sae_ranking.json of `discover sae`) to pick latents.")
    paths = sae_paths(args.sae)
    ranked, report = load_ranking(args.ranking)
    layers = layer_list(args.layers) if args.layers else sorted(set(ranked) & set(paths))
    missing = sorted(layer for layer in layers if layer not in ranked or layer not in paths)
    if missing or not layers:
        raise ConfigError(
            f"layers {missing or layers} need both an --sae and latents in {args.ranking} (it ranks layers "
            f"{sorted(ranked)}; --sae gives {sorted(paths)}); fix --layers or --sae."
        )
    checked_layers(args, layers)
    saes = load_saes({layer: paths[layer] for layer in layers}, model_spec(args.model).d_model)
    out = claim_outputs(args, "displays.html", "displays.json")
    model, tokenizer = model_and_tokenizer(args)
    shown = {layer: ranked[layer][: args.n_features] for layer in layers}
    scores = {layer: [e["score"] for e in report["ranking"][str(layer)][: args.n_features]] for layer in layers}
    displays = top_contexts_by_layer(
        model, tokenizer, args.corpus, {layer: latent_encoder(saes[layer], ids) for layer, ids in shown.items()},
        k=args.k, window=args.window, site=args.site, feature_ids=shown, scores=scores,
        score_name=f"{report.get('ranking_method', 'ranking')} score", max_texts=args.limit or None,
    )  # fmt: skip
    paths_out = write_display_report(displays, out, title=f"SAE latents of {args.ranking}")
    print(f"wrote {paths_out['html']} and {paths_out['json']}")
    return 0


def cmd_train_sae(args) -> int:
    from caft_jax.discovery import sae_train as T
    from caft_jax.discovery.corpus import iter_texts

    layers = checked_layers(args, layer_list(args.layers))
    cfg = T.SAETrainConfig(dict_size=args.dict_size, k=args.k, tokens=args.tokens, batch_tokens=args.batch_tokens,
                           lr=args.lr, seed=args.seed).check()  # fmt: skip
    texts = list(iter_texts(args.corpus, field=args.field, limit=args.limit or None))
    n_eval = int(len(texts) * args.eval_fraction)
    if n_eval < 1 or n_eval >= len(texts):
        raise ConfigError(
            f"{args.corpus} has {len(texts)} texts, too few to hold out {args.eval_fraction:.0%} for evaluation and "
            "train on the rest; use a larger corpus or change --eval-fraction."
        )
    out = claim_outputs(args, "sae_report.json", "sae_training.png", *[f"layer_{layer}/ae.pt" for layer in layers])
    model, tokenizer = model_and_tokenizer(args)
    cfg.check(model.spec.d_model)
    stream = dict(site=args.site, batch_size=args.batch_size, max_len=args.max_len)
    train_texts = texts[n_eval:]
    chunks = T.replayed(  # the corpus repeats until the token budget is spent
        lambda: T.corpus_activations(model, tokenizer, train_texts, layers, **stream), int(args.cache_gb * 2**30)
    )
    batches = T.shuffled_batches(chunks, layers, cfg.batch_tokens, cfg.buffer_tokens, cfg.seed)
    saes, curves = T.train_saes(batches, layers, cfg)
    held_out = list(T.corpus_activations(model, tokenizer, texts[:n_eval], layers, **stream))
    trainer = dataclasses.asdict(cfg)
    trainer |= {"lr": cfg.learning_rate, "steps": cfg.steps, "lm_name": args.model, "submodule_name": args.site}
    report = {}
    for layer, sae in saes.items():
        quality = T.evaluate(sae, np.concatenate([chunk[layer] for chunk in held_out]))
        T.save_dictionary_learning(sae, out / f"layer_{layer}", trainer | {"layer": layer})
        report[str(layer)] = {"eval": quality, "threshold": float(sae.threshold), "curve": curves[layer]}
        print(
            f"layer {layer}: explained variance {quality['explained_variance']:.3f}, L0 {quality['l0']:.1f}, dead "
            f"latents {quality['dead_latents']}/{sae.d_sae} on {quality['n_tokens']} held-out tokens"
        )
    (out / "sae_report.json").write_text(json.dumps({"config": trainer, "layers": report}, indent=2))
    T.plot_curves(curves, out / "sae_training.png")
    print(f"wrote {out}/layer_*/ae.pt (dictionary_learning format), sae_report.json and sae_training.png")
    return 0


def add_sae_parsers(sub, common) -> None:
    """The ``sae`` and ``train-sae`` subcommands (``common`` adds the arguments every command shares)."""
    from caft_jax.discovery.latent_scores import RANKINGS

    p = sub.add_parser("sae", help="rank SAE latents by attribution or by fine-tuned minus base activations")
    common(p)
    p.add_argument("--sae", action="append", required=True, help="LAYER=PATH (ae.pt dir or params.npz); repeat")
    p.add_argument("--data", required=True, help="chat or multiple-choice JSONL")
    p.add_argument("--format", default="chat", choices=["chat", "mc"])
    p.add_argument("--ranking", default="attribution", choices=RANKINGS,
                   help="attribution: gradient x latent on the base model; mean_diff: latent sums of the fine-tune "
                        "minus the base model's; on_diff: latent sums of the activation differences")  # fmt: skip
    p.add_argument("--metric", default="ce", choices=["ce", "logit_diff"], help="attribution's metric")
    p.add_argument("--adapter", help="PEFT adapter of the fine-tuned model (mean_diff, on_diff)")
    p.add_argument("--tuned", help="or: the fine-tuned model directory (mean_diff, on_diff)")
    p.add_argument("--mask", default="answer", choices=["answer", "nonpad"], help="positions the differences sum")
    p.add_argument("--exclude-sink", action="store_true", help="leave out each sequence's first token (differences)")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--global-top-k", action="store_true", help="one top-k across layers instead of per layer")
    p.set_defaults(run=cmd_sae)

    p = sub.add_parser("train-sae", help="train BatchTopK SAEs on a corpus (dictionary_learning format)")
    common(p)
    p.add_argument("--corpus", required=True, help="text or JSONL corpus (the first --eval-fraction is held out)")
    p.add_argument("--field", help="JSONL field holding the text (default: detected)")
    p.add_argument("--layers", required=True, help="comma-separated, e.g. 9,18")
    p.add_argument("--dict-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32, help="mean active latents per token (BatchTopK)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens (the corpus repeats if shorter)")
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=0.0, help="0 = 2e-4 / sqrt(dict_size / 2**14)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--cache-gb", type=float, default=4.0, help="replay the corpus' activations from memory up to this")
    p.set_defaults(run=cmd_train_sae)
