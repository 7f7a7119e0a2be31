"""The fast preprocessing paths give exactly what the reference paths give.

Reference: Jinja ``apply_chat_template`` for every text (``TextRenderer(fast=False)``) and
``tokenizer(..., return_offsets_mapping=True)`` for every text (``tokenize_texts(fast=False)``), i.e.
``REWARDFORGE_FAST_PREPROCESS=0``. Fast: the pure-Python plain template, the prompt rendered once per
pair, the Rust tokenizer called directly with offsets read only for texts over ``max_length``, and, for
BERT/WordPiece tokenizers, the prompt and the response tokenized apart (the prompt once per pair).

Compared: token ids (dtype too), lengths before truncation, attention masks of collated batches,
truncation counts, exclusion counts, prompt keys, margins, extras, and the errors raised.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CHATML, rated_rows, write_jsonl

from rewardforge.data import DataError, build_dataset, setup_template
from rewardforge.data import tokenize as T
from rewardforge.data.batching import PairCollator, RatedCollator
from rewardforge.data.formats import common_prefix_length as _common_prefix_length
from rewardforge.data.template import PLAIN_TEMPLATE, TextRenderer, _plain_parts
from rewardforge.models.reward_model import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart"
HH = ROOT.parent / "shared" / "data" / "hh_rlhf"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
KINDS = ("bert", "gpt2", "llama", "qwen2")
# a Llama-style chat template that writes the BOS itself (TextRenderer strips it: the tokenizer adds one)
LLAMA_CHAT = (
    "{{ bos_token }}{% for message in messages %}{{ '[' + message['role'] | upper + '] ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[ASSISTANT] ' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def _fast_path_for_small_inputs(monkeypatch):
    """tokenize_texts leaves calls under 256 texts to the reference path; here every call takes the fast one."""
    monkeypatch.setattr(T, "_MIN_FAST", 0)


def _minilm():
    try:
        return load_tokenizer(MINILM)
    except Exception as e:  # the offline package is not installed
        pytest.skip(f"MiniLM tokenizer unavailable ({type(e).__name__}: {e})")


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    """name -> factory of a fresh tokenizer with its template installed ('plain' unless it has its own)."""

    def make(name: str, template: str = "auto"):
        tok = _minilm() if name == "minilm" else load_tokenizer(str(tiny_model(name)))
        if template == "chatml":
            tok.chat_template = CHATML
        elif template == "llama_chat":
            tok.chat_template = LLAMA_CHAT
        setup_template(tok, "tokenizer" if template in ("chatml", "llama_chat") else template)
        return tok

    return make


# every tokenizer x template combination: plain everywhere, plus real chat templates on the decoders
COMBOS = [(k, "plain") for k in KINDS + ("minilm",)] + [("qwen2", "auto"), ("gpt2", "chatml"), ("llama", "llama_chat")]
COMBO_IDS = [f"{k}-{t}" for k, t in COMBOS]


def _build(monkeypatch, fast: bool, files, tok, **kw):
    monkeypatch.setenv("REWARDFORGE_FAST_PREPROCESS", "1" if fast else "0")
    try:
        return build_dataset([str(f) for f in files], tok, cache_dir="none", **kw)
    finally:
        monkeypatch.delenv("REWARDFORGE_FAST_PREPROCESS")


def _assert_same_dataset(a, ra, b, rb):
    assert len(a) == len(b)
    if a.kind == "pairs":
        seqs = [(a.chosen, b.chosen), (a.rejected, b.rejected)]
        np.testing.assert_array_equal(a.margin, b.margin)
    else:
        seqs = [(a.ids, b.ids)]
        np.testing.assert_array_equal(a.labels, b.labels)
    for xs, ys in seqs:
        for x, y in zip(xs, ys):
            assert x.dtype == y.dtype == np.int32
            np.testing.assert_array_equal(x, y)
    assert a.prompt_keys == b.prompt_keys and a.extra == b.extra
    for key in ("rows_read", "examples", "excluded", "truncation", "skipped_bad_rows"):
        assert getattr(ra, key) == getattr(rb, key), key
    # attention masks as training sees them: whole dataset in batches of 16
    collate = (PairCollator if a.kind == "pairs" else RatedCollator)(pad_id=0)
    for s in range(0, len(a), 16):
        ba, bb = collate([a[i] for i in range(s, min(s + 16, len(a)))]), collate([b[i] for i in range(s, min(s + 16, len(b)))])
        assert ba["input_ids"].equal(bb["input_ids"]) and ba["attention_mask"].equal(bb["attention_mask"])


def _compare_builds(monkeypatch, files, tok, **kw):
    ref = _build(monkeypatch, False, files, tok, **kw)
    fast = _build(monkeypatch, True, files, tok, **kw)
    _assert_same_dataset(*ref, *fast)
    return ref


# ------------------------------------------------------------------ (a) the shipped quickstart examples


@pytest.mark.parametrize("kind, template", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("max_length, truncation", [(512, "prompt_left"), (24, "prompt_left"), (24, "response_right")])
def test_quickstart_identical(monkeypatch, tokenizers, kind, template, max_length, truncation):
    tok = tokenizers(kind, template)
    files = [QUICKSTART / "train.jsonl", QUICKSTART / "validation.jsonl"]
    _, rep = _compare_builds(monkeypatch, files, tok, kind="pairs", max_length=max_length, truncation=truncation)
    assert rep.rows_read == 1200
    if max_length == 24:  # the short setting really truncates
        assert rep.truncation["truncated_prompt"] + rep.truncation["truncated_response"] > 100


# ------------------------------------------------------------------ (b) real HH-RLHF data


def _hh_sample(tmp_path: Path, per_file: int) -> list[Path]:
    files = sorted(HH.glob("*.jsonl.gz"))
    if not files:
        pytest.skip(f"HH-RLHF data not found in {HH} (this test needs ../shared/data/hh_rlhf beside the project root)")
    out = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            lines = [line for _, line in zip(range(per_file), fh)]
        dest = tmp_path / f.name.replace(".jsonl.gz", ".jsonl")
        dest.write_text("".join(lines), encoding="utf-8")
        out.append(dest)
    return out


@pytest.mark.parametrize("kind, template", COMBOS, ids=COMBO_IDS)
def test_hh_sample_identical(monkeypatch, tmp_path, tokenizers, kind, template):
    files = _hh_sample(tmp_path, 100)
    tok = tokenizers(kind, template)
    for max_length, truncation in ((256, "prompt_left"), (64, "response_right")):
        _, rep = _compare_builds(monkeypatch, files, tok, kind="pairs", max_length=max_length, truncation=truncation)
        assert rep.rows_read == 400 and rep.truncation["truncated_prompt"] > 0


@pytest.mark.skipif(not os.environ.get("REWARDFORGE_TEST_FULL_HH"), reason="all 8,552 pairs take ~30 s: set REWARDFORGE_TEST_FULL_HH=1")
def test_hh_all_pairs_identical_minilm(monkeypatch, tokenizers):
    files = sorted(HH.glob("*.jsonl.gz"))
    if not files:
        pytest.skip(f"HH-RLHF data not found in {HH}")
    tok = tokenizers("minilm", "plain")
    _, rep = _compare_builds(monkeypatch, files, tok, kind="pairs", max_length=256)
    assert rep.rows_read == 8552


def test_hh_sample_uses_the_split_path_for_minilm(tmp_path, tokenizers):
    """The benchmark's tokenizer really takes the prompt/response split (else the test above proves less)."""
    files = _hh_sample(tmp_path, 50)
    tok = tokenizers("minilm", "plain")
    r = TextRenderer(tok)
    texts, starts = [], []
    for line in files[0].read_text().splitlines():
        row = json.loads(line)
        texts.append(row["chosen"]), starts.append(len(row["chosen"]) // 2)
    backend = T._Backend.of(tok)
    backend.verify(tok, texts, starts)
    assert backend.direct and backend.split and backend.lead == [tok.cls_token_id] and backend.trail == [tok.sep_token_id]
    assert r.fast


# ------------------------------------------------------------------ (c) rendering: the plain fast path is byte-identical

MESSAGE_LISTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}],
    [{"role": "system", "content": "be nice"}, {"role": "user", "content": ""}],
    [{"role": "sYSTEM tool", "content": "x"}, {"role": "", "content": "empty role"}, {"role": "ünïcode", "content": "é\n\n"}],
    [{"role": "user", "content": "<s>starts with a BOS string", "name": "extra key"}],
    [{"role": "assistant", "content": "{{ not jinja }} {% raw %}"}],
]
ODD_LISTS = [  # not plain-eligible: must go to Jinja (and come out the same or raise the same)
    [{"role": "user", "content": None}],
    [{"role": "user"}],
    [],
]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_plain_renderer_matches_jinja(tokenizers, kind):
    tok = tokenizers(kind, "plain")
    assert tok.chat_template == PLAIN_TEMPLATE
    fast, ref = TextRenderer(tok, fast=True), TextRenderer(tok, fast=False)
    for messages in MESSAGE_LISTS:
        assert _plain_parts(messages) is not None
        for gen in (False, True):
            assert fast._chat(messages, gen) == ref._chat(messages, gen) == ref._finish(
                tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))
    for messages in ODD_LISTS:
        assert _plain_parts(messages) is None
        for gen in (False, True):
            try:
                want = ref._chat(messages, gen)
            except Exception as e:
                with pytest.raises(type(e)):
                    fast._chat(messages, gen)
            else:
                assert fast._chat(messages, gen) == want


class _Str(str):
    pass


def test_plain_parts_refuses_what_only_jinja_can_judge():
    from collections import OrderedDict

    assert _plain_parts([OrderedDict(role="user", content="x")]) is None
    assert _plain_parts([{"role": _Str("user"), "content": "x"}]) is None
    assert _plain_parts([{"role": "user", "content": 3}]) is None
    assert _plain_parts(({"role": "user", "content": "x"},)) is None
    assert _plain_parts([{"role": "user", "content": "x"}]) == ["Human: x"]


@pytest.mark.parametrize("a, b", [("", ""), ("abc", "abcdef"), ("abcdef", "abc"), ("abXdef", "abYdef"), ("x", "y"),
                                  ("Human: a\n\nAssistant: ", "Human: a\n\nUser: b"), ("ab" * 500 + "c", "ab" * 500 + "d")])
def test_common_prefix_length(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert _common_prefix_length(a, b) == n


PAIRS = [  # (prompt, chosen, rejected)
    ([{"role": "user", "content": "How?"}], [{"role": "assistant", "content": "Well."}], [{"role": "assistant", "content": "No."}]),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     [{"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}], [{"role": "assistant", "content": "f"}]),
    # the response starts with a user turn: the head is not a prefix of the text (bisection path)
    ([{"role": "user", "content": "q"}], [{"role": "user", "content": "more"}], [{"role": "assistant", "content": "x"}]),
    ([], [{"role": "assistant", "content": "only"}], [{"role": "assistant", "content": "response"}]),
    ([{"role": "user", "content": "q"}], "raw chosen", "raw rejected"),
    ("raw prompt ", "raw chosen", "raw rejected"),
    ([{"role": "user", "content": "q"}], [{"role": "assistant", "content": None}], [{"role": "assistant", "content": "x"}]),
]


@pytest.mark.parametrize("kind, template", COMBOS, ids=COMBO_IDS)
def test_render_pair_matches_two_renders(tokenizers, kind, template):
    tok = tokenizers(kind, template)
    fast, ref = TextRenderer(tok, fast=True), TextRenderer(tok, fast=False)
    for prompt, chosen, rejected in PAIRS + [("raw prompt", [{"role": "assistant", "content": "x"}], "y")]:
        try:
            want = (*ref.render(prompt, chosen, "w"), *ref.render(prompt, rejected, "w"))
        except Exception as e:
            with pytest.raises(type(e)) as got:
                fast.render_pair(prompt, chosen, rejected, "w")
            assert str(got.value) == str(e)
        else:
            assert fast.render_pair(prompt, chosen, rejected, "w") == want
            assert (*fast.render(prompt, chosen, "w"), *fast.render(prompt, rejected, "w")) == want


def test_render_pair_raises_the_same_error_as_render(tokenizers):
    tok = tokenizers("gpt2", "plain")
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}{{ m['content'] }}{% endfor %}"
    fast, ref = TextRenderer(tok, fast=True), TextRenderer(tok, fast=False)
    prompt, ok = [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}]
    bad = [{"role": "bad", "content": "a"}]
    for chosen, rejected in ((ok, bad), (bad, ok)):
        with pytest.raises(DataError) as e_ref:
            ref.render(prompt, chosen, "f:1"), ref.render(prompt, rejected, "f:1")
        with pytest.raises(DataError) as e_fast:
            fast.render_pair(prompt, chosen, rejected, "f:1")
        assert str(e_fast.value) == str(e_ref.value) and "no bad roles" in str(e_ref.value)


# ------------------------------------------------------------------ (c) tokenization on hand-made hard cases

HEADS = ["Human: hi\n\nAssistant: ", "Human: x\n", "Human: tab\t", "Human: no space:", "Human: glued", "", "prompt [SEP] ", "İstanbul ΣΑΣ "]
RESPONSES = [
    "water boils at one hundred degrees", " leading space", "\nleading newline", "\u0301combining accent first",
    "中文 response", "[SEP] literal special", "[MASK] literal mask", "x" * 130 + " overlong word", "\x00control\x1f chars",
    "ΟΔΟΣ final sigma Σ", "", "emoji 🙂 and  double  spaces", "Assistant: the quick brown fox jumps over the lazy dog " * 3,
]
CASES = [(h + r, len(h)) for h in HEADS for r in RESPONSES] + [(h * 4 + r, 4 * len(h)) for h in HEADS[:2] for r in RESPONSES[:3]]


@pytest.mark.parametrize("kind, template", COMBOS, ids=COMBO_IDS)
def test_tokenize_texts_identical_on_hard_cases(tokenizers, kind, template):
    tok = tokenizers(kind, template)
    texts, starts = [t for t, _ in CASES], [s for _, s in CASES]
    for max_length in (3, 5, 8, 16, 40, 1000):
        for mode in ("prompt_left", "response_right"):
            for batch_size in (7, 2048):
                outcome = {}
                for fast in (False, True):
                    stats = T.TruncationStats()
                    try:
                        ids, lengths = T.tokenize_texts(tok, texts, starts, max_length, mode, stats, batch_size=batch_size, fast=fast)
                        outcome[fast] = ([x.tolist() for x in ids], lengths.tolist(), stats.as_dict(), [x.dtype for x in ids])
                    except DataError as e:
                        outcome[fast] = str(e)
                assert outcome[True] == outcome[False], (max_length, mode, batch_size)


def test_split_path_only_for_wordpiece_style_tokenizers(tokenizers):
    texts, starts = [t for t, _ in CASES], [s for _, s in CASES]
    for kind, split in (("bert", True), ("minilm", True), ("gpt2", False), ("llama", False), ("qwen2", False)):
        tok = tokenizers(kind)
        backend = T._Backend.of(tok)
        backend.verify(tok, texts, starts)
        assert backend.direct, kind
        assert backend.split is split, kind


def _variant(normalizer, pre_tokenizer, model: str = "wordpiece"):
    """A small trained tokenizer with the given normalizer and pre-tokenizer, [CLS] ... [SEP] around the text."""
    from conftest import CORPUS
    from tokenizers import Tokenizer, models, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    if model == "wordpiece":
        tok, trainer = Tokenizer(models.WordPiece(unk_token="[UNK]")), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    else:
        tok, trainer = Tokenizer(models.Unigram()), trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="[UNK]")
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.train_from_iterator(CORPUS, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    setup_template(t, "plain")
    return t


def _variants():
    from tokenizers import normalizers as N
    from tokenizers import pre_tokenizers as P

    return [  # (name, tokenizer, split expected)
        ("nfd-lower-strip+whitespace", _variant(N.Sequence([N.NFD(), N.Lowercase(), N.StripAccents()]), P.Whitespace()), True),
        ("lower+whitespacesplit", _variant(N.Lowercase(), P.WhitespaceSplit()), True),
        ("none+bert", _variant(None, P.BertPreTokenizer()), True),
        ("nfkc+bert", _variant(N.NFKC(), P.BertPreTokenizer()), False),  # NFKC not on the list: whole texts
        ("metaspace-unigram", _variant(None, P.Metaspace(), model="unigram"), False),  # SentencePiece style
        ("bert+digits", _variant(N.Lowercase(), P.Sequence([P.BertPreTokenizer(), P.Digits()])), False),
    ]


def test_other_normalizers_and_pre_tokenizers():
    texts, starts = [t for t, _ in CASES], [s for _, s in CASES]
    for name, tok, split in _variants():
        backend = T._Backend.of(tok)
        backend.verify(tok, texts, starts)
        assert backend.direct and backend.split is split, name
        for max_length in (5, 16, 1000):
            for mode in ("prompt_left", "response_right"):
                got = T.tokenize_texts(tok, texts, starts, max_length, mode, s1 := T.TruncationStats(), fast=True)
                want = T.tokenize_texts(tok, texts, starts, max_length, mode, s2 := T.TruncationStats(), fast=False)
                assert [x.tolist() for x in got[0]] == [x.tolist() for x in want[0]], (name, max_length, mode)
                assert got[1].tolist() == want[1].tolist() and s1 == s2, (name, max_length, mode)


def test_a_wrong_split_is_caught_and_falls_back(monkeypatch, tokenizers):
    """Force the split on byte-level BPE (where it is not exact): the sample check turns it off."""
    tok = tokenizers("gpt2", "plain")
    texts = ["Human: hi\n\nAssistant: water boils at one hundred degrees"] * 3
    starts = [texts[0].index("water")] * 3

    def forced(self):
        self.lead, self.trail = [], []
        return True

    monkeypatch.setattr(T._Backend, "_split_possible", forced)
    # unchecked, the split would change the tokens (so the check below is not vacuous)
    backend = T._Backend.of(tok)
    backend.verified, backend.split = True, True
    unchecked = backend.tokenize(texts, starts, 1000, "prompt_left", T.TruncationStats())
    ref = T._tokenize_reference(tok, texts, starts, 1000, "prompt_left", T.TruncationStats())
    assert [x.tolist() for x in unchecked[0]] != [x.tolist() for x in ref[0]]
    # checked: split off, results the reference's
    backend = T._Backend.of(tok)
    backend.verify(tok, texts, starts)
    assert backend.direct and not backend.split
    for max_length in (6, 1000):
        a = T.tokenize_texts(tok, texts, starts, max_length, "prompt_left", s1 := T.TruncationStats(), fast=True)
        b = T.tokenize_texts(tok, texts, starts, max_length, "prompt_left", s2 := T.TruncationStats(), fast=False)
        assert [x.tolist() for x in a[0]] == [x.tolist() for x in b[0]] and a[1].tolist() == b[1].tolist() and s1 == s2


def test_a_direct_call_that_differs_is_caught_and_falls_back(monkeypatch, tokenizers):
    """If the Rust tokenizer were not in the state tokenizer(...) leaves it in, the sample check notices."""
    tok = tokenizers("bert", "plain")
    texts, starts = [t for t, _ in CASES], [s for _, s in CASES]
    prepare = T._Backend._prepare

    def broken(self):
        prepare(self)
        self.bk.enable_padding(length=200)  # every encoding padded: not what tokenizer(...) gives

    monkeypatch.setattr(T._Backend, "_prepare", broken)
    backend = T._Backend.of(tok)
    backend.verify(tok, texts, starts)
    assert not backend.direct
    got = T.tokenize_texts(tok, texts, starts, 16, "prompt_left", s1 := T.TruncationStats(), fast=True)
    monkeypatch.undo()
    want = T.tokenize_texts(tok, texts, starts, 16, "prompt_left", s2 := T.TruncationStats(), fast=False)
    assert [x.tolist() for x in got[0]] == [x.tolist() for x in want[0]] and got[1].tolist() == want[1].tolist() and s1 == s2


def test_small_calls_use_the_reference_path(monkeypatch, tokenizers):
    monkeypatch.setattr(T, "_MIN_FAST", 256)
    tok = tokenizers("bert", "plain")
    monkeypatch.setattr(T._Backend, "tokenize", lambda *a, **k: pytest.fail("fast path taken for a small call"))
    T.tokenize_texts(tok, ["Human: a\n\nAssistant: b"] * 255, [len("Human: a\n\nAssistant: ")] * 255, 8, "prompt_left",
                     T.TruncationStats(), fast=True)


def test_overridden_call_path_uses_the_reference(tokenizers):
    tok = tokenizers("bert", "plain")
    klass = type(tok)
    sub = type("Custom", (klass,), {"_encode_plus": lambda self, *a, **k: klass._encode_plus(self, *a, **k)})
    tok.__class__ = sub
    try:
        assert T._Backend.of(tok) is None
    finally:
        tok.__class__ = klass
    assert T._Backend.of(tok) is not None


def test_fresh_minilm_with_shipped_truncation_and_padding(tokenizers):
    """MiniLM's tokenizer.json ships truncation and padding (128); the direct path must not use them."""
    tok = _minilm()
    bk = tok.backend_tokenizer
    assert bk.truncation is not None or bk.padding is not None  # as shipped, before any transformers call
    text = "Human: " + "word " * 300 + "\n\nAssistant: " + "answer " * 50
    start = text.index("answer")
    fast = T.tokenize_texts(tok, [text], [start], 1000, "prompt_left", T.TruncationStats(), fast=True)
    ref = T.tokenize_texts(_minilm(), [text], [start], 1000, "prompt_left", T.TruncationStats(), fast=False)
    assert fast[0][0].tolist() == ref[0][0].tolist() and fast[1].tolist() == ref[1].tolist() and fast[1][0] > 300


# ------------------------------------------------------------------ through build_dataset: exclusions, bad rows, rated

ROWS = [
    {"prompt": "the quick brown fox " * 5, "chosen": "water boils", "rejected": "go away"},  # prompt cut
    {"prompt": "hi", "chosen": "water boils at one " * 4 + "paris", "rejected": "water boils at one " * 4 + "france"},
    {"prompt": "hi", "chosen": "same", "rejected": "same"},  # identical texts
    {"prompt": "hi", "chosen": "yes", "rejected": "no", "margin": 2.0, "subset": "s"},
    {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "chosen": [{"role": "assistant", "content": "d"}], "rejected": [{"role": "assistant", "content": "e"}]},
    {"chosen": "Human: hi\n\nAssistant: fine", "rejected": "Human: hi\n\nAssistant: bad"},
]


@pytest.mark.parametrize("kind, template", COMBOS, ids=COMBO_IDS)
def test_build_dataset_counts_identical(monkeypatch, tmp_path, tokenizers, kind, template):
    tok = tokenizers(kind, template)
    f = write_jsonl(tmp_path / "t.jsonl", ROWS[:5] + ['{"prompt": "hi", "chosen": "A"}'])
    g = write_jsonl(tmp_path / "u.jsonl", ROWS[5:] * 3)
    for max_length in (12, 16, 512):
        for mode in ("prompt_left", "response_right"):
            _, rep = _compare_builds(monkeypatch, [f], tok, kind="pairs", max_length=max_length, truncation=mode, skip_bad_rows=True)
            assert rep.skipped_bad_rows == 1 and rep.excluded.get("identical_texts") == 1
            _compare_builds(monkeypatch, [g], tok, kind="pairs", max_length=max_length, truncation=mode)
    r = write_jsonl(tmp_path / "r.jsonl", rated_rows(40))
    _compare_builds(monkeypatch, [r], tok, kind="rated", attributes=["helpfulness", "safety"], max_length=10)


def test_build_dataset_same_error_for_a_too_small_max_length(monkeypatch, tmp_path, tokenizers):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS[:1])
    for kind in ("bert", "llama"):
        tok = tokenizers(kind)
        msgs = []
        for fast in (False, True):
            with pytest.raises(DataError) as e:
                _build(monkeypatch, fast, [f], tok, kind="pairs", max_length=2 if kind == "bert" else 1)
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1]


# ------------------------------------------------------------------ the cache key's tokenizer fingerprint


def test_tokenizer_fingerprint_ignores_call_state_and_sees_real_changes(tokenizers):
    from tokenizers import normalizers

    from rewardforge.data.datasets import _backend_parts, tokenizer_fingerprint

    tok = _minilm()
    assert tok.backend_tokenizer.truncation is not None  # as shipped: reset by the first call
    before = tokenizer_fingerprint(tok)
    tok("hello", truncation=False)
    assert tok.backend_tokenizer.truncation is None
    assert tokenizer_fingerprint(tok) == before == tokenizer_fingerprint(_minilm())
    assert _backend_parts(tok.backend_tokenizer) is not None  # the fast serialization, not the JSON fallback

    tok.chat_template = PLAIN_TEMPLATE
    with_template = tokenizer_fingerprint(tok)
    assert with_template != before
    tok.add_tokens(["<new_token>"])
    with_token = tokenizer_fingerprint(tok)
    assert with_token != with_template
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert tokenizer_fingerprint(tok) != with_token
    prints = {tokenizer_fingerprint(tokenizers(k)) for k in KINDS}
    assert len(prints) == len(KINDS)
