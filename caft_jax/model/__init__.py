"""The decoder: spec (family differences as data), NNX layers, and the single forward function."""

from caft_jax.model.layers import LORA_TARGETS, LoraSettings
from caft_jax.model.spec import ModelSpec, spec_from_hf_config
from caft_jax.model.transformer import Capture, ForwardOutput, KVCache, Model, forward, init_model, jit_forward
from caft_jax.sharding import PARAM_AXES

__all__ = [
    "LORA_TARGETS",
    "PARAM_AXES",
    "Capture",
    "ForwardOutput",
    "KVCache",
    "LoraSettings",
    "Model",
    "ModelSpec",
    "forward",
    "init_model",
    "jit_forward",
    "spec_from_hf_config",
]
