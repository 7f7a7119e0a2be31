"""Truncation: prompt cut from the left first, then the response from the right; special tokens kept;
counts in the DataReport; nothing dropped silently; the tokenization cache."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_jsonl

from rewardforge.data import DataError, build_dataset, setup_template
from rewardforge.data.tokenize import TruncationStats, tokenize_texts, truncate
from rewardforge.models.reward_model import load_tokenizer

# ------------------------------------------------------------------ truncate() on hand-built sequences
#
#   index:    0     1       2       3       4       5       6       7
#   ids:    [CLS]  p1      p2      p3      r1      r2      r3     [SEP]
#   chars:         0-2     3-5     6-8     9-11    12-14   15-17
#   the response starts at character 9, so p1..p3 are prompt, r1..r3 response.
CLS, SEP = 101, 102
IDS = [CLS, 1, 2, 3, 11, 12, 13, SEP]
OFFSETS = [(0, 0), (0, 2), (3, 5), (6, 8), (9, 11), (12, 14), (15, 17), (0, 0)]
SPECIAL = [1, 0, 0, 0, 0, 0, 0, 1]
START = 9


@pytest.mark.parametrize(
    "max_length, mode, kept, cut_prompt, cut_response",
    [
        (8, "prompt_left", IDS, False, False),  # fits: untouched
        (20, "response_right", IDS, False, False),
        # prompt_left: 2 too many -> the two oldest prompt tokens go
        (6, "prompt_left", [CLS, 3, 11, 12, 13, SEP], True, False),
        # 3 too many -> the whole prompt goes, response intact
        (5, "prompt_left", [CLS, 11, 12, 13, SEP], True, False),
        # 4 too many -> prompt (3) and then the response's last token (1)
        (4, "prompt_left", [CLS, 11, 12, SEP], True, True),
        (3, "prompt_left", [CLS, 11, SEP], True, True),
        # response_right: the response's end goes first ...
        (6, "response_right", [CLS, 1, 2, 3, 11, SEP], False, True),
        # ... but one response token is always kept; the remaining 1 comes off the prompt's left
        (5, "response_right", [CLS, 2, 3, 11, SEP], True, True),
        (3, "response_right", [CLS, 11, SEP], True, True),
    ],
)
def test_truncate_hand_examples(max_length, mode, kept, cut_prompt, cut_response):
    out, cp, cr = truncate(list(IDS), OFFSETS, SPECIAL, START, max_length, mode)
    assert out == kept
    assert (cp, cr) == (cut_prompt, cut_response)
    assert len(out) <= max_length


def test_truncate_keeps_several_special_tokens_at_both_ends():
    # [BOS] [SYS] p1 p2 r1 r2 [EOS] [EOS]
    ids = [1, 2, 10, 11, 20, 21, 3, 3]
    offsets = [(0, 0), (0, 0), (0, 2), (3, 5), (6, 8), (9, 11), (0, 0), (0, 0)]
    special = [1, 1, 0, 0, 0, 0, 1, 1]
    assert truncate(ids, offsets, special, 6, 6, "prompt_left")[0] == [1, 2, 20, 21, 3, 3]
    assert truncate(ids, offsets, special, 6, 5, "prompt_left")[0] == [1, 2, 20, 3, 3]
    with pytest.raises(DataError, match=r"data\.max_length=4 leaves no room for content after the 4 special tokens"):
        truncate(ids, offsets, special, 6, 4, "prompt_left")


def test_truncate_token_straddling_the_response_start_counts_as_response():
    # Token 7 covers characters 0-4 and the response starts at 3: it holds response text, so it is a
    # response token (byte-level BPE glues the space before a response onto its first word).
    ids, offsets, special = [7, 8, 9], [(0, 4), (4, 6), (6, 8)], [0, 0, 0]
    assert truncate(ids, offsets, special, 3, 2, "prompt_left") == ([7, 8], False, True)
    assert truncate(ids, offsets, special, 3, 2, "response_right") == ([7, 8], False, True)
    # a token ending exactly at the boundary is prompt
    assert truncate(ids, offsets, special, 4, 2, "prompt_left") == ([8, 9], True, False)


def test_truncate_without_special_tokens():
    ids, offsets, special = [5, 6, 7, 8], [(0, 1), (1, 2), (2, 3), (3, 4)], [0, 0, 0, 0]
    assert truncate(ids, offsets, special, 2, 3, "prompt_left") == ([6, 7, 8], True, False)
    assert truncate(ids, offsets, special, 2, 1, "prompt_left") == ([7], True, True)


# ------------------------------------------------------------------ real tokenizers


@pytest.fixture(scope="module")
def bert_tok(tiny_model):
    t = load_tokenizer(str(tiny_model("bert")))
    setup_template(t, "auto")
    return t


@pytest.fixture(scope="module")
def llama_tok(tiny_model):
    t = load_tokenizer(str(tiny_model("llama")))
    setup_template(t, "auto")
    return t


PROMPT = "the quick brown fox jumps over the lazy dog"  # 9 word tokens
RESPONSE = "water boils at one hundred degrees"  # 6 word tokens
# Rendered: "Human: PROMPT\n\nAssistant: RESPONSE" -> [CLS] human : <9> assistant : <6> [SEP] = 21 tokens


def _tokens(tok, text, max_length, mode):
    response_start = text.index(RESPONSE)
    (ids,), _ = tokenize_texts(tok, [text], [response_start], max_length, mode, TruncationStats())
    return tok.convert_ids_to_tokens(ids.tolist())


@pytest.mark.parametrize(
    "max_length, mode, expected",
    [
        (21, "prompt_left", "[CLS] human : the quick brown fox jumps over the lazy dog assistant : water boils at one hundred degrees [SEP]"),
        (12, "prompt_left", "[CLS] lazy dog assistant : water boils at one hundred degrees [SEP]"),
        (6, "prompt_left", "[CLS] water boils at one [SEP]"),
        (18, "response_right", "[CLS] human : the quick brown fox jumps over the lazy dog assistant : water boils at [SEP]"),
        (12, "response_right", "[CLS] brown fox jumps over the lazy dog assistant : water [SEP]"),
    ],
)
def test_tokenize_texts_with_bert(bert_tok, max_length, mode, expected):
    text = f"Human: {PROMPT}\n\nAssistant: {RESPONSE}"
    assert " ".join(_tokens(bert_tok, text, max_length, mode)) == expected


def test_tokenize_texts_keeps_llama_bos_and_the_last_token(llama_tok):
    text = f"Human: {PROMPT}\n\nAssistant: {RESPONSE}"
    start = text.index(RESPONSE)
    enc = llama_tok(text, return_offsets_mapping=True)
    full = enc["input_ids"]
    n_response = sum(1 for _, e in enc["offset_mapping"] if e > start)  # tokens holding response text
    assert full[0] == llama_tok.bos_token_id and len(full) > 8 and 3 < n_response < 7

    # prompt-only cut: BOS, then the newest 7 tokens; the last (reward) token survives
    stats = TruncationStats()
    (ids,), lengths = tokenize_texts(llama_tok, [text], [start], 8, "prompt_left", stats)
    assert ids.tolist() == [full[0]] + full[-7:]
    assert lengths.tolist() == [len(full)]
    assert (stats.sequences, stats.truncated_prompt, stats.truncated_response, stats.tokens_removed) == (1, 1, 0, len(full) - 8)

    # the response alone is too long: whole prompt gone, then the response's end
    stats = TruncationStats()
    (ids,), _ = tokenize_texts(llama_tok, [text], [start], 4, "prompt_left", stats)
    first_response = len(full) - n_response
    assert ids.tolist() == [full[0]] + full[first_response: first_response + 3]
    assert (stats.truncated_prompt, stats.truncated_response, stats.tokens_removed) == (1, 1, len(full) - 4)


# ------------------------------------------------------------------ through build_dataset

LONG = " ".join([PROMPT] * 3)  # 27 prompt words
ROWS = [
    # A: long prompt, short different responses -> prompt cut, kept
    {"prompt": LONG, "chosen": "water boils", "rejected": "go away"},
    # B: responses differ only beyond max_length -> identical after truncation, excluded
    {"prompt": "hi", "chosen": " ".join([RESPONSE] * 3) + " paris", "rejected": " ".join([RESPONSE] * 3) + " france"},
    # C: identical texts, excluded before tokenizing
    {"prompt": "hi", "chosen": "same", "rejected": "same"},
    # D: short, untouched
    {"prompt": "hi", "chosen": "yes", "rejected": "no"},
]
MAX = 16


def _full_len(tok, prompt, response):
    return len(tok(f"Human: {prompt}\n\nAssistant: {response}")["input_ids"])


def test_build_dataset_counts_truncation_and_exclusions(tmp_path, bert_tok):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS + ['{"prompt": "hi", "chosen": "A"}'])
    ds, rep = build_dataset([str(f)], bert_tok, kind="pairs", max_length=MAX, skip_bad_rows=True, cache_dir="none")
    assert rep.excluded == {"identical_after_truncation": 1, "identical_texts": 1}
    assert rep.skipped_bad_rows == 1
    assert rep.examples == len(ds) == 2
    # nothing dropped silently
    assert rep.rows_read == 5 == rep.examples + sum(rep.excluded.values()) + rep.skipped_bad_rows
    a = [_full_len(bert_tok, LONG, ROWS[0][side]) for side in ("chosen", "rejected")]
    b = [_full_len(bert_tok, "hi", ROWS[1][side]) for side in ("chosen", "rejected")]
    assert min(a + b) > MAX and _full_len(bert_tok, "hi", "yes") <= MAX
    assert rep.truncation == {
        "sequences": 6,  # A, B and D; C is never tokenized
        "truncated_prompt": 4,  # A and B, both sides
        "truncated_response": 2,  # B only, both sides
        "tokens_removed": sum(n - MAX for n in a + b),
    }
    chosen = [" ".join(bert_tok.convert_ids_to_tokens(x.tolist())) for x in ds.chosen]
    # 16 = [CLS] + 10 newest prompt words + "assistant :" + "water boils" + [SEP]
    assert chosen[0] == "[CLS] " + " ".join(LONG.split()[-10:]) + " assistant : water boils [SEP]"
    assert ds.chosen[1].tolist() == bert_tok("Human: hi\n\nAssistant: yes")["input_ids"]  # untouched
    assert all(len(x) <= MAX and x[0] == bert_tok.cls_token_id and x[-1] == bert_tok.sep_token_id for x in ds.chosen + ds.rejected)


def test_build_dataset_response_right_keeps_the_prompt(tmp_path, bert_tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": PROMPT, "chosen": RESPONSE, "rejected": "go away"}])
    ds, rep = build_dataset([str(f)], bert_tok, kind="pairs", max_length=18, truncation="response_right", cache_dir="none")
    assert " ".join(bert_tok.convert_ids_to_tokens(ds.chosen[0].tolist())) == (
        "[CLS] human : the quick brown fox jumps over the lazy dog assistant : water boils at [SEP]"
    )
    assert rep.truncation["truncated_response"] == 1 and rep.truncation["truncated_prompt"] == 0
    assert len(ds.rejected[0]) == _full_len(bert_tok, PROMPT, "go away") <= 18  # untouched


def test_max_length_below_special_tokens_is_an_error(tmp_path, bert_tok):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS[:1])
    with pytest.raises(DataError, match=r"data\.max_length=2 leaves no room for content after the 2 special tokens"):
        build_dataset([str(f)], bert_tok, kind="pairs", max_length=2, cache_dir="none")


# ------------------------------------------------------------------ cache


def test_cache_hit_returns_identical_arrays(tmp_path, bert_tok, cache_dir):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS + [{"prompt": "hi", "chosen": "a", "rejected": "b", "margin": 1.5, "subset": "s"}])
    kw = dict(kind="pairs", max_length=MAX, cache_dir=cache_dir)
    ds1, r1 = build_dataset([str(f)], bert_tok, **kw)
    ds2, r2 = build_dataset([str(f)], bert_tok, **kw)
    assert r1.from_cache is False and r2.from_cache is True
    assert len(ds1) == len(ds2) == 3
    for a, b in zip(ds1.chosen + ds1.rejected, ds2.chosen + ds2.rejected):
        assert a.dtype == b.dtype == np.int32
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ds1.margin, ds2.margin)  # nan where no margin, in the same places
    assert ds2.extra == ds1.extra and ds2.prompt_keys == ds1.prompt_keys
    for key in ("rows_read", "examples", "excluded", "truncation", "skipped_bad_rows"):
        assert getattr(r2, key) == getattr(r1, key)
    assert len(list((tmp_path / "cache").glob("*/data.arrow"))) == 1  # one entry: the mapped Arrow file and its report

    # another max_length is another entry
    _, r3 = build_dataset([str(f)], bert_tok, kind="pairs", max_length=MAX + 8, cache_dir=cache_dir)
    assert r3.from_cache is False and len(list((tmp_path / "cache").glob("*/data.arrow"))) == 2
    assert r3.truncation != r1.truncation
    # other truncation mode, too
    assert build_dataset([str(f)], bert_tok, kind="pairs", max_length=MAX, truncation="response_right", cache_dir=cache_dir)[1].from_cache is False
    # changed data content misses the cache
    write_jsonl(f, ROWS[:1])
    _, r4 = build_dataset([str(f)], bert_tok, **kw)
    assert r4.from_cache is False and r4.rows_read == 1


def test_damaged_cache_entry_is_rebuilt(tmp_path, bert_tok, cache_dir):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS)
    ds1, _ = build_dataset([str(f)], bert_tok, kind="pairs", max_length=MAX, cache_dir=cache_dir)
    before = [a.copy() for a in ds1.chosen]  # ds1 maps the file that is overwritten in place below
    (entry,) = (tmp_path / "cache").glob("*/data.arrow")
    entry.write_bytes(b"garbage")
    ds2, r2 = build_dataset([str(f)], bert_tok, kind="pairs", max_length=MAX, cache_dir=cache_dir)
    assert r2.from_cache is False
    for a, b in zip(before, ds2.chosen):
        np.testing.assert_array_equal(a, b)
    assert build_dataset([str(f)], bert_tok, kind="pairs", max_length=MAX, cache_dir=cache_dir)[1].from_cache is True


def test_rated_cache_round_trip(tmp_path, bert_tok, cache_dir):
    f = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p", "response": "r", "labels": {"a": 1.0}},
        {"prompt": "q", "response": "s", "labels": {"b": 2.0}},
    ])
    kw = dict(kind="rated", attributes=["a", "b"], max_length=MAX, cache_dir=cache_dir)
    ds1, r1 = build_dataset([str(f)], bert_tok, **kw)
    ds2, r2 = build_dataset([str(f)], bert_tok, **kw)
    assert (r1.from_cache, r2.from_cache) == (False, True)
    np.testing.assert_array_equal(ds2.labels, ds1.labels)
    assert ds2.attributes == ["a", "b"] and np.isnan(ds2.labels[0, 1])
    for a, b in zip(ds1.ids, ds2.ids):
        np.testing.assert_array_equal(a, b)
    # other attribute names: another entry
    assert build_dataset([str(f)], bert_tok, **{**kw, "attributes": ["a", "b", "c"]})[1].from_cache is False
