"""Ahead-of-time compilation of the real sharded CAFT train step for a TPU topology, on a CPU host.

    python -m caft_jax.aot --config configs/spurious_gemma2_2b.yaml --topology v5e:2x4 [--preset gemma-2-2b]

Builds the model from its config only (abstract shapes, no weights), lowers ``CaftTrainer``'s jitted step with
its in/out shardings on a mesh over the topology's devices (``jax.experimental.topologies``; needs libtpu,
e.g. ``pip install "jax[tpu]"``), compiles it, and prints per-device memory (``memory_analysis``) against the
chip's HBM, FLOPs (``cost_analysis``) and the compile time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

from caft_jax.cli.handler import guarded
from caft_jax.errors import ConfigError

# HBM per chip, GiB (public TPU specifications).
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}

# config.json fields of public checkpoints, so the AOT report needs neither weights nor network.
PRESETS = {
    "gemma-2-2b": dict(
        architectures=["Gemma2ForCausalLM"], vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
        rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    ),
    "qwen2.5-coder-32b-instruct": dict(
        architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=5120, intermediate_size=27648,
        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False, max_window_layers=64,
    ),
    "mistral-small-24b-instruct-2501": dict(
        architectures=["MistralForCausalLM"], vocab_size=131072, hidden_size=5120, intermediate_size=32768,
        num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=100000000.0, sliding_window=None, tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True,
    ),
}  # fmt: skip


def topology_devices(topology: str):
    """Devices of a TPU topology such as "v5e:2x4" (compile-only; no TPU needed, libtpu is)."""
    from jax.experimental import topologies

    chip, _, shape = topology.partition(":")
    if not shape or chip not in HBM_GIB:
        raise ConfigError(f"Topology {topology!r} must look like v5e:2x4 with a chip among {', '.join(HBM_GIB)}.")
    try:
        desc = topologies.get_topology_desc(topology, "tpu")
    except Exception as e:  # noqa: BLE001 - missing libtpu or an unknown topology string
        raise ConfigError(
            f"Could not describe TPU topology {topology!r} ({str(e).splitlines()[0][:200]}); install libtpu with "
            '`pip install "jax[tpu]"` (compiling for TPU needs it even on a CPU host).'
        ) from e
    return chip, desc.devices


def hf_config_for(cfg, preset: str | None) -> dict:
    from caft_jax.model.spec import load_hf_config

    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        return PRESETS[preset]
    if cfg.model and os.path.isfile(os.path.join(cfg.model, "config.json")):
        return load_hf_config(cfg.model)
    raise ConfigError(f"No config.json at model={cfg.model!r}; pass --preset ({', '.join(PRESETS)}) or a model dir.")


def compile_train_step(cfg, hf_config: dict, devices, *, k_max: int = 8) -> dict:
    """Lower and compile CaftTrainer's step for `devices` from abstract shapes; return the report dict."""
    from caft_jax.model.spec import spec_from_hf_config
    from caft_jax.model.transformer import init_model
    from caft_jax.projector import empty_projector
    from caft_jax.sharding import make_mesh, replicated, tree_shardings
    from caft_jax.train_step import CaftTrainer

    spec = spec_from_hf_config(hf_config)
    mesh = make_mesh(cfg.mesh, devices)
    abstract = init_model(
        spec, param_dtype=cfg.base_dtype or cfg.dtype, dtype=cfg.dtype, matmul_dtype=cfg.matmul_dtype, abstract=True
    )
    shardings = tree_shardings(abstract.params, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract.params, shardings)
    model = abstract.replace(params=params)
    trainer = CaftTrainer(
        model,
        cfg.optim,
        1000,
        mesh,
        lora=cfg.lora,
        trainable_dtype=cfg.trainable_dtype,
        remat=cfg.remat,
        packed=cfg.data.pack,
    )
    state = trainer.abstract_state()
    batch_shape = (cfg.grad_accum, cfg.batch_size, cfg.data.max_len)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % split:
        raise ConfigError(
            f"batch_size={cfg.batch_size} rows do not divide over data*fsdp={split} devices; keep the effective "
            f"batch with e.g. batch_size={split} grad_accum={max(1, cfg.batch_size * cfg.grad_accum // split)}."
        )
    batch = {
        k: jax.ShapeDtypeStruct(
            batch_shape, jnp.int32 if k in ("tokens", "segment_ids") else jnp.bool_, sharding=trainer.batch_sharding()
        )
        for k in trainer.batch_keys
    }
    projector = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)),
        jax.eval_shape(lambda: empty_projector(spec.n_layers, spec.d_model, k_max, site=cfg.ablation.site)),
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = trainer.compiled_step(state, projector).lower(state, trainer.frozen_params(), batch, projector)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {
            "devices": len(devices),
            "mesh": dict(mesh.shape),
            "batch": list(batch_shape),
            "fits": False,
            "compile_seconds": round(time.perf_counter() - start, 2),
            "error": str(e).splitlines()[0][:300],
        }
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_device = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    tokens = cfg.grad_accum * cfg.batch_size * cfg.data.max_len
    n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
    return {
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "params": n_params,
        "trainable": n_trainable,
        "batch": list(batch_shape),
        "compile_seconds": round(seconds, 2),
        "argument_gib": memory.argument_size_in_bytes / 2**30,
        "output_gib": memory.output_size_in_bytes / 2**30,
        "temp_gib": memory.temp_size_in_bytes / 2**30,
        "alias_gib": memory.alias_size_in_bytes / 2**30,
        "per_device_gib": per_device / 2**30,
        "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
        "model_flops_per_device": model_flops(
            spec, tokens, cfg.data.max_len, lora=cfg.lora is not None, remat=cfg.remat != "none"
        )
        / len(devices),
    }


def model_flops(spec, tokens: int, seq: int, *, lora: bool, remat: bool, head_tokens: int | None = None) -> float:
    """Analytic matmul FLOPs of one train step (XLA's cost analysis counts a scanned layer body only once).

    Forward = 2 * (matmul params) * tokens + causal attention 2 * 2 * t/2 * H * head_dim per token and layer, plus
    the LM head on ``head_tokens`` positions (default: all; the last-token loss of multiple choice: one per row).
    Backward = 2x forward for full fine-tuning (input and weight gradients), 1x for LoRA (input gradients only;
    LoRA's own weight gradients are negligible); remat adds one more forward.
    """
    s = spec
    per_layer = s.d_model * (s.q_dim + 2 * s.kv_dim) + s.q_dim * s.d_model + 3 * s.d_model * s.d_ff
    attention = s.n_layers * 2 * 2 * (seq / 2) * s.n_heads * s.head_dim  # QK^T and PV, causal half
    head = 2 * s.d_model * s.vocab_size * (tokens if head_tokens is None else head_tokens)
    forward = tokens * (2 * s.n_layers * per_layer + attention) + head
    return forward * ((2 if lora else 3) + (1 if remat else 0))


def main(argv: list[str] | None = None, prog: str = "python -m caft_jax.aot") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", required=True, help="train config YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (e.g. batch_size=16 data.max_len=512)")
    parser.add_argument("--topology", required=True, help="e.g. v5e:2x4, v5p:2x2x2")
    parser.add_argument("--preset", help=f"model shapes without a local config: {', '.join(PRESETS)}")
    parser.add_argument("--json", help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    return guarded(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from caft_jax.config import load_config
    from caft_jax.jsonio import write_json

    cfg = load_config(args.config, args.overrides)
    chip, devices = topology_devices(args.topology)
    report = {
        "topology": args.topology,
        "config": args.config,
        **compile_train_step(cfg, hf_config_for(cfg, args.preset), devices),
    }
    hbm = HBM_GIB[chip]
    report["hbm_gib"] = hbm
    if "error" in report:  # the compiler itself refused: more memory than the chip has
        print(
            f"{args.topology}: {report['devices']} chips, mesh {report['mesh']}, batch {report['batch']}: "
            f"DOES NOT FIT ({report['error']})"
        )
    else:
        report["fits"] = report["per_device_gib"] <= hbm
        print_report(report, hbm)
    if args.json:
        write_json(args.json, report)
    return 0


def print_report(report: dict, hbm: float) -> None:
    print(
        f"{report['topology']}: {report['devices']} chips, mesh {report['mesh']}, {report['params'] / 1e9:.2f}B "
        f"params ({report['trainable'] / 1e6:.1f}M trainable), batch {report['batch']}"
    )
    print(
        f"  compile {report['compile_seconds']:.1f} s; per-device memory {report['per_device_gib']:.2f} GiB "
        f"(args {report['argument_gib']:.2f}, temp {report['temp_gib']:.2f}) of {hbm} GiB HBM -> "
        f"{'fits' if report['fits'] else 'DOES NOT FIT'}"
    )
    print(
        f"  {report['model_flops_per_device'] / 1e12:.2f} TFLOP per device per step (analytic; XLA cost analysis: "
        f"{(report['xla_flops_per_device'] or 0) / 1e12:.2f}, which counts the scanned layer body once)"
    )


if __name__ == "__main__":
    sys.exit(main())
