"""caft_jax: Concept Ablation Fine-Tuning in JAX/Flax.

Public API (see README.md, "Python API"):
  load_model, load_tokenizer      Hugging Face safetensors directories or llama GGUF files -> Model
  forward, jit_forward            the one forward function (training, discovery, generation, evaluation)
  build_projector, Projector      concept-ablation projector: stacked orthonormal bases, a traced input
  ModelSpec, spec_from_hf_config  family differences held as data
"""

from caft_jax.errors import CaftError, CheckpointError, ConfigError, DataError, ProjectorError
from caft_jax.io.hf import load_model, load_tokenizer
from caft_jax.model import (
    Capture,
    ForwardOutput,
    KVCache,
    LoraSettings,
    Model,
    ModelSpec,
    forward,
    init_model,
    jit_forward,
    spec_from_hf_config,
)
from caft_jax.projector import Projector, ablate, build_projector, empty_projector

__all__ = [
    "CaftError",
    "Capture",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ForwardOutput",
    "KVCache",
    "LoraSettings",
    "Model",
    "ModelSpec",
    "Projector",
    "ProjectorError",
    "ablate",
    "build_projector",
    "empty_projector",
    "forward",
    "init_model",
    "jit_forward",
    "load_model",
    "load_tokenizer",
    "spec_from_hf_config",
]
