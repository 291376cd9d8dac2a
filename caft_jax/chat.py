"""The one chat-template renderer: training data, generation, evaluation and serving all render through here.

Rendering is the tokenizer's own ``apply_chat_template`` (as transformers does it); what this module adds is one
clear error for a tokenizer without a template, or a template that rejects the messages, and the fallback for
templates without a system role (Gemma's raise on one): the system text goes in front of the first user message.
"""

from __future__ import annotations

from collections.abc import Sequence

from caft_jax.errors import DataError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer, what: str = "chat data") -> None:
    """Raise DataError when the tokenizer has no chat template (checked before any model is loaded)."""
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise DataError(
            f"the tokenizer of {name} has no chat template, but {what} needs one; use an instruct model's tokenizer "
            "(or save one with a chat_template), or multiple-choice / plain-text input instead."
        )


def render_messages(tokenizer, messages: Sequence[dict], *, generation_prompt: bool) -> str:
    """The template's text of ``messages`` (with the assistant header at the end when ``generation_prompt``)."""
    from jinja2.exceptions import TemplateError

    require_chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError) as e:
        raise DataError(f"the model's chat template cannot render these messages ({e}).") from None


def render_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """One user turn (after an optional system message), ending in the assistant header."""
    from jinja2.exceptions import TemplateError

    user = {"role": "user", "content": prompt}
    if not system:
        return render_messages(tokenizer, [user], generation_prompt=True)
    require_chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, user], tokenize=False, add_generation_prompt=True
        )
    except TemplateError:
        merged = {"role": "user", "content": f"{system}\n\n{prompt}"}
        return render_messages(tokenizer, [merged], generation_prompt=True)


def encode_messages(tokenizer, messages: Sequence[dict], *, generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered messages (the template writes BOS itself, so no special tokens are added)."""
    text = render_messages(tokenizer, messages, generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
