"""`caft serve`: an OpenAI-compatible HTTP server over the base model, its adapters and test-time ablations.

    caft serve --model BASE [--adapter [NAME=]DIR ...] [--ablate [NAME=]SPEC ...] [--host 127.0.0.1] [--port 8000]
    python -m caft_jax.serve ...   (the same)

The served model names are ``base``, one per adapter (``caft`` when unnamed), and for every ablation spec each of
those with ``+NAME`` (``ablation`` when unnamed): ``--adapter runs/x/adapter --ablate spec.safetensors`` serves
``base``, ``caft``, ``base+ablation`` and ``caft+ablation``. Clients pick one with the request's ``model`` field.
Everything is checked before the weights are read: paths, names, the specs against the model's config, and that
the port is free.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import sys

from caft_jax.errors import ConfigError

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory or .gguf file (the base model)")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="PEFT LoRA adapter served as NAME (default: caft); repeatable",
    )
    parser.add_argument(
        "--ablate",
        action="append",
        default=[],
        metavar="[NAME=]SPEC",
        help="ablation spec applied at test time, served as MODEL+NAME (default: ablation); repeatable",
    )
    parser.add_argument("--ablate-site", default="resid_post", choices=["resid_post", "resid_mid"])
    parser.add_argument("--no-mean-ablation", action="store_true", help="zero-ablate even when the spec has means")
    parser.add_argument("--base-name", default="base", help="name of the base model without adapter")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CAFT_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $CAFT_API_KEY; none when unset)",
    )
    parser.add_argument("--max-batch", type=int, default=32, help="rows (requests x n) per generate call")
    parser.add_argument("--window-ms", type=float, default=10.0, help="wait this long for requests to batch")
    parser.add_argument("--queue-limit", type=int, default=256, help="waiting requests before answering 429")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted")
    parser.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens accepted")
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="max_tokens of chat requests that set none (default: 256 or --max-tokens if smaller)",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def named_paths(values: list[str], default: str, flag: str) -> list[tuple[str, pathlib.Path]]:
    """[NAME=]PATH values -> (name, path); unnamed ones take ``default`` (only one may)."""
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or os.path.exists(value):
            name, path = default, value
        if not set(name) <= NAME_CHARS:
            raise ConfigError(f"{flag} name {name!r} may use letters, digits, '-', '_' and '.' only.")
        if not os.path.exists(path):
            raise ConfigError(f"{flag} {path}: no such file or directory; check the path.")
        out.append((name, pathlib.Path(path)))
    names = [n for n, _ in out]
    if len(set(names)) < len(names):
        raise ConfigError(f"two {flag} values are both named {default!r} or share a name; name them NAME=PATH.")
    return out


def check_port_free(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}.")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host."
            ) from None


def check_limits(args: argparse.Namespace) -> None:
    if args.default_max_tokens is None:
        args.default_max_tokens = min(256, args.max_tokens)
    for flag in ("max_batch", "queue_limit", "max_prompt_tokens", "max_tokens", "default_max_tokens"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
    if args.window_ms < 0:
        raise ConfigError(f"--window-ms must be >= 0, got {args.window_ms}.")
    if args.default_max_tokens > args.max_tokens:
        raise ConfigError("--default-max-tokens must not exceed --max-tokens.")
    if not set(args.base_name) <= NAME_CHARS:
        raise ConfigError(f"--base-name {args.base_name!r} may use letters, digits, '-', '_' and '.' only.")


def load_variants(args: argparse.Namespace):
    """(model, tokenizer, variants), every input checked before the weights are read."""
    from caft_jax import load_model, load_tokenizer
    from caft_jax.cli.common import load_adapter, load_projector
    from caft_jax.io.hf import model_spec
    from caft_jax.serve.engine import Variant

    adapters = named_paths(args.adapter, "caft", "--adapter")
    ablations = named_paths(args.ablate, "ablation", "--ablate")
    if args.base_name in {n for n, _ in adapters}:
        raise ConfigError(f"--adapter name {args.base_name!r} is the base model's name; choose another.")
    spec = model_spec(args.model)
    for _, path in adapters:
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter {path} has no adapter_config.json; pass a PEFT adapter directory.")
    projectors = [
        (name, load_projector(path, spec, site=args.ablate_site, mean_ablation=not args.no_mean_ablation))
        for name, path in ablations
    ]
    check_port_free(args.host, args.port)
    model = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    sides = [Variant(args.base_name)] + [Variant(name, *load_adapter(path, model)) for name, path in adapters]
    variants = list(sides)
    for ablation, projector in projectors:
        variants += [Variant(f"{v.name}+{ablation}", v.lora, v.lora_settings, projector) for v in sides]
    return model, tokenizer, variants


def build(args: argparse.Namespace):
    """(FastAPI app, Engine) from the parsed arguments; everything is checked before the weights are read."""
    from caft_jax.serve.app import ServerLimits, build_app
    from caft_jax.serve.engine import Engine, EngineSettings

    check_limits(args)
    model, tokenizer, variants = load_variants(args)
    engine = Engine(model, tokenizer, variants, EngineSettings(args.max_batch, args.window_ms, args.queue_limit))
    limits = ServerLimits(args.max_prompt_tokens, args.max_tokens, args.default_max_tokens)
    return build_app(engine, api_key=args.api_key, limits=limits), engine


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app, engine = build(args)
    names = ", ".join(engine.variants)
    print(f"serving {names} at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


def main(argv: list[str] | None = None, prog: str = "caft serve") -> int:
    from caft_jax.cli.handler import guarded

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return guarded(lambda: run(args), rerun_hint="restart the server")


if __name__ == "__main__":
    sys.exit(main())
