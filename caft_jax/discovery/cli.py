"""`python -m caft_jax.discover COMMAND`: direction discovery from the command line.

Each command writes into ``--out-dir`` (created if needed) and prints what it wrote; it refuses to replace a file of
a previous command there unless ``--overwrite`` is given (so pca, display and select can share one folder). Every
input (layer indices, files) is checked against the model's config before its weights are read.

  pca      PCA of (fine-tuned - base) activations on the same tokens  -> pca.safetensors
  sae      SAE latents ranked by attribution (and activation differences) -> sae_ranking.json
  concept  supervised concept directions (class mean / LEACE / INLP) from labelled prompts -> ablation_spec.safetensors
  display  max/min-activating contexts of PCs or SAE latents over a text corpus -> displays.html + displays.json
  select   an ablation spec from a selection file or a baseline (top-k, random, random orthonormal)
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
import dataclasses
import json
import pathlib

import numpy as np

from caft_jax.batching import Bucketer
from caft_jax.cli.handler import guarded
from caft_jax.errors import ConfigError


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"--layers must be comma-separated integers like 3,6,9; got {text!r}.") from e


def _claim(args, *names: str) -> pathlib.Path:
    """--out-dir, after checking that none of the files this command writes exists there (unless --overwrite)."""
    from caft_jax.rundir import claim_files

    return claim_files(pathlib.Path(args.out_dir), names, overwrite=args.overwrite)


def _checked_layers(args, layers) -> list[int]:
    """The layer indices, checked against the model's config (no weights read)."""
    from caft_jax.io.hf import model_spec

    n_layers = model_spec(args.model).n_layers
    bad = sorted(int(layer) for layer in layers if not 0 <= int(layer) < n_layers)
    if bad:
        raise ConfigError(f"layers {bad} do not exist: {args.model} has layers 0..{n_layers - 1}; fix --layers.")
    return [int(layer) for layer in layers]


def _model_and_tokenizer(args):
    from caft_jax import load_model, load_tokenizer

    return load_model(args.model, dtype=args.dtype), load_tokenizer(args.model)


def _adapter(args, model):
    """(lora, lora_settings) of --adapter on the model, or (None, None) without one."""
    if not args.adapter:
        return None, None
    from caft_jax.cli.common import load_adapter

    return load_adapter(args.adapter, model)


def _training_batches(args, tokenizer):
    """Batches of the discovery data: chat JSONL (answer tokens) or multiple-choice JSONL (prompt + letter)."""
    from caft_jax import data

    if args.format == "chat":
        records = data.load_chat_jsonl(args.data)
        examples = data.chat_examples(tokenizer, records, args.max_len)
    else:
        records = data.load_mc_jsonl(args.data)
        examples = [data.mc_example(tokenizer, r["prompt"], r["target"]) for r in records]
    examples = examples[: args.limit] if args.limit else examples
    return list(
        data.make_batches(
            examples, args.batch_size, seed=0, epoch=0, pad_id=data.pad_token_id(tokenizer), shuffle=False
        )
    )


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
    from caft_jax.export import load_peft_adapter

    if not (args.adapter or args.tuned):
        raise ConfigError("pca needs the fine-tuned model: pass --adapter DIR (PEFT) or --tuned MODEL_DIR.")
    layers = _checked_layers(args, _layers(args.layers))
    out = _claim(args, "pca.safetensors")
    model, tokenizer = _model_and_tokenizer(args)
    if args.adapter:
        tuned, lora_cfg = load_peft_adapter(args.adapter, model)
        settings = lora_cfg.settings()
    elif args.tuned:
        from caft_jax import load_model

        tuned, settings = load_model(args.tuned, dtype=args.dtype), None
    results = pair_pca(
        model,
        tuned,
        _training_batches(args, tokenizer),
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


def cmd_sae(args) -> int:
    from caft_jax.discovery.latent_scores import letter_batches, rank_latents, sae_attribution
    from caft_jax.discovery.sae import load_sae

    saes = {}
    for item in args.sae:
        layer, equals, path = item.partition("=")
        if not equals or not layer.strip().isdigit():
            raise ConfigError(f"--sae {item!r} must look like LAYER=PATH, e.g. --sae 12=saes/layer_12.")
        saes[int(layer)] = path
    _checked_layers(args, saes)
    out = _claim(args, "sae_effects.npz", "sae_ranking.json")
    saes = {layer: load_sae(path) for layer, path in saes.items()}
    model, tokenizer = _model_and_tokenizer(args)
    if args.metric == "logit_diff":
        from caft_jax import data

        records = data.load_mc_jsonl(args.data)[: args.limit or None]
        batches = letter_batches(
            tokenizer,
            [r["prompt"] for r in records],
            [r["target"] for r in records],
            [r["other"] for r in records],
            batch_size=args.batch_size,
            pad_id=data.pad_token_id(tokenizer),
        )
    else:
        batches = _training_batches(args, tokenizer)
    effects = sae_attribution(model, saes, batches, metric=args.metric, site=args.site)
    ranking = rank_latents(effects, args.top_k, per_layer=not args.global_top_k)
    np.savez(out / "sae_effects.npz", **{f"layer_{k}": v for k, v in effects.items()})
    report = {
        str(layer): [{"latent": int(i), "effect": float(effects[layer][i])} for i in ids]
        for layer, ids in ranking.items()
    }
    (out / "sae_ranking.json").write_text(json.dumps({"metric": args.metric, "ranking": report}, indent=2))
    print(f"wrote {out / 'sae_ranking.json'} and {out / 'sae_effects.npz'}")
    return 0


def cmd_train_sae(args) -> int:
    from caft_jax.discovery import sae_train as T
    from caft_jax.discovery.corpus import iter_texts

    layers = _checked_layers(args, _layers(args.layers))
    cfg = T.SAETrainConfig(dict_size=args.dict_size, k=args.k, tokens=args.tokens, batch_tokens=args.batch_tokens,
                           lr=args.lr, seed=args.seed).check()  # fmt: skip
    texts = list(iter_texts(args.corpus, field=args.field, limit=args.limit or None))
    n_eval = int(len(texts) * args.eval_fraction)
    if n_eval < 1 or n_eval >= len(texts):
        raise ConfigError(
            f"{args.corpus} has {len(texts)} texts, too few to hold out {args.eval_fraction:.0%} for evaluation and "
            "train on the rest; use a larger corpus or change --eval-fraction."
        )
    out = _claim(args, "sae_report.json", "sae_training.png", *[f"layer_{layer}/ae.pt" for layer in layers])
    model, tokenizer = _model_and_tokenizer(args)
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


def cmd_concept(args) -> int:
    from caft_jax.discovery.select import fit_concepts, from_concepts

    layers = _checked_layers(args, _layers(args.layers))
    out = _claim(args, "ablation_spec.safetensors")
    model, tokenizer = _model_and_tokenizer(args)
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

    results, _ = load_pca(args.pca)
    layers = _layers(args.layers) if args.layers else sorted(results)
    missing = sorted(set(layers) - set(results))
    if missing:
        raise ConfigError(f"{args.pca} has no PCs at layers {missing} (it has {sorted(results)}); fix --layers.")
    _checked_layers(args, layers)
    out = _claim(args, "displays.html", "displays.json")
    model, tokenizer = _model_and_tokenizer(args)
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

    out = _claim(args, args.name)
    pcs = load_pca(args.pca)
    if args.selection:
        chosen = select.from_selection_file(pcs, select.read_selection(args.selection))
    elif args.top_k:
        chosen = select.top_k_pcs(pcs, args.top_k, layers=_layers(args.layers) if args.layers else None)
    elif args.random_like:
        chosen = select.random_pcs_like(pcs, select.read_selection(args.random_like), seed=args.seed)
    elif args.random_orthonormal:
        counts = select.read_selection(args.random_orthonormal)
        d_model = next(iter(pcs[0].values())).components.shape[1]
        chosen = select.random_orthonormal(d_model, {k: len(v) for k, v in counts.items()}, seed=args.seed)
    elif args.autointerp:
        chosen = _autointerp_selection(args, pcs, out)
    else:
        raise ConfigError(
            "select needs one of --selection, --top-k, --random-like, --random-orthonormal or --autointerp."
        )
    path = chosen.save(out / args.name)
    print(f"wrote {path} ({chosen.counts()} directions per layer)")
    return 0


def _autointerp_selection(args, pcs, out: pathlib.Path):
    """Explain and score the --displays features with an OpenAI-compatible explainer; keep those >= threshold."""
    from caft_jax.discovery import select
    from caft_jax.discovery.display_report import load_display_json, with_explanations, write_display_report
    from caft_jax.jsonio import write_jsonl

    if not args.displays:
        raise ConfigError("--autointerp needs --displays (the displays.json that `discover display` wrote).")
    if args.autointerp_timeout <= 0:
        raise ConfigError(f"--autointerp-timeout must be a positive number of seconds; got {args.autointerp_timeout}.")
    client = select.autointerp_client(
        args.autointerp_base_url,
        args.autointerp_model,
        api_key_env=args.autointerp_api_key_env,
        cache_path=out / "autointerp_cache.jsonl",
        timeout=args.autointerp_timeout,
    )
    records = select.autointerp_scores(
        load_display_json(args.displays), args.autointerp, client, progress=True, scoring=args.autointerp_score
    )
    write_jsonl(out / "autointerp.jsonl", records)
    features = with_explanations(load_display_json(args.displays), records)
    paths = write_display_report(features, out, title=f"PCs of {args.pca} with autointerp", name="displays_autointerp")
    scored = [r for r in records if r["score"] is not None]
    print(f"autointerp: {len(scored)} of {len(records)} feature sides scored; records in {out / 'autointerp.jsonl'}, "
          f"displays with the explanations in {paths['html']}")  # fmt: skip
    return select.from_autointerp(pcs, records, threshold=args.threshold, rubric=args.autointerp, model=client.model)


def cmd_check(args) -> int:
    from caft_jax.ablation_spec import load_ablation_spec
    from caft_jax.discovery.erasure import erasure_check

    directions, means, _ = load_ablation_spec(args.spec)
    layers = _checked_layers(args, sorted(directions))
    out = _claim(args, "erasure_check.json")
    model, tokenizer = _model_and_tokenizer(args)
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
    layers = _checked_layers(args, _layers(args.layers))
    out = _claim(args, "persona.safetensors", "persona_answers.jsonl")
    model, tokenizer = _model_and_tokenizer(args)
    lora, lora_settings = _adapter(args, model)
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
    _checked_layers(args, [layer])
    out = _claim(args, *OUTPUTS)
    model, tokenizer = _model_and_tokenizer(args)
    lora, lora_settings = _adapter(args, model)
    records = data.load_chat_jsonl(args.data) if args.format == "chat" else data.load_mc_jsonl(args.data)
    records = records[: args.limit] if args.limit else records
    scores = projection_scores(
        model, _training_batches(args, tokenizer), layer, directions[layer][0], site=args.site, lora=lora,
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

    p = sub.add_parser("sae", help="rank SAE latents by attribution")
    common(p)
    p.add_argument("--sae", action="append", required=True, help="LAYER=PATH (ae.pt dir or params.npz); repeat")
    p.add_argument("--data", required=True)
    p.add_argument("--format", default="chat", choices=["chat", "mc"])
    p.add_argument("--metric", default="ce", choices=["ce", "logit_diff"])
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

    p = sub.add_parser("concept", help="supervised concept directions from labelled prompts")
    common(p)
    p.add_argument("--labelled", required=True, help='JSONL of {"prompt": ..., "label": ...}')
    p.add_argument("--layers", required=True)
    p.add_argument("--method", default="leace", choices=["class_mean", "leace", "inlp"])
    p.add_argument("--mean-ablation", action="store_true", help="store per-layer means (mean-ablation)")
    p.set_defaults(run=cmd_concept)

    p = sub.add_parser("display", help="max/min-activating contexts of PCs")
    common(p)
    p.add_argument("--pca", required=True, help="pca.safetensors from the pca command")
    p.add_argument("--corpus", required=True, help="text or JSONL corpus")
    p.add_argument("--layers", default="")
    p.add_argument("--n-features", type=int, default=20)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--window", type=int, default=16)
    p.set_defaults(run=cmd_display)

    p = sub.add_parser("select", help="write an ablation spec")
    common(p, model=False)
    p.add_argument("--pca", required=True)
    p.add_argument("--selection", help='JSON {"layer": [ids]} written by a person')
    p.add_argument("--top-k", type=int, default=0, help="baseline: top-k PCs per layer")
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
