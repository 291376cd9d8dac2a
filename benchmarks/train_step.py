#!/usr/bin/env python
"""Benchmark one CAFT training step: caft_jax's jitted step against the authors' PyTorch step, same shapes.

    python benchmarks/train_step.py                          # SmolLM2-135M shapes, LoRA, batch 4 x seq 256
    python benchmarks/train_step.py --full --batch 2          # full fine-tuning
    python benchmarks/train_step.py --preset gemma-2-2b --dtype bfloat16 --full --batch 16 --seq 512 --skip-torch

The step (both frameworks): random weights from the model config, LoRA r=32 alpha=64 rsLoRA on all 7 projections
(or full fine-tuning with --full), concept ablation at 3 layers (k directions each), next-token loss on all
tokens, gradient-norm clipping at 1.0, AdamW.

* caft_jax: ``init_model`` (random weights), ``CaftTrainer`` on a 1-device mesh, the step compiled ahead of time
  from ``CaftTrainer.compiled_step`` (compile time reported separately) and called on placed arrays.
* PyTorch reference, written as the CAFT authors' code does it: a transformers model from the same config
  (transformers' default attention implementation: sdpa for Llama/Qwen2/Mistral, eager for Gemma-2), peft LoRA
  (use_rslora), ``register_forward_hook`` on
  ``model.layers[i]`` doing h <- h - ((h - mu) Q) Q^T, ``model(..., labels=...)`` loss, ``clip_grad_norm_``,
  ``torch.optim.AdamW``.

Reported for each: tokens/s (median over --steps timed steps after --warmup untimed ones; the first step, which
for JAX is the XLA compile plus one run, is reported separately), FLOP/s from the analytic count
(``caft_jax.aot.model_flops``, remat off: forward 2 * matmul params * tokens + causal attention, backward 1x
forward for LoRA, 2x for full fine-tuning), the fraction of this machine's matmul peaks (a 2048x2048 matmul
measured in the same run, in torch and in XLA, in float32 and with bf16 operands accumulated in float32; "own" =
that framework's peak in the step's precision, "machine bf16" = the larger bf16 peak, "machine" = the largest),
and peak memory.

Precision (--dtype): float32 runs both steps in float32. bfloat16 runs torch as the authors do (the model in bf16;
peft keeps its adapters in float32) and caft_jax with bf16 weights and bf16 operands in every product, float32
accumulation and float32 trainable weights and moments; its activations stay float32 on a CPU (--jax-activations).

Peak memory: each framework runs in its own subprocess and reports ``ru_maxrss`` (resident-set high-water) of
that process, so the two never mix; the RSS after importing the framework (before any model exists) is reported
too, so the difference is what the model, optimiser and step cost. For JAX the high-water is read after the
timed projector steps and before the no-projector variant is compiled.

Projector overhead: the JAX step with the projector (k_max = k, directions at 3 layers) against the same step
with no projector (``projector=None``, the plain model), same state and batch, timed interleaved (A B B A ...)
in one process so that machine noise hits both alike; overhead = median(with) / median(without) - 1.

Targets (reported, never asserted): JAX >= 1.2x PyTorch tokens/s; projector overhead <= 2%.

Results are printed as a table and written to a section of benchmarks/RESULTS.md (replaced when the same
configuration is run again) with the command, machine and versions. Thread settings: XLA:CPU and torch each use
their defaults (all cores of this process's affinity mask); pass --xla-flags to try XLA:CPU flags.

Experiments: --jax-patch autodiff-linear | autodiff-attention | sliced-loss | previous swaps the library's linear
VJP, its attention (block-causal, custom VJP) or its token loss back to the plain versions they replaced, or all three.
On a GPU: --jax-platform cuda --skip-torch --mfu-peak-tflops 989 (benchmarks/gpu.sh does this).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
LORA_RANK, LORA_ALPHA = 32, 64.0
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Gemma2ForCausalLM": "gemma2",
}
PEAK_N = 2048
INSERT_MARK = "<!-- train_step: new sections go above this line -->"


# ---- helpers shared by the workers ---------------------------------------------------------------------------
def rss_peak_gib() -> float:
    """Resident-set high-water of this process, GiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ablation_layers(n_layers: int) -> list[int]:
    """Three layers spread over the depth, like the EM recipe's 12/32/50 of 64."""
    return sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4})


def random_directions(n_layers: int, d_model: int, k: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {layer: rng.normal(size=(k, d_model)) for layer in ablation_layers(n_layers)}


def random_tokens(vocab: int, batch: int, seq: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq)).astype(np.int32)


def best_and_median(times: list[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)


# ---- PyTorch worker ------------------------------------------------------------------------------------------
def torch_matmul_peaks(reps: int, n: int = PEAK_N) -> dict:
    """Best n x n x n matmul rate of torch, FLOP/s, in float32 and in bfloat16 (its bf16 GEMM accumulates in fp32)."""
    import torch

    peaks = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        with torch.no_grad():
            for _ in range(3):
                torch.matmul(a, b)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.matmul(a, b)
                times.append(time.perf_counter() - t0)
        peaks[name] = 2 * n**3 / min(times)
    return peaks


def torch_worker(args, hf: dict) -> dict:
    import torch

    out = {"rss_import_gib": None, "threads": torch.get_num_threads()}
    import peft
    import transformers

    out["rss_import_gib"] = rss_peak_gib()
    out["matmul_peaks"] = torch_matmul_peaks(args.peak_reps, args.peak_n)
    out["matmul_peak_flops"] = out["matmul_peaks"][args.dtype]
    if args.peak_only:
        return out
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model_type = hf.get("model_type") or MODEL_TYPES[hf["architectures"][0]]
    config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in hf.items() if k != "model_type"})
    torch.manual_seed(0)
    kw = {"attn_implementation": args.torch_attn} if args.torch_attn else {}
    model = transformers.AutoModelForCausalLM.from_config(config, **kw).to(dtype)
    attn_impl = model.config._attn_implementation
    model.train()
    if not args.full:
        pcfg = peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, use_rslora=True, lora_dropout=0.0, target_modules=HF_TARGETS
        )
        model = peft.get_peft_model(model, pcfg)
        layers = model.base_model.model.model.layers
    else:
        layers = model.model.layers
    # the authors' CAFT hook on the decoder-layer output: h <- h - ((h - mu) Q) Q^T, no detach
    import numpy as np

    handles = []
    for layer, dirs in random_directions(hf["num_hidden_layers"], hf["hidden_size"], args.k).items():
        q, _ = np.linalg.qr(dirs.T)
        q = torch.tensor(q, dtype=dtype)
        mu = torch.zeros(q.shape[0], dtype=dtype)

        def hook(module, inputs, output, q=q, mu=mu):
            h = output[0] if isinstance(output, tuple) else output
            h = h - ((h - mu) @ q) @ q.T
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles.append(layers[layer].register_forward_hook(hook))
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    tokens = torch.tensor(random_tokens(hf["vocab_size"], args.batch, args.seq).astype(np.int64))
    attn = torch.ones_like(tokens)

    def loss_fn():
        if args.loss == "tokens":  # all tokens carry the loss
            return model(input_ids=tokens, attention_mask=attn, labels=tokens).loss
        # multiple choice: the answer is the last token; logits_to_keep=2 computes the head at the last two
        # positions only (the authors' code takes logits[:, -1] of the full [b, t, V] logits: slower)
        logits = model(input_ids=tokens, attention_mask=attn, logits_to_keep=2).logits[:, 0].float()
        return torch.nn.functional.cross_entropy(logits, tokens[:, -1])

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    t0 = time.perf_counter()
    out["first_loss"] = step()
    out["first_step_s"] = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out["step_times"] = times
    out["cpu_times"] = cpu
    out["rss_peak_gib"] = rss_peak_gib()
    out["attn_implementation"] = attn_impl
    return out


# ---- JAX worker ----------------------------------------------------------------------------------------------
def xla_matmul_peaks(reps: int, n: int = PEAK_N) -> dict:
    """Best n x n x n matmul rate of XLA, FLOP/s: float32, and bf16 operands accumulated in float32 (the form
    caft_jax's products take; XLA:CPU runs bf16 x bf16 -> bf16 dots at float32 speed or below)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    peaks = {}
    for name in ("float32", "bfloat16"):
        a = jax.random.normal(ka, (n, n), jnp.float32).astype(name)
        b = jax.random.normal(kb, (n, n), jnp.float32).astype(name)
        f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
        for _ in range(3):
            f(a, b).block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            times.append(time.perf_counter() - t0)
        peaks[name] = 2 * n**3 / min(times)
    return peaks


def patch_autodiff_linear() -> None:
    """Experiment (--jax-patch autodiff-linear): the library before its hand-written linear VJP.

    caft_jax.model.layers.linear computes dW = x^T g with the layer input first. Plain autodiff computes (g^T x)^T
    with the cotangent g [b, t, out] first, and XLA:CPU then materialises a transposed copy of g on every layer
    (benchmarks/RESULTS.md). This swaps the plain einsum back in, to measure the difference in one invocation.
    """
    import jax.numpy as jnp

    from caft_jax.model import layers

    def linear(x, w, matmul_dtype=None):  # Linears.project looks the name up per call
        return jnp.einsum("bti,io->bto", x, w.astype(x.dtype))

    layers.linear = linear


def patch_autodiff_attention() -> None:
    """Experiment (--jax-patch autodiff-attention): attention as before its block-causal split and custom VJP.

    One softmax over the full [t, s] square per layer, differentiated by autodiff (which saves the probabilities).
    """
    import jax.numpy as jnp

    from caft_jax.model import layers

    def attend(q, keys, values, mask, spec, dtype):
        logits = jnp.einsum("btkgh,bskh->bkgts", q, keys, preferred_element_type=jnp.float32)
        probs = layers.masked_softmax(layers.softcap(logits * spec.query_scale, spec.attn_softcap), mask)
        return jnp.einsum("bkgts,bskh->btkgh", probs.astype(dtype), values)

    layers._attend, layers.CAUSAL_BLOCK = attend, 1 << 30


def patch_sliced_loss() -> None:
    """Experiment (--jax-patch sliced-loss): the token loss as before, slicing logits[:, :-1] (a copy of [b, t, V])."""
    import jax
    import jax.numpy as jnp

    from caft_jax import train_step

    def token_losses(logits, tokens, loss_mask):
        logits = logits[:, :-1].astype(jnp.float32)
        mask = loss_mask[:, 1:].astype(jnp.float32)
        target_logit = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * mask), jnp.sum(mask)

    train_step.token_losses = token_losses


def patch_block(rows: int):
    """Experiment (--jax-patch block-N): N query rows per block of the training attention instead of 128."""

    def patch() -> None:
        from caft_jax.model import layers

        layers.CAUSAL_BLOCK = rows

    return patch


def patch_autodiff_head() -> None:
    """Experiment (--jax-patch autodiff-head): the LM head differentiated by autodiff instead of the linear VJP."""
    import jax.numpy as jnp

    from caft_jax.model import layers, transformer

    def head_logits(h, final_norm, head, spec, matmul_dtype):
        h = layers.rms_norm(h, final_norm, spec).astype(matmul_dtype)
        head = head.T if spec.tie_embeddings else head  # [d, V]
        out = jnp.einsum("...d,dv->...v", h, head.astype(matmul_dtype), preferred_element_type=jnp.float32)
        return layers.softcap(out, spec.final_softcap)

    transformer.head_logits = head_logits


def patch_autodiff_ablate() -> None:
    """Experiment (--jax-patch autodiff-ablate): the projector differentiated by autodiff instead of its VJP."""
    import jax.numpy as jnp

    from caft_jax.model import transformer

    def intervene(h, layer_data, mask, gradient, matmul_dtype=None):  # plain CAFT fields only
        basis, offset = layer_data[0].astype(h.dtype), layer_data[1]
        coeff = jnp.einsum("btd,dk->btk", h - offset.astype(h.dtype), basis, preferred_element_type=jnp.float32)
        return h - jnp.einsum("btk,dk->btd", coeff, basis.astype(jnp.float32)).astype(h.dtype), coeff

    transformer.intervene = intervene


def patch_no_monitor() -> None:
    """Experiment (--jax-patch no-monitor): the step without the projection monitor's per-layer statistics."""
    import jax.numpy as jnp

    from caft_jax.model import transformer

    transformer.projection_stats = lambda coefficients, basis, watched: jnp.zeros((2,), jnp.float32)


def patch_divided_grads() -> None:
    """Experiment (--jax-patch divided-grads): gradients of the summed loss divided by the target count afterwards,
    with the accumulation scan even for one micro-batch (the step before the count moved ahead of the forward)."""
    import jax
    import jax.numpy as jnp

    from caft_jax import train_step

    def loss_grads_and_stats(self, trainable, frozen, batch, projector, rng):
        lora_settings = self.lora.settings() if self.lora is not None else None

        def micro_loss(trainable, micro, key):
            params, lora = (frozen, trainable) if self.lora is not None else (trainable, None)
            model = self.model.replace(params=params)
            out = train_step.forward(
                model, micro["tokens"], attn_mask=micro["attn_mask"], projector=projector, lora=lora,
                lora_settings=lora_settings, remat=self.remat, logits=not self.last_token_loss,
            )  # fmt: skip
            if self.last_token_loss:
                return train_step.last_token_losses(model, out.hidden, micro["tokens"], micro["loss_mask"])
            return train_step.token_losses(out.logits, micro["tokens"], micro["loss_mask"])

        def accumulate(carry, xs):
            loss_sum, count, grads = carry
            (loss, n), g = jax.value_and_grad(micro_loss, has_aux=True)(trainable, *xs)
            return (loss_sum + loss, count + n, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        keys = jax.random.split(rng, batch["tokens"].shape[0])
        micro = {k: batch[k] for k in train_step.BATCH_KEYS}
        (loss_sum, count, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros), (micro, keys))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
        return loss_sum / denom, count, grads, None

    train_step.CaftTrainer.loss_grads_and_stats = loss_grads_and_stats


JAX_PATCHES = {
    "none": (),
    "autodiff-linear": (patch_autodiff_linear,),
    "autodiff-attention": (patch_autodiff_attention,),
    "sliced-loss": (patch_sliced_loss,),
    "previous": (patch_autodiff_linear, patch_autodiff_attention, patch_sliced_loss),  # before all three
    "block-64": (patch_block(64),),
    "block-256": (patch_block(256),),
    "autodiff-head": (patch_autodiff_head,),
    "autodiff-ablate": (patch_autodiff_ablate,),
    "divided-grads": (patch_divided_grads,),
    "no-monitor": (patch_no_monitor,),
}


def jax_activation_dtype(args, backend: str) -> str:
    """The JAX step's activation dtype. With --dtype bfloat16 the products take bf16 operands either way; on XLA:CPU
    the activations stay float32, because XLA:CPU converts every bf16 buffer the layer scan updates in place to
    float32 and back, whole, at every layer (benchmarks/RESULTS.md)."""
    if args.jax_activations != "auto":
        return args.jax_activations
    return "float32" if backend == "cpu" else args.dtype


def device_peak_gib(device) -> float | None:
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices may not report
        return None
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**30 if peak else None


def jax_worker(args, hf: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    for patch in JAX_PATCHES[args.jax_patch]:
        patch()

    from caft_jax.lora import LoraConfig
    from caft_jax.model.spec import spec_from_hf_config
    from caft_jax.model.transformer import init_model
    from caft_jax.optim import OptimConfig
    from caft_jax.projector import build_projector
    from caft_jax.sharding import make_mesh, replicated, tree_shardings
    from caft_jax.train_step import CaftTrainer

    out = {"rss_import_gib": rss_peak_gib(), "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS")}
    out["device"] = jax.devices()[0].device_kind
    out["matmul_peaks"] = xla_matmul_peaks(args.peak_reps, args.peak_n)
    out["matmul_peak_flops"] = out["matmul_peaks"][args.dtype]
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    activations = jax_activation_dtype(args, jax.default_backend())
    out["precision"] = f"activations {activations}, products {args.dtype} (float32 accumulation)"
    spec = spec_from_hf_config(hf)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    model = init_model(spec, param_dtype=dtype, dtype=activations, matmul_dtype=dtype)
    model = model.replace(params=jax.device_put(model.params, tree_shardings(model.params, mesh)))
    optim = OptimConfig(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, warmup_steps=0, clip_norm=1.0)
    lora = None if args.full else LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA, rslora=True)
    trainable_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.trainable_dtype]
    trainers = {
        name: CaftTrainer(
            model,
            optim,
            1000,
            mesh,
            lora=lora,
            trainable_dtype=trainable_dtype,
            remat=args.remat,
            last_token_loss=args.loss == "last",
        )
        for name in ("proj", "plain")
    }
    state = trainers["proj"].init_state(seed=0)
    out["trainable"] = sum(x.size for x in jax.tree.leaves(state.trainable))
    projector = build_projector(
        random_directions(spec.n_layers, spec.d_model, args.k), spec.n_layers, spec.d_model, k_max=args.k
    )
    projector = jax.device_put(projector, replicated(mesh))
    tokens = random_tokens(spec.vocab_size, args.batch, args.seq)[None]  # [accum=1, b, t]
    ones = np.ones(tokens.shape, bool)
    loss_mask = ones if args.loss == "tokens" else np.zeros(tokens.shape, bool)
    loss_mask[..., -1] = True
    batch = trainers["proj"].place_batch({"tokens": tokens, "attn_mask": ones, "loss_mask": loss_mask})

    def compile_step(name, proj):
        trainer = trainers[name]
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            fn = trainer.compiled_step(state, proj).lower(state, trainer.frozen_params(), batch, proj).compile()
        return fn, time.perf_counter() - t0, trainer.frozen_params()

    def run(fn, frozen, proj, state):
        with jax.set_mesh(mesh):
            state, metrics = fn(state, frozen, batch, proj)
        jax.block_until_ready((state, metrics))
        return state, metrics

    fn, out["compile_s"], frozen = compile_step("proj", projector)
    t0 = time.perf_counter()
    state, metrics = run(fn, frozen, projector, state)
    out["first_step_s"] = out["compile_s"] + time.perf_counter() - t0
    out["first_loss"] = float(metrics["loss"])
    for _ in range(args.warmup):
        state, _ = run(fn, frozen, projector, state)
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = run(fn, frozen, projector, state)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    assert bool(metrics["finite"]), "the JAX step produced a non-finite loss"
    out["step_times"] = times
    out["cpu_times"] = cpu
    out["rss_peak_gib"] = rss_peak_gib()
    out["device_peak_gib"] = device_peak_gib(jax.devices()[0])

    if args.overhead_steps:  # the same step with no projector, interleaved A B B A ... with the projector step
        fn0, out["compile_plain_s"], frozen0 = compile_step("plain", None)
        for _ in range(max(args.warmup, 1)):
            state, _ = run(fn0, frozen0, None, state)
        with_p, without_p = [], []
        for i in range(args.overhead_steps):
            order = (("proj", with_p), ("plain", without_p))
            for name, sink in order if i % 2 == 0 else order[::-1]:
                f, fr, pr = (fn, frozen, projector) if name == "proj" else (fn0, frozen0, None)
                t0 = time.perf_counter()
                state, _ = run(f, fr, pr, state)
                sink.append(time.perf_counter() - t0)
        out["overhead_with_times"] = with_p
        out["overhead_without_times"] = without_p
    return out


# ---- orchestration -------------------------------------------------------------------------------------------
def machine_info() -> dict:
    import jax
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) / 2**20
    except (OSError, AttributeError):
        pass
    try:
        flags = open("/proc/cpuinfo").read()
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if re.search(rf"\b{f}\b", flags)]
    except OSError:
        isa = []
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "isa": isa,
        "mem_gib": mem,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "load_avg": os.getloadavg(),
    }


def run_worker(cmd: list[str], env: dict, part: str) -> dict:
    """Run ``cmd --_out FILE`` (a benchmark worker) in a fresh interpreter and return the JSON it wrote there.

    A worker that dies without a report gives {"error": ...}, so the other workers' numbers are still reported.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    print(f"[{part}] running ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "--_out", out_path], env=env)
    try:
        with open(out_path) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError):
        report = {"error": f"worker {part} exited with status {proc.returncode} and no report"}
    finally:
        if os.path.exists(out_path):
            os.unlink(out_path)
    print(f"[{part}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return report


def publish(body: str, results: str, key: str) -> None:
    """Print a report and, unless ``results`` is '', write it as section ``key`` of that markdown file."""
    print()
    print(body)
    if results:
        write_results(results, key, body)
        print(f"\nwrote section '{key}' to {results}")


def spawn(args, hf_path: str, part: str, extra: list[str] | None = None) -> dict:
    """Run one worker in a fresh interpreter (its own RSS high-water); return its JSON report."""
    cmd = [sys.executable, os.path.abspath(__file__), *args.argv, "--_worker", part, "--_hf", hf_path, *(extra or [])]
    env = dict(os.environ)
    if args.jax_platform:  # with libtpu installed, JAX would otherwise probe for a TPU first
        env["JAX_PLATFORMS"] = args.jax_platform
    if part == "jax" and args.xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    return run_worker(cmd, env, part)


def summarise(rep: dict, flops_per_step: float, tokens_per_step: int, machine_peak: float, bf16_peak: float) -> dict:
    if "step_times" not in rep:
        return rep
    best, med = best_and_median(rep["step_times"])
    rep["step_s"] = med
    rep["step_best_s"] = best
    rep["cpu_s"] = statistics.median(rep["cpu_times"]) if rep.get("cpu_times") else None
    rep["tokens_per_s"] = tokens_per_step / med
    rep["flops_per_s"] = flops_per_step / med
    rep["frac_own_peak"] = rep["flops_per_s"] / rep["matmul_peak_flops"]
    rep["frac_machine_peak"] = rep["flops_per_s"] / machine_peak if machine_peak else None
    rep["frac_bf16_peak"] = rep["flops_per_s"] / bf16_peak if bf16_peak else None
    return rep


def mode_line(args) -> str:
    mode = "full fine-tuning" if args.full else f"LoRA r={LORA_RANK} alpha={int(LORA_ALPHA)} rsLoRA, 7 targets"
    extras = ["last-token loss" if args.loss == "last" else "loss on all tokens"]
    if args.trainable_dtype != "float32":
        extras.append(f"{args.trainable_dtype} trainable params")
    if args.remat != "none":
        extras.append(f"remat {args.remat} (JAX)")
    return mode + ("; " + ", ".join(extras) if extras else "")


def format_report(args, info, hf_name, spec_line, res) -> str:
    jx, tc = res["jax"], res["torch"]
    pct = lambda x: f"{100 * x:.0f}%" if x is not None else "n/a"  # noqa: E731
    lines = [f"Command: `{res['command']}`", ""]
    isa = f" ({', '.join(info['isa'])})" if info["isa"] else ""
    mem = f", {info['mem_gib']:.0f} GiB RAM" if info["mem_gib"] else ""
    lines.append(
        f"Machine: {info['nproc']} CPUs (affinity {info['affinity']}), {info['cpu']}{isa}{mem}; load average "
        f"{info['load_avg'][0]:.2f} at start, {res['load_end']:.2f} at end. JAX backend {jx.get('backend', '?')} "
        f"({jx.get('device', '?')}). Python {info['python']}, jax {info['jax']}, torch {info['torch']}."
    )
    lines.append("")
    lines.append(
        f"Step: {hf_name} shapes ({spec_line}), random weights, {args.dtype}; {mode_line(args)}; ablation at layers "
        f"{res['layers']} with k={args.k}; batch {args.batch} x seq {args.seq} = {res['tokens']} tokens/step; "
        f"{res['flops'] / 1e9:.1f} GFLOP/step (analytic, `caft_jax.aot.model_flops`, remat off). Median of "
        f"{args.steps} timed steps after {args.warmup} warm-up steps."
    )
    lines.append("")
    peaks = [
        f"{name} fp32 {rep['matmul_peaks']['float32'] / 1e9:.0f}, bf16 {rep['matmul_peaks']['bfloat16'] / 1e9:.0f}"
        for name, rep in (("torch", tc), ("XLA", jx))
        if rep.get("matmul_peaks")
    ]
    lines.append(
        f"{args.peak_n}x{args.peak_n} matmul peaks, GFLOP/s (best of {args.peak_reps}; bf16 operands with fp32 "
        f"accumulation): {'; '.join(peaks)}."
    )
    if jx.get("precision"):
        lines.append("")
        lines.append(
            f"caft_jax precision: {jx['precision']}; trainable weights and AdamW moments {args.trainable_dtype}."
        )
    lines.append("")
    lines.append(
        "| step | first step s (compile) | step s (median) | CPU s/step | tokens/s | GFLOP/s | % own matmul peak "
        "(same precision) | % machine bf16 peak | % machine peak | peak RSS GiB (after import) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    jname = "caft_jax, jit" + (f" + experiment {args.jax_patch}" if args.jax_patch != "none" else "")
    rows = [(jname, jx)]
    if not args.skip_torch:
        rows.append((f"PyTorch reference (peft + hooks, {tc.get('attn_implementation', '?')} attention)", tc))
    for name, rep in rows:
        if "error" in rep or "step_s" not in rep:
            lines.append(f"| {name} | failed: {rep.get('error', 'no timings')} | | | | | | | | |")
            continue
        first = f"{rep['first_step_s']:.2f}"
        if "compile_s" in rep:
            first += f" ({rep['compile_s']:.2f})"
        cpu = f"{rep['cpu_s']:.2f}" if rep.get("cpu_s") is not None else "n/a"
        memory = f"{rep['rss_peak_gib']:.2f} ({rep['rss_import_gib']:.2f})"
        if rep.get("device_peak_gib"):
            memory += f"; device {rep['device_peak_gib']:.2f}"
        lines.append(
            f"| {name} | {first} | {rep['step_s']:.3f} | {cpu} | {rep['tokens_per_s']:.0f} "
            f"| {rep['flops_per_s'] / 1e9:.1f} | {pct(rep['frac_own_peak'])} | {pct(rep['frac_bf16_peak'])} "
            f"| {pct(rep['frac_machine_peak'])} "
            f"| {memory} |"
        )
    lines.append("")
    if "speedup" in res:
        verdict = "meets" if res["speedup"] >= 1.2 else "misses"
        lines.append(
            f"- Speed-up of caft_jax over PyTorch (tokens/s): **{res['speedup']:.2f}x** ({verdict} the 1.2x target)."
        )
    if "overhead" in res:
        verdict = "meets" if res["overhead"] <= 0.02 else "misses"
        lines.append(
            f"- Projector overhead (JAX, {args.overhead_steps} interleaved pairs): with {res['with_s']:.3f} s, "
            f"without {res['without_s']:.3f} s -> **{100 * res['overhead']:+.1f}%** (median of pairwise ratios "
            f"{100 * res['overhead_paired']:+.1f}%; the no-projector step compiled in "
            f"{jx.get('compile_plain_s', 0):.1f} s) ({verdict} the <= 2% target)."
        )
    if args.mfu_peak_tflops and "step_s" in jx:
        mfu = res["flops"] / jx["step_s"] / (args.mfu_peak_tflops * 1e12)
        lines.append(
            f"- MFU of the JAX step: **{100 * mfu:.1f}%** of {args.mfu_peak_tflops:g} TFLOP/s dense bf16 "
            "(analytic model FLOPs, remat not counted)."
        )
    if jx.get("device_peak_gib"):
        lines.append(f"- Device memory high-water (JAX): {jx['device_peak_gib']:.2f} GiB.")
    if jx.get("first_loss") is not None and tc.get("first_loss") is not None:
        lines.append(
            f"- First-step loss: JAX {jx['first_loss']:.4f}, PyTorch {tc['first_loss']:.4f} (different random "
            "weights; both near ln(vocab))."
        )
    if jx.get("xla_flags"):
        lines.append(f"- XLA_FLAGS: `{jx['xla_flags']}`")
    return "\n".join(lines)


def write_results(path: str, key: str, body: str) -> None:
    start, end = f"<!-- train_step: {key} -->", f"<!-- /train_step: {key} -->"
    section = f"{start}\n### {key}\n\n{body}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    elif INSERT_MARK in text:  # new sections go just above this line, inside the CPU benchmark chapter
        text = text.replace(INSERT_MARK, section + "\n\n" + INSERT_MARK)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m", help="model shapes from caft_jax.aot.PRESETS")
    p.add_argument("--hf-config", help="path of a Hugging Face config.json (overrides --preset)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--overhead-steps", type=int, default=None, help="interleaved pairs for the projector overhead")
    p.add_argument("--k", type=int, default=8, help="directions per ablated layer (= projector k_max)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument(
        "--loss",
        choices=("tokens", "last"),
        default="tokens",
        help="loss on every token, or on the last one only (the multiple-choice tasks, the pipeline's main job)",
    )
    p.add_argument("--skip-torch", action="store_true", help="skip the PyTorch step (its matmul peak still runs)")
    p.add_argument("--torch-attn", default=None, help="transformers attn_implementation (default: its default)")
    p.add_argument("--trainable-dtype", choices=("float32", "bfloat16"), default="float32", help="JAX master weights")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none", help="JAX per-layer remat policy")
    p.add_argument("--jax-platform", default="cpu", help="JAX_PLATFORMS of the JAX worker (cpu, cuda; '' = default)")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the JAX worker")
    p.add_argument(
        "--jax-patch",
        choices=tuple(JAX_PATCHES),
        default="none",
        help="experiment: run the JAX step without the library's hand-written linear VJP (see patch_autodiff_linear)",
    )
    p.add_argument("--mfu-peak-tflops", type=float, help="accelerator's dense peak (TFLOP/s) to report MFU against")
    p.add_argument("--peak-reps", type=int, default=10)
    p.add_argument("--peak-n", type=int, default=PEAK_N, help="matmul size of the peak measurement")
    p.add_argument(
        "--jax-activations",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="JAX activation dtype (auto: float32 on CPU, --dtype on accelerators; products always take --dtype)",
    )
    p.add_argument("--results", default=RESULTS, help="markdown file to update ('' to skip)")
    p.add_argument("--label", default="", help="suffix of the RESULTS.md section title")
    p.add_argument("--json", help="also write the raw report here")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_hf", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--peak-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.overhead_steps is None:
        args.overhead_steps = args.steps

    if args._worker:
        with open(args._hf) as f:
            hf = json.load(f)
        try:
            rep = jax_worker(args, hf) if args._worker == "jax" else torch_worker(args, hf)
        except Exception as e:  # noqa: BLE001 - report the failure instead of losing the whole run
            import traceback

            traceback.print_exc()
            rep = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        with open(args._out, "w") as f:
            json.dump(rep, f)
        return 0

    args.argv = [a for a in argv if not a.startswith("--_")]
    sys.path.insert(0, os.path.dirname(HERE))
    from caft_jax.aot import PRESETS, model_flops
    from caft_jax.model.spec import spec_from_hf_config

    if args.hf_config:
        with open(args.hf_config) as f:
            hf = json.load(f)
        hf_name = os.path.basename(os.path.dirname(os.path.abspath(args.hf_config))) or args.hf_config
    else:
        hf = PRESETS[args.preset]
        hf_name = args.preset
    spec = spec_from_hf_config(hf)
    tokens = args.batch * args.seq
    head_tokens = args.batch if args.loss == "last" else None
    flops = model_flops(spec, tokens, args.seq, lora=not args.full, remat=False, head_tokens=head_tokens)
    info = machine_info()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(hf, f)
        hf_path = f.name
    try:
        if not args.skip_torch:
            tc = spawn(args, hf_path, "torch")
        elif args.jax_platform == "cpu":  # still measure torch's matmul peak on this CPU
            tc = spawn(args, hf_path, "torch", ["--peak-only"])
        else:
            tc = {}
        jx = spawn(args, hf_path, "jax")
    finally:
        os.unlink(hf_path)
    peaks = [p for r in (tc, jx) for p in (r.get("matmul_peaks") or {}).values()]
    bf16_peaks = [r["matmul_peaks"]["bfloat16"] for r in (tc, jx) if r.get("matmul_peaks")]
    machine_peak, bf16_peak = max(peaks, default=0.0), max(bf16_peaks, default=0.0)
    summarise(jx, flops, tokens, machine_peak, bf16_peak)
    summarise(tc, flops, tokens, machine_peak, bf16_peak)
    res = {
        "command": "python benchmarks/train_step.py " + shlex.join(args.argv),
        "jax": jx,
        "torch": tc,
        "tokens": tokens,
        "flops": flops,
        "layers": ablation_layers(spec.n_layers),
        "machine": info,
        "load_end": os.getloadavg()[0],
        "args": {k: v for k, v in vars(args).items() if k != "argv" and not k.startswith("_")},
    }
    if "tokens_per_s" in jx and "tokens_per_s" in tc:
        res["speedup"] = jx["tokens_per_s"] / tc["tokens_per_s"]
    if jx.get("overhead_with_times"):
        w, wo = jx["overhead_with_times"], jx["overhead_without_times"]
        res["with_s"], res["without_s"] = statistics.median(w), statistics.median(wo)
        res["overhead"] = res["with_s"] / res["without_s"] - 1
        res["overhead_paired"] = statistics.median(a / b for a, b in zip(w, wo, strict=True)) - 1
    spec_line = (
        f"{spec.n_layers} layers, d_model {spec.d_model}, {spec.n_heads}/{spec.n_kv_heads} heads, d_ff {spec.d_ff}, "
        f"vocab {spec.vocab_size}"
    )
    body = format_report(args, info, hf_name, spec_line, res)
    key = f"{hf_name}, {'full fine-tuning' if args.full else 'LoRA'}, {args.dtype}, batch {args.batch} x seq {args.seq}"
    if args.loss == "last":
        key += ", last-token loss"
    if args.jax_patch != "none":
        key += f", experiment {args.jax_patch}"
    if args.label:
        key += f", {args.label}"
    publish(body, args.results, key)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    for name, rep in (("jax", jx), ("torch", tc)):
        if "error" in rep:
            print(f"error in the {name} worker: {rep['error']}", file=sys.stderr)
    return 1 if "error" in jx or ("error" in tc and not args.skip_torch) else 0


if __name__ == "__main__":
    sys.exit(main())
