"""lm-evaluation-harness backend: the `caft_jax` model type over our forward, with adapters and interventions.

    caft lm-eval --model caft_jax --model_args pretrained=BASE,adapter=RUN/adapter,intervention=SPEC --tasks T
    python -m caft_jax.harness ...           (the same: lm-eval's own command line with `caft_jax` registered)

    import caft_jax.harness, lm_eval          (in Python: importing this module registers the model type)
    lm_eval.simple_evaluate(model="caft_jax", model_args="pretrained=BASE", tasks=[...])

lm-eval 0.4 has no model-plugin mechanism (its `--model` names come from its own table; the requests for one,
EleutherAI/lm-evaluation-harness#1457 and #3282, are open), so `caft lm-eval` is lm-eval's CLI after this module
registered the model type.

The class is a ``TemplateLM``, like lm-eval's ``hf`` backend, so contexts and continuations are split into tokens
by lm-eval's own code and the per-item log-likelihoods equal the ``hf`` backend's on the same weights
(tests/test_harness.py). Scoring runs one jitted pass per batch of left-padded rows, bucketed by length, with the LM
head applied only to the scored positions; generation is ``generate_rows`` (KV cache, greedy or sampled).
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from caft_jax.batching import SCORE_BUCKETS, Bucketer, left_pad
from caft_jax.chat import render_messages
from caft_jax.errors import ConfigError
from caft_jax.generate import Row, SamplingConfig, generate_rows, pad_id_for, stop_token_ids
from caft_jax.model.layers import LoraSettings
from caft_jax.model.transformer import Model, forward, lm_head
from caft_jax.projector import Projector

# Scored positions per row: 1, 2, 4, ... (a multiple-choice answer is a few tokens; a rolling window is long).
SCORED_BUCKETS = Bucketer((1, 2, 4, 8, 16, 32, 64), grow=True)
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when the config names none


@functools.partial(jax.jit, static_argnames=("lora_settings", "n_scored"))
def continuation_scores(
    model: Model,
    tokens: jax.Array,
    attn_mask: jax.Array,
    targets: jax.Array,
    target_mask: jax.Array,
    projector: Projector | None = None,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    *,
    n_scored: int,
) -> tuple[jax.Array, jax.Array]:
    """Log-likelihood of each row's continuation, and whether greedy decoding would produce it.

    tokens/attn_mask [b, t] left-padded inputs (the sequence without its last token); targets/target_mask
    [b, n_scored]: the tokens the last n_scored positions predict (masked where a row's continuation is shorter).
    Returns (sum of target log-probs [b] float32, every target the argmax [b] bool).
    """
    hidden = forward(model, tokens, attn_mask=attn_mask, projector=projector, lora=lora, lora_settings=lora_settings,
                     logits=False).hidden  # fmt: skip
    logits = lm_head(model, hidden[:, -n_scored:])  # [b, n, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [b, n]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(target_mask, picked, 0.0), axis=-1), jnp.all(greedy | ~target_mask, axis=-1)


def _flag(value, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"model_args {name}={value!r} is not a boolean; use true or false.")


@register_model("caft_jax")
class CaftLM(TemplateLM):
    """lm-eval model arguments:

    pretrained: HF directory or .gguf (required); adapter: PEFT adapter directory; intervention: ablation spec
    applied at test time; ablate_site: resid_post | resid_mid; mean_ablation: true | false; dtype: float32 |
    bfloat16; batch_size: rows per jitted call (default 8); max_length: context length (default: the config's
    max_position_embeddings, else 2048); add_bos_token: as the hf backend's; seed: sampling seed.
    """

    def __init__(self, pretrained: str | None = None, adapter: str | None = None, intervention: str | None = None,
                 ablate_site: str = "resid_post", mean_ablation=True, dtype: str = "float32", batch_size=8,
                 max_length: int | None = None, add_bos_token=None, seed: int = 1234, max_gen_toks: int = 256,
                 **unused):  # fmt: skip
        super().__init__()
        from caft_jax.cli.common import load_for_eval

        if not pretrained:
            raise ConfigError("model_args needs pretrained=PATH (an HF model directory or a .gguf file).")
        batch = str(batch_size).split(":")[0]
        if not batch.isdigit() or int(batch) < 1:
            raise ConfigError(f"batch_size must be a positive integer for caft_jax (got {batch_size!r}).")
        self._batch_size = int(batch)
        self.model, self.tokenizer, self.lora, self.lora_settings, self.projector = load_for_eval(
            pretrained,
            adapter,
            intervention,
            dtype,
            site=ablate_site,
            mean_ablation=_flag(mean_ablation, "mean_ablation") is not False,
        )
        self.add_bos_token = _flag(add_bos_token, "add_bos_token")
        self._max_length = int(max_length) if max_length else self._config_max_length(pretrained)
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.pretrained = str(pretrained)

    @staticmethod
    def _config_max_length(path: str) -> int:
        import pathlib

        config = pathlib.Path(path) / "config.json"
        if config.is_file():
            return int(json.loads(config.read_text()).get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
        return DEFAULT_MAX_LENGTH

    # ------------------------------------------------------------------------------------------ lm-eval's API

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As the hf backend: the tokenizer's default special tokens unless told, none if BOS is already there."""
        if add_special_tokens is None and self.add_bos_token is not None:
            add_special_tokens = self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return render_messages(self.tokenizer, chat_history, generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template=False):
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Score (key, context ids, continuation ids) requests, longest first, in batches of batch_size rows."""
        rows = []
        for _, context, continuation in requests:  # as the hf backend: keep the last max_length + 1 tokens
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            n_inputs = len(whole) - 1
            rows.append((whole[:-1], list(continuation)[-n_inputs:]))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        width = min(self.batch_size, len(rows))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        pad = pad_id_for(self.model, self.tokenizer)
        for start in tqdm(range(0, len(order), width), desc="loglikelihood", disable=disable_tqdm):
            idx = order[start : start + width]
            inputs = [rows[i][0] for i in idx]
            length = SCORE_BUCKETS.length_for(max(map(len, inputs)))
            n = min(SCORED_BUCKETS.length_for(max(len(rows[i][1]) for i in idx)), length)
            tokens, mask = left_pad(inputs, width, length, pad)
            targets = np.zeros((width, n), np.int32)
            target_mask = np.zeros((width, n), bool)
            for r, i in enumerate(idx):
                cont = rows[i][1]
                targets[r, n - len(cont) :] = cont
                target_mask[r, n - len(cont) :] = True
            sums, greedy = continuation_scores(
                self.model, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(targets), jnp.asarray(target_mask),
                self.projector, self.lora, self.lora_settings, n_scored=n,
            )  # fmt: skip
            sums, greedy = np.asarray(sums), np.asarray(greedy)
            for r, i in enumerate(idx):
                results[i] = (float(sums[r]), bool(greedy[r]))
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log-likelihoods over lm-eval's disjoint rolling windows of each whole text (as the hf backend)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            token_windows = get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1,
            )  # fmt: skip
            for context, continuation in map(make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores, strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for each (context, gen_kwargs); requests with the same settings share batches."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        for indices in tqdm(groups.values(), desc="generate_until", disable=disable_tqdm):
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ConfigError(f"max_gen_toks {max_gen} must be below the context length {self.max_length}.")
            sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
            sampling = SamplingConfig(max_new_tokens=max_gen, greedy=not sampled, seed=self.seed,
                                      temperature=float(kwargs.get("temperature") or 1.0) if sampled else 1.0,
                                      top_p=float(kwargs.get("top_p") or 1.0) if sampled else 1.0)  # fmt: skip
            rows = [
                Row(self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen) :], sampling, stream=i)
                for i in indices
            ]
            results = generate_rows(
                self.model, rows, eos_ids=stop_token_ids(self.model, self.tokenizer),
                pad_id=pad_id_for(self.model, self.tokenizer), lora=self.lora, lora_settings=self.lora_settings,
                projector=self.projector, batch_size=self.batch_size, progress=False,
            )  # fmt: skip
            for i, result in zip(indices, results, strict=True):
                text = self.tokenizer.decode(result["token_ids"], skip_special_tokens=True)
                out[i] = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def main(argv: list[str] | None = None, prog: str = "caft lm-eval") -> int:
    """lm-eval's command line with the `caft_jax` model type registered (this module's import did it)."""
    from lm_eval.__main__ import cli_evaluate

    from caft_jax.cli.handler import USER_ERROR_EXIT, guarded

    def run() -> int:
        try:
            cli_evaluate()
        except ValueError as e:  # lm-eval's own refusals of its input (unknown task, bad model_args, ...)
            print(f"error: lm-eval refused the run: {e}", file=sys.stderr)
            return USER_ERROR_EXIT
        return 0

    if argv is not None:
        sys.argv = [prog, *argv]
    return guarded(run)


if __name__ == "__main__":
    sys.exit(main(prog="python -m caft_jax.harness"))
