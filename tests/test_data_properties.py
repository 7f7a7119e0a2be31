"""Property-based tests of bad input data (issue 7, "Reliability", bad data), with hypothesis.

For every reader (JSONL, NDJSON, JSON list, JSONL inside a .json, Parquet, each plain and gzipped,
and saved Hugging Face datasets) and every format, generated rows must

* round-trip exactly when valid: every string byte-identical (no stripping, no Unicode
  normalisation), numbers as given, other fields kept in ``extra``, ``where`` = ``file:line``
  (1-based line of a line-based file) or ``file[i]`` (0-based position in a list or table);
* when malformed (invalid JSON, invalid UTF-8, lone surrogates, wrong types, missing fields, empty
  strings, NaN/inf/huge numbers, a key given twice, another format's row, damaged gzip) raise the
  project's :class:`DataError` whose message starts with the row's ``where`` and names the field,
  or, with ``skip_bad_rows``, be skipped and counted exactly while the good rows come through
  unchanged;
* never raise anything but :class:`DataError` (no traceback from inside json, gzip, pyarrow,
  tokenizers), whatever the bytes;
* and, through ``build_dataset``, count chosen == rejected pairs (and duplicates) in the report.

Examples are bounded (``deadline=None``, no example database) so the file stays well under a minute.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st

from rewardforge.data import DataError, TextRenderer, build_dataset, parse_rows, read_rows, setup_template
from rewardforge.data.formats import REQUIRED_FIELDS, ParseReport, PreferencePair, RatedResponse
from rewardforge.models.reward_model import load_tokenizer

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # e.g. numpy overflowing a value to inf

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

EXAMPLES = Counter()  # hypothesis examples run, per test (printed at the end of the module)


SCALE = float(os.environ.get("RF_PROPERTY_SCALE", "1"))  # e.g. 20 for a deeper search than the default run


def _settings(n: int):
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        database=None,  # nothing written into the repository
        # CI runs the same examples every time (RF_PROPERTY_RANDOM=1 explores new ones, as before landing)
        derandomize=os.environ.get("RF_PROPERTY_RANDOM", "0") != "1",
        phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no "explain" phase: it is slow
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module", autouse=True)
def _report_examples():
    yield
    print(f"\nhypothesis examples run: {dict(EXAMPLES)} total={sum(EXAMPLES.values())}")


def count(name: str) -> None:
    EXAMPLES[name] += 1


ATTRS = ["helpfulness", "safety", "verbosity"]
PAIR_FORMATS = ["explicit", "implicit_prompt", "conversational", "nemo_comparison"]
FORMATS = PAIR_FORMATS + ["regression", "nemo_regression"]
KNOWN = {"prompt", "chosen", "rejected", "margin", "text", "label", "labels", "response"}

LINE_READERS = ["jsonl", "jsonl.gz", "ndjson"]
LIST_READERS = ["json", "json.gz"]
TABLE_READERS = ["parquet", "parquet.gz"]
READERS = LINE_READERS + LIST_READERS + ["json_lines"] + TABLE_READERS
JSON_READERS = LINE_READERS + LIST_READERS + ["json_lines"]

# ------------------------------------------------------------------ strategies: text

TRICKY = [
    " ", "  lead", "trail  ", "\t", "\r\n", "\n", "\r", "\n\n", "\u2028", "\u2029", "\u00a0", "\u200b", "\u3000",
    "e\u0301", "\u00e9", "\u212b", "\u00c5", "\u2126", "\ufb01", "\ufeff", "\x00", "\x1c", "\x7f", "\U0001f600",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\u202e", "\\", '"', "\\u0041", "NaN", "null", "{}", "[]",
    "Human", "Assistant:", "</s>", "<|im_end|>", "{{ x }}", "{% raw %}",
]
_chars = st.characters(codec="utf-8")  # every code point but surrogates
_piece = st.one_of(st.text(_chars, min_size=1, max_size=10), st.sampled_from(TRICKY))
text = st.lists(_piece, min_size=1, max_size=4).map("".join)  # non-empty, no normalisation applied


def _no_marker(t: str) -> bool:
    return "\n\nHuman:" not in t and "\n\nAssistant:" not in t


marker_free = text.filter(_no_marker)
content = st.one_of(st.just(""), text)  # a turn inside a conversation may be empty (HH-RLHF has some)
role = st.one_of(st.sampled_from(["user", "assistant", "system"]), text)
message = st.fixed_dictionaries({"role": role, "content": content})
messages = st.lists(message, min_size=1, max_size=3)
FLOAT32_MAX = 3.4028234663852886e38  # margins and labels are stored as float32: larger ones are bad rows
finite = st.one_of(st.floats(-FLOAT32_MAX, FLOAT32_MAX), st.integers(-(10**6), 10**6))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=False, allow_infinity=False), text)
json_value = st.recursive(json_scalar, lambda v: st.one_of(st.lists(v, max_size=3), st.dictionaries(text, v, max_size=3)), max_leaves=6)
extra_key = text.filter(lambda k: k not in KNOWN)


def _msgs(ms):
    return [{"role": m["role"], "content": m["content"]} for m in ms]


# ------------------------------------------------------------------ strategies: rows of each format
#
# Each generator returns (records, expected): ``expected[i]`` is what parsing ``records[i]`` must give
# (for nemo_comparison one expected pair per two records). ``table`` asks for rows a Parquet table can
# hold: one shape per file, numbers as floats, other fields as strings.


@st.composite
def _extras(draw, table: bool, keys=None):
    if table:
        return {k: draw(text) for k in keys}
    return draw(st.dictionaries(extra_key, json_value, max_size=2))


@st.composite
def explicit_rows(draw, n: int, table: bool):
    shape = {k: draw(st.booleans()) for k in ("prompt", "chosen", "rejected")}  # True: message list
    margin_kind = draw(st.sampled_from(["absent", "none", "number"]))
    keys = draw(st.lists(extra_key, max_size=2, unique=True))
    records, expected = [], []
    for _ in range(n):
        if not table:
            shape = {k: draw(st.booleans()) for k in shape}
            margin_kind = draw(st.sampled_from(["absent", "none", "number"]))
        rec, exp = {}, {}
        for name, default_role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
            if shape[name]:
                rec[name] = draw(messages)
                exp[name] = _msgs(rec[name])
            else:
                rec[name] = draw(text)
                exp[name] = [{"role": default_role, "content": rec[name]}]
        for side in ("chosen", "rejected"):  # a side that repeats the prompt's messages is a (tested) error
            assume(not (shape[side] and len(exp[side]) > len(exp["prompt"]) and exp[side][: len(exp["prompt"])] == exp["prompt"]))
        margin = None
        if margin_kind == "none":
            rec["margin"] = None
        elif margin_kind == "number":
            rec["margin"] = margin = float(draw(finite)) if table else draw(finite)
        extra = draw(_extras(table, keys))
        rec.update(extra)
        records.append(rec)
        expected.append(("pair", exp["prompt"], exp["chosen"], exp["rejected"], None if margin is None else float(margin), extra))
    return records, expected


def _hh(turns, lead=""):
    return lead + "".join(f"\n\n{'Human' if r == 'user' else 'Assistant'}: {c}" for r, c in turns)


@st.composite
def implicit_rows(draw, n: int, table: bool):
    keys = draw(st.lists(extra_key, max_size=2, unique=True))
    records, expected = [], []
    for _ in range(n):
        if draw(st.booleans()):  # HH dialogues with turn markers
            hh_content = st.one_of(st.just(""), marker_free)
            shared = draw(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), hh_content), max_size=3))
            shared.append(("user", draw(hh_content)))
            first = draw(hh_content)
            c = [("assistant", first)] + draw(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), hh_content), max_size=2))
            other = draw(hh_content)
            r = [("assistant", other if other != first else first + "!")]  # the responses differ from their first turn
            r += draw(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), hh_content), max_size=2))
            lead = draw(st.one_of(st.just(""), marker_free.filter(lambda t: t.strip())))
            rec = {"chosen": _hh(shared + c, lead), "rejected": _hh(shared + r, lead)}
            sys_msg = [{"role": "system", "content": lead}] if lead else []
            as_msgs = lambda turns: [{"role": ro, "content": co} for ro, co in turns]  # noqa: E731
            exp = ("pair", sys_msg + as_msgs(shared), as_msgs(c), as_msgs(r))
        else:  # raw texts: the shared prefix (backed up to a whitespace boundary) is the prompt
            c, r = draw(marker_free), draw(marker_free)
            rec = {"chosen": c, "rejected": r}
            k = _prefix(c, r)
            exp = ("pair", c[:k], c[k:], r[k:])
        margin = None
        if draw(st.booleans()):
            rec["margin"] = margin = float(draw(finite))
        extra = draw(_extras(table, keys))
        rec.update(extra)
        records.append(rec)
        expected.append(exp + (margin, extra))
    if table:  # one column type per file: every row has the same optional columns
        has_margin = any("margin" in r for r in records)
        for rec, i in zip(records, range(len(records))):
            if has_margin and "margin" not in rec:
                rec["margin"] = None
    return records, expected


def _prefix(a: str, b: str) -> int:
    """The documented raw-text split: the common prefix, backed up to whitespace when it ends mid-word."""
    n = len(os.path.commonprefix([a, b]))
    if 0 < n < min(len(a), len(b)) and not a[n - 1].isspace():
        j = n
        while j > 0 and not a[j - 1].isspace():
            j -= 1
        n = j if j > 0 else n
    return n


@st.composite
def conversational_rows(draw, n: int, table: bool):
    keys = draw(st.lists(extra_key, max_size=2, unique=True))
    records, expected = [], []
    for _ in range(n):
        shared = draw(st.lists(message, max_size=3))
        first = draw(content)
        c = [{"role": "assistant", "content": first}] + draw(st.lists(message, max_size=2))
        other = draw(content)
        r = [{"role": "assistant", "content": other if other != first else first + "!"}] + draw(st.lists(message, max_size=2))
        rec = {"chosen": shared + c, "rejected": shared + r}
        extra = draw(_extras(table, keys))
        rec.update(extra)
        records.append(rec)
        expected.append(("pair", _msgs(shared), _msgs(c), _msgs(r), None, extra))
    return records, expected


@st.composite
def nemo_comparison_rows(draw, n: int, table: bool):
    keys = draw(st.lists(extra_key, max_size=2, unique=True))
    records, expected = [], []
    for _ in range(n):
        p = draw(st.one_of(st.just(""), text))
        a, b = p + draw(text), p + draw(text)
        e1, e2 = draw(_extras(table, keys)), draw(_extras(table, keys))
        records += [{"text": a, **e1}, {"text": b, **e2}]
        k = _prefix(a, b)
        expected.append(("pair", a[:k], a[k:], b[k:], None, {**e1, **e2}))
    return records, expected


@st.composite
def regression_rows(draw, n: int, table: bool):
    prompt_kind = draw(st.sampled_from(["absent", "none", "empty_list", "text", "messages"]))
    response_list = draw(st.booleans())
    keys = draw(st.lists(extra_key, max_size=2, unique=True))
    records, expected = [], []
    for _ in range(n):
        if not table:
            prompt_kind = draw(st.sampled_from(["absent", "none", "empty_list", "text", "messages"]))
            response_list = draw(st.booleans())
        rec = {}
        if prompt_kind == "none":
            rec["prompt"], exp_prompt = None, []
        elif prompt_kind == "empty_list":
            rec["prompt"], exp_prompt = [], []
        elif prompt_kind == "text":
            rec["prompt"] = draw(text)
            exp_prompt = [{"role": "user", "content": rec["prompt"]}]
        elif prompt_kind == "messages":
            rec["prompt"] = draw(messages)
            exp_prompt = _msgs(rec["prompt"])
        else:
            exp_prompt = []
        if response_list:
            rec["response"] = draw(messages)
            exp_response = _msgs(rec["response"])
        else:
            rec["response"] = draw(text)
            exp_response = [{"role": "assistant", "content": rec["response"]}]
        present = draw(st.lists(st.sampled_from(ATTRS), min_size=1, unique=True))
        labels = {a: (float(draw(finite)) if table else draw(finite)) for a in present}
        if not table and draw(st.booleans()):
            labels.update({a: None for a in ATTRS if a not in labels})
        rec["labels"] = labels
        extra = draw(_extras(table, keys))
        rec.update(extra)
        records.append(rec)
        expected.append(("rated", exp_prompt, exp_response, {a: None if labels.get(a) is None else float(labels[a]) for a in ATTRS}, extra))
    return records, expected


@st.composite
def nemo_regression_rows(draw, n: int, table: bool):
    keys = draw(st.lists(extra_key, max_size=2, unique=True))
    records, expected = [], []
    value = st.one_of(finite, st.just(-100), st.just(-100.0))
    for _ in range(n):
        label = draw(st.lists(value, min_size=len(ATTRS), max_size=len(ATTRS)))
        assume(any(v != -100 for v in label))
        if table:
            label = [float(v) for v in label]
        rec = {"text": draw(text), "label": label}
        extra = draw(_extras(table, keys))
        rec.update(extra)
        records.append(rec)
        expected.append(("rated", "", rec["text"], {a: None if v == -100 else float(v) for a, v in zip(ATTRS, label)}, extra))
    return records, expected


GENERATORS = {
    "explicit": explicit_rows, "implicit_prompt": implicit_rows, "conversational": conversational_rows,
    "nemo_comparison": nemo_comparison_rows, "regression": regression_rows, "nemo_regression": nemo_regression_rows,
}


def as_tuple(ex):
    if isinstance(ex, PreferencePair):
        return ("pair", ex.prompt, ex.chosen, ex.rejected, ex.margin, ex.extra)
    assert isinstance(ex, RatedResponse)
    return ("rated", ex.prompt, ex.response, ex.labels, ex.extra)


def same(a, b) -> bool:
    """Equality that also compares the exact types of numbers and strings (1 vs 1.0 vs True) and -0.0."""
    return json.dumps(a, sort_keys=True, allow_nan=True) == json.dumps(b, sort_keys=True, allow_nan=True) and a == b


# ------------------------------------------------------------------ writers


def _dumps(obj, ascii_: bool) -> str:
    try:
        s = json.dumps(obj, ensure_ascii=ascii_)
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:  # a lone surrogate can only be written as a \\u escape
        return json.dumps(obj, ensure_ascii=True)


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def write(reader: str, directory: str, records: list, *, lines: dict[int, bytes] | None = None, style=None):
    """Write ``records`` for ``reader``; return (path, where of each record).

    ``lines`` replaces the encoded bytes of some records (JSON readers) to inject byte-level damage.
    ``style`` (drawn by the caller) picks BOM, CRLF, blank lines, ASCII escaping and indentation.
    """
    style = style or {}
    lines = lines or {}
    name = {"json_lines": "data.json"}.get(reader, f"data.{reader}")
    path = os.path.join(directory, name)
    ascii_ = style.get("ascii", False)
    encoded = [lines.get(i) if i in lines else _dumps(r, ascii_).encode("utf-8") for i, r in enumerate(records)]
    if reader in LINE_READERS or reader == "json_lines":
        eol = b"\r\n" if style.get("crlf") else b"\n"
        out, wheres, lineno = [], [], 0
        for i, line in enumerate(encoded):
            for _ in range(style.get("blank", {}).get(i, 0)):
                out.append(b" \t" + eol)
                lineno += 1
            out.append(line + eol)
            lineno += 1
            wheres.append(f"{path}:{lineno}")
        data = b"".join(out)
    elif reader in LIST_READERS:
        body = b"[" + b",\n ".join(encoded) + b"]"
        if style.get("wrap"):
            body = b'{"data": ' + body + b', "version": 1}'
        data = body
        wheres = [f"{path}[{i}]" for i in range(len(records))]
    else:
        # every row gets every column (pyarrow would take the columns from the first row only)
        columns = list(dict.fromkeys(k for r in records for k in r))
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records]), buf)
        data = buf.getvalue()
        wheres = [f"{path}[{i}]" for i in range(len(records))]
    if style.get("bom") and reader not in TABLE_READERS:
        data = codecs.BOM_UTF8 + data
    if reader.endswith(".gz"):
        data = _gz(data)
    Path(path).write_bytes(data)
    return path, wheres


styles = st.fixed_dictionaries({
    "bom": st.booleans(), "crlf": st.booleans(), "ascii": st.booleans(), "wrap": st.booleans(),
    "blank": st.dictionaries(st.integers(0, 20), st.integers(1, 2), max_size=2),
})


def parse(path, fmt="auto", skip=False, report=None, **kw):
    return list(parse_rows(read_rows(path), fmt, attributes=ATTRS, skip_bad_rows=skip, report=report, **kw))


def _reader_ok(reader: str, fmt: str, n_records: int) -> bool:
    # A .json holding JSON lines needs two lines at least (one object alone is a single-record file).
    return not (reader == "json_lines" and n_records < 2)


# ------------------------------------------------------------------ 1. valid rows round-trip exactly


@_settings(100)
@given(data=st.data())
def test_valid_rows_round_trip_exactly(data):
    count("round_trip")
    reader = data.draw(st.sampled_from(READERS), "reader")
    fmt = data.draw(st.sampled_from(FORMATS), "format")
    table = reader in TABLE_READERS
    records, expected = data.draw(GENERATORS[fmt](data.draw(st.integers(1, 4)), table), "rows")
    assume(_reader_ok(reader, fmt, len(records)))
    style = data.draw(styles, "style")
    with tempfile.TemporaryDirectory() as d:
        path, wheres = write(reader, d, records, style=style)
        for fmt_arg in ("auto", fmt):
            report = ParseReport()
            out = parse(path, fmt_arg, report=report)
            assert report.skipped == {} and report.rows_read == len(records)
            got = [as_tuple(o) for o in out]
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                assert same(g, e), (g, e)
            if fmt == "nemo_comparison":  # "file:1-2" or "file[0]-1"
                seconds = [re.search(r"(\d+)]?$", wheres[2 * i + 1])[1] for i in range(len(out))]
                assert [o.where for o in out] == [f"{wheres[2 * i]}-{n}" for i, n in enumerate(seconds)]
            else:
                assert [o.where for o in out] == wheres


# ------------------------------------------------------------------ 2. bad rows: error naming where + field, or counted skip

WRONG_TEXT = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.just([]), st.just({}),
                       st.lists(st.integers(), min_size=1, max_size=2), st.dictionaries(text, text, min_size=1, max_size=1))
WRONG_NUMBER = st.one_of(text, st.booleans(), st.lists(st.integers(), max_size=2), st.dictionaries(text, st.integers(), max_size=1))
NONFINITE = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]),  # or beyond float32 (it would become inf)
                      st.floats(3.5e38, 1.7e308), st.floats(-1.7e308, -3.5e38), st.just(10**39))
BAD_UTF8 = [b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xc0\x80", b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80\x80"]

TEXT_FIELDS = {
    "explicit": ["prompt", "chosen", "rejected"], "implicit_prompt": ["chosen", "rejected"],
    "conversational": ["chosen", "rejected"], "nemo_comparison": ["text"], "regression": ["prompt", "response"],
    "nemo_regression": ["text"],
}


@st.composite
def corrupt(draw, fmt: str, rec: dict, reader: str, auto: bool, other_rows, index: int = 1):
    """A damaged copy of ``rec``: (record or None, replacement line bytes or None, words the error must contain)."""
    table = reader in TABLE_READERS
    kinds = ["missing", "wrong_type", "empty", "bad_message"]
    if fmt in ("explicit", "implicit_prompt", "conversational", "regression", "nemo_regression"):
        kinds.append("nonfinite")
    if not table:
        kinds += ["surrogate", "duplicate_key", "not_object", "huge_number"]
    if reader in LINE_READERS:
        kinds += ["invalid_json", "invalid_utf8", "bom_inside"]
    if auto and not table:  # (in a table, another format's row would add null columns to every row)
        kinds.append("other_format")
    kind = draw(st.sampled_from(kinds))
    rec = json.loads(json.dumps(rec))  # a deep copy
    line = _dumps(rec, False).encode("utf-8")
    if kind == "missing":
        name = draw(st.sampled_from(REQUIRED_FIELDS[fmt]))
        if table:
            rec[name] = None
        else:
            del rec[name]
        return rec, None, [repr(name)]
    if kind == "wrong_type":
        name = draw(st.sampled_from(TEXT_FIELDS[fmt] + {"regression": ["labels"], "nemo_regression": ["label"]}.get(fmt, [])
                                    + (["margin"] if fmt in ("explicit", "implicit_prompt", "conversational") and not table else [])))
        if table:
            if name == "prompt" and fmt == "regression":
                return draw(corrupt(fmt, rec, reader, False, other_rows, index))  # null is "no prompt" there
            rec[name] = None
        elif name == "margin":
            rec[name] = draw(WRONG_NUMBER)
        elif name == "label":
            rec[name] = draw(st.one_of(text, st.dictionaries(text, st.integers(), max_size=1), st.lists(finite, max_size=2),
                                       st.lists(finite, min_size=4, max_size=5), st.tuples(text, finite, finite).map(list)))
            return rec, None, ["field 'label"]
        elif name == "labels":
            rec[name] = draw(st.one_of(text, st.lists(finite, max_size=2), st.integers(),
                                       st.fixed_dictionaries({draw(st.sampled_from(ATTRS)): WRONG_NUMBER}),
                                       st.fixed_dictionaries({"not_an_attribute": finite})))
            if isinstance(rec[name], dict):
                return rec, None, ["labels" if "not_an_attribute" not in rec[name] else "'not_an_attribute'"]
        elif name == "prompt" and fmt == "regression":
            rec[name] = draw(WRONG_TEXT.filter(lambda v: v is not None and v != []))
        elif fmt == "implicit_prompt" and name in ("chosen", "rejected"):
            # a list would make the row a conversational one, whose error then names the other side
            rec[name] = draw(WRONG_TEXT.filter(lambda v: not isinstance(v, list)))
        else:
            rec[name] = draw(WRONG_TEXT)
        return rec, None, [repr(name)]
    if kind == "empty":
        name = draw(st.sampled_from(TEXT_FIELDS[fmt]))
        if table and isinstance(rec.get(name), list):  # a column holds lists or strings, not both
            if fmt == "regression" and name == "prompt":
                return rec, None, None  # an empty message list is "no prompt" there
            rec[name] = []
        else:
            rec[name] = ""
        return rec, None, [repr(name), "empty"]
    if kind == "bad_message":
        lists = [k for k in ("prompt", "chosen", "rejected", "response") if isinstance(rec.get(k), list) and rec[k]]
        if not lists:
            return draw(corrupt(fmt, rec, reader, auto, other_rows, index))
        name = draw(st.sampled_from(lists))
        i = draw(st.integers(0, len(rec[name]) - 1))
        part = draw(st.sampled_from(["role", "content"]))
        if table:
            rec[name][i][part] = None
        else:
            how = draw(st.sampled_from(["delete", "wrong", "not_a_dict"]))
            if how == "delete":
                del rec[name][i][part]
            elif how == "wrong":
                rec[name][i][part] = draw(WRONG_TEXT.filter(lambda v: not isinstance(v, str)))
            else:
                rec[name][i] = draw(st.one_of(text, st.integers(), st.none()))
        if fmt == "regression" and name == "prompt" and rec[name] == []:
            return rec, None, None
        return rec, None, [repr(name)]
    if kind == "nonfinite":
        bad = draw(NONFINITE)
        if fmt == "regression":
            a = draw(st.sampled_from(ATTRS))
            rec["labels"][a] = bad
            return rec, None, [f"labels.{a}"]
        if fmt == "nemo_regression":
            i = draw(st.integers(0, len(ATTRS) - 1))
            rec["label"][i] = bad
            return rec, None, [f"label[{i}]"]
        rec["margin"] = bad
        return rec, None, ["'margin'"]
    if kind == "huge_number":  # written by hand: json.dumps refuses integers of more than 4300 digits
        digits = draw(st.sampled_from([400, 5000]))
        placeholder = "__BIG__"
        if fmt == "regression":
            rec["labels"][ATTRS[0]] = placeholder
            field = "labels"
        elif fmt == "nemo_regression":
            rec["label"][0] = placeholder
            field = "label"
        elif fmt == "nemo_comparison":
            rec["text"] = placeholder
            field = "'text'"
        else:
            rec["margin"] = placeholder
            field = "'margin'"
        line = _dumps(rec, True).replace(json.dumps(placeholder), "9" * digits).encode()
        # (a string field holding a 400-digit integer is simply of the wrong type)
        return None, line, [field] + (["digits"] if digits > 400 or fmt != "nemo_comparison" else [])
    if kind == "surrogate":
        name = draw(st.sampled_from(TEXT_FIELDS[fmt]))
        value = rec.get(name)
        if isinstance(value, list):
            if not value:
                return draw(corrupt(fmt, rec, reader, auto, other_rows, index))
            value[0]["content"] = value[0]["content"] + "\ud800"
        else:
            rec[name] = (value if isinstance(value, str) else "x") + draw(st.sampled_from(["\ud800", "\udfff", "\udc80x"]))
        return rec, None, [repr(name), "surrogate"]
    if kind == "duplicate_key":
        name = draw(st.sampled_from(sorted(rec)))
        line = b'{' + json.dumps(name).encode() + b': "first", ' + line[1:]
        return None, line, [repr(name), "twice"]
    if kind == "not_object":
        v = draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), text, st.none()))
        return v, None, ["JSON object"]
    if kind == "invalid_json":
        how = draw(st.sampled_from(["cut", "garbage", "nul"]))
        if how == "cut":
            line = line[: draw(st.integers(1, len(line) - 1))]
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:  # cut inside a multi-byte character
                return None, line, ["not valid UTF-8"]
        elif how == "garbage":
            line = line + draw(st.sampled_from([b"x", b",", b"}", b"{"]))
        else:
            line = b"\x00" * draw(st.integers(1, 3))
        return None, line, ["invalid JSON"]
    if kind == "invalid_utf8":
        at = draw(st.integers(0, len(line)))
        return None, line[:at] + draw(st.sampled_from(BAD_UTF8)) + line[at:], ["not valid UTF-8"]
    if kind == "bom_inside":  # a BOM in the middle of a file (e.g. files concatenated) is not stripped
        if index == 0:
            return None, None, None  # at the very start it is, and the row is fine
        return None, codecs.BOM_UTF8 + line, ["invalid JSON", "BOM"]
    assert kind == "other_format"
    return draw(st.sampled_from(other_rows)), None, ["format"]


@_settings(100)
@given(data=st.data())
def test_bad_rows_raise_a_named_error_or_are_skipped_and_counted(data):
    count("bad_rows")
    reader = data.draw(st.sampled_from(READERS), "reader")
    fmt = data.draw(st.sampled_from(FORMATS), "format")
    table = reader in TABLE_READERS
    records, expected = data.draw(GENERATORS[fmt](data.draw(st.integers(2, 5)), table), "rows")
    assume(_reader_ok(reader, fmt, len(records)))
    auto = data.draw(st.booleans(), "auto")
    # With format auto the first row decides the file's format, so it stays good there.
    bad_idx = sorted(data.draw(st.sets(st.integers(1 if auto else 0, len(records) - 1), min_size=1, max_size=3), "bad rows"))
    others = []
    for other in FORMATS:
        if other != fmt and {other, fmt} != {"implicit_prompt", "conversational"}:
            others += data.draw(GENERATORS[other](1, False))[0]
    lines, must = {}, {}
    bad_records = list(records)
    for i in bad_idx:
        rec, line, words = data.draw(corrupt(fmt, records[i], reader, auto, others, i), f"corruption of row {i}")
        if words is None:  # the damage happened to leave a valid row
            assume(False)
        if line is not None:
            lines[i] = line
        else:
            bad_records[i] = rec
        must[i] = words
    with tempfile.TemporaryDirectory() as d:
        try:
            path, wheres = write(reader, d, bad_records, lines=lines)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            assume(False)  # a table cannot hold these mixed types (that is Parquet's rule, not ours)
        fmt_arg = "auto" if auto else fmt
        with pytest.raises(DataError) as e:
            parse(path, fmt_arg)
        msg = str(e.value)
        first = bad_idx[0]
        note(msg)
        assert msg.startswith(wheres[first] + ": "), (msg, wheres[first])
        for w in must[first]:
            assert w in msg, (w, msg)

        report = ParseReport()
        out = parse(path, fmt_arg, skip=True, report=report)
        if fmt == "nemo_comparison":
            bad_pairs = sorted({i // 2 for i in bad_idx})
            good = [p for p in range(len(expected)) if p not in bad_pairs]
            assert sum(report.skipped.values()) == 2 * len(bad_pairs)
            assert report.rows_read == 2 * len(out) + sum(report.skipped.values())
        else:
            good = [i for i in range(len(records)) if i not in bad_idx]
            assert sum(report.skipped.values()) == len(bad_idx)
            assert report.rows_read == len(out) + len(bad_idx)
        assert [m.split(": ", 1)[0] for m in report.examples if "other line of its NeMo" not in m] == [wheres[i] for i in bad_idx]
        got = [as_tuple(o) for o in out]
        assert len(got) == len(good)
        for g, i in zip(got, good):
            assert same(g, expected[i]), (g, expected[i])


# ------------------------------------------------------------------ 3. mixed formats in one file


@_settings(40)
@given(data=st.data())
def test_mixed_formats_in_one_file(data):
    count("mixed_formats")
    reader = data.draw(st.sampled_from(JSON_READERS), "reader")
    a, b = data.draw(st.sampled_from([(x, y) for x in FORMATS for y in FORMATS if x != y and {x, y} != {"implicit_prompt", "conversational"}]), "formats")
    ra, ea = data.draw(GENERATORS[a](2, False))
    rb, _ = data.draw(GENERATORS[b](2, False))
    records = ra + rb  # first the rows of one format, then another's
    with tempfile.TemporaryDirectory() as d:
        path, wheres = write(reader, d, records)
        with pytest.raises(DataError) as e:
            parse(path)
        msg = str(e.value)
        assert msg.startswith(wheres[len(ra)] + ": ") and f"format {a!r}" in msg and "one format" in msg, msg
        report = ParseReport()
        out = parse(path, skip=True, report=report)
        assert sum(report.skipped.values()) == len(rb) and report.rows_read == len(records)
        assert [as_tuple(o) for o in out] == ea


def test_implicit_and_conversational_rows_may_alternate(tmp_path):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
            {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}]
    for order in (rows, rows[::-1]):
        path, _ = write("jsonl", str(tmp_path), order)
        out = parse(path)
        assert [(o.prompt, o.chosen, o.rejected) for o in out] == [([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yes"}], [{"role": "assistant", "content": "no"}])] * 2


# ------------------------------------------------------------------ 4. whole-file damage: invalid JSON, damaged gzip


@_settings(50)
@given(data=st.data())
def test_invalid_json_file_is_one_clear_error(data):
    count("invalid_json_file")
    reader = data.draw(st.sampled_from(LIST_READERS), "reader")
    fmt = data.draw(st.sampled_from(FORMATS), "format")
    records, expected = data.draw(GENERATORS[fmt](data.draw(st.integers(1, 3)), False), "rows")
    with tempfile.TemporaryDirectory() as d:
        path, _ = write(reader, d, records)
        raw = Path(path).read_bytes()
        raw = gzip.decompress(raw) if reader.endswith(".gz") else raw
        how = data.draw(st.sampled_from(["cut", "insert", "invalid_utf8"]), "damage")
        at = data.draw(st.integers(1, len(raw) - 1), "at")
        if how == "cut":
            damaged = raw[:at]
        elif how == "insert":
            damaged = raw[:at] + data.draw(st.sampled_from([b",", b"]", b"{", b"x", b'"', b"\n{}\n"])) + raw[at:]
        else:
            damaged = raw[:at] + data.draw(st.sampled_from(BAD_UTF8)) + raw[at:]
        Path(path).write_bytes(_gz(damaged) if reader.endswith(".gz") else damaged)
        for skip in (False, True):
            try:
                out = parse(path, fmt, skip=skip)
            except DataError as e:
                assert str(e).startswith(path), str(e)
                if how == "invalid_utf8":
                    assert "not valid UTF-8" in str(e) and "line" in str(e)
                continue
            # The damage left valid JSON (say "x" inserted into a string): that is different data, not
            # damage any reader could see; only the absence of any other exception is checked here.
            assert isinstance(out, list)


def _jsonl_gz(records) -> tuple[bytes, list[bytes]]:
    lines = [_dumps(r, False).encode() + b"\n" for r in records]
    return _gz(b"".join(lines)), lines


@_settings(50)
@given(data=st.data())
def test_truncated_gzip(data):
    count("truncated_gzip")
    reader = data.draw(st.sampled_from(["jsonl.gz", "json.gz", "parquet.gz"]), "reader")
    fmt = data.draw(st.sampled_from(["explicit", "regression"]), "format")
    records, expected = data.draw(GENERATORS[fmt](data.draw(st.integers(1, 15)), reader == "parquet.gz"), "rows")
    with tempfile.TemporaryDirectory() as d:
        path, wheres = write(reader, d, records)
        blob = Path(path).read_bytes()
        cut = data.draw(st.integers(2, len(blob) - 1), "cut")  # (one byte is not even a gzip header: "not a gzip file")
        Path(path).write_bytes(blob[:cut])
        # A cut stream cannot be told from one damaged into ending early, so no reader yields any of its rows.
        for skip in (False, True):
            with pytest.raises(DataError, match="ends early|truncated|cannot read Parquet|corrupt") as e:
                parse(path, fmt, skip=skip)
            assert str(e.value).startswith(path)


@_settings(60)
@given(data=st.data())
def test_corrupted_gzip_is_an_error_never_changed_rows(data):
    count("corrupted_gzip")
    reader = data.draw(st.sampled_from(["jsonl.gz", "json.gz", "parquet.gz"]), "reader")
    records, expected = data.draw(explicit_rows(data.draw(st.integers(1, 20)), reader == "parquet.gz"), "rows")
    with tempfile.TemporaryDirectory() as d:
        path, _ = write(reader, d, records)
        blob = bytearray(Path(path).read_bytes())
        flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)), min_size=1, max_size=3), "flips")
        for at, mask in flips:
            blob[at] ^= mask
        Path(path).write_bytes(bytes(blob))
        for skip in (False, True):
            report = ParseReport()
            try:
                out = parse(path, "explicit", skip=skip, report=report)
            except DataError as e:
                assert str(e).startswith(path)
                continue
            got = [as_tuple(o) for o in out]
            # Undetected damage (e.g. in the gzip header's timestamp) must leave the rows as they were;
            # detected damage at a line is counted, and the rows before it are the original ones.
            assert got == expected[: len(got)]
            assert len(got) == len(expected) or sum(report.skipped.values()) >= 1


def test_not_gzip_and_directories_are_clear_errors(tmp_path):
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"plain\.jsonl\.gz: is not a gzip file .*remove the \.gz"):
        parse(str(plain))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"dir\.jsonl' is a directory"):
        parse(str(tmp_path / "dir.jsonl"))
    upper = tmp_path / "UP.JSONL.GZ"
    upper.write_bytes(_gz(b'{"prompt": "p", "chosen": "a", "rejected": 5}\n'))
    with pytest.raises(DataError, match=r"UP\.JSONL\.GZ:1: field 'rejected'"):
        parse(str(upper))


# ------------------------------------------------------------------ 5. encoding


@_settings(40)
@given(data=st.data())
def test_parquet_invalid_utf8_cell_names_row_and_field(data):
    count("parquet_utf8")
    records, expected = data.draw(explicit_rows(data.draw(st.integers(2, 5)), True), "rows")
    records = [{**r, "prompt": r["prompt"] if isinstance(r["prompt"], str) else "p"} for r in records]
    expected = [(e[0], [{"role": "user", "content": records[i]["prompt"]}]) + e[2:] for i, e in enumerate(expected)]
    bad = data.draw(st.integers(0, len(records) - 1), "bad row")
    junk = data.draw(st.sampled_from(BAD_UTF8), "junk")
    values = [r["prompt"].encode() for r in records]
    values[bad] += junk
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    col = pa.Array.from_buffers(pa.string(), len(values), [None, pa.array(offsets, pa.int32()).buffers()[1], pa.py_buffer(b"".join(values))])
    table = pa.Table.from_pylist(records)
    table = table.set_column(table.column_names.index("prompt"), "prompt", col)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "u.parquet")
        pq.write_table(table, path)
        with pytest.raises(DataError, match=r"\[\d+\]: field 'prompt' is not valid UTF-8") as e:
            parse(path, "explicit")
        assert str(e.value).startswith(f"{path}[{bad}]: ")
        report = ParseReport()
        out = parse(path, "explicit", skip=True, report=report)
        assert report.skipped == {"bad_row": 1}
        assert [as_tuple(o) for o in out] == [e for i, e in enumerate(expected) if i != bad]


def test_bom_crlf_and_blank_lines_are_not_data(tmp_path):
    rec = {"prompt": " p\r\n", "chosen": "\ufeffa", "rejected": "b\u2028"}
    f = tmp_path / "b.jsonl"
    f.write_bytes(codecs.BOM_UTF8 + b"\r\n \t\r\n" + json.dumps(rec, ensure_ascii=False).encode() + b"\r\n\n")
    (ex,) = parse(str(f))
    assert ex.where == f"{f}:3"
    assert (ex.prompt[0]["content"], ex.chosen[0]["content"], ex.rejected[0]["content"]) == (" p\r\n", "\ufeffa", "b\u2028")
    # Only JSON's own whitespace makes a blank line: a line holding a no-break space is a bad row.
    f.write_bytes(json.dumps(rec).encode() + b"\n\xc2\xa0\n")
    with pytest.raises(DataError, match=r"b\.jsonl:2: invalid JSON"):
        parse(str(f))


# ------------------------------------------------------------------ 6. huge strings


@_settings(8)
@given(data=st.data())
def test_huge_strings_round_trip(data, tok):
    count("huge_strings")
    reader = data.draw(st.sampled_from(READERS), "reader")
    unit = data.draw(text, "unit")
    size = data.draw(st.sampled_from([1 << 20, 2 << 20]), "size")
    big = (unit * (size // len(unit.encode()) + 1))
    rec = {"prompt": big, "chosen": "short " + unit, "rejected": big + "!"}
    with tempfile.TemporaryDirectory() as d:
        path, _ = write(reader, d, [rec, {"prompt": "p", "chosen": "a", "rejected": "b"}])
        out = parse(path)
        assert out[0].prompt[0]["content"] == big and out[0].rejected[0]["content"] == big + "!"
        if reader in ("jsonl", "parquet") and size == 1 << 20:  # the tokenizer copes too: truncated, counted, never dropped
            ds, rep = build_dataset([path], tok, kind="pairs", cache_dir="none", max_length=64)
            assert rep.examples == 2 and all(len(x) <= 64 for x in ds.chosen + ds.rejected)
            assert rep.truncation["truncated_prompt"] >= 2


# ------------------------------------------------------------------ 7. exclusion report: chosen == rejected, duplicates


@pytest.fixture(scope="module")
def tok(tiny_model):
    t = load_tokenizer(str(tiny_model("gpt2")))
    setup_template(t, "auto")
    return t


@_settings(30)
@given(data=st.data())
def test_identical_pairs_are_counted_in_the_exclusion_report(data, tok):
    count("identical_pairs")
    fmt = data.draw(st.sampled_from(PAIR_FORMATS), "format")
    records, expected = data.draw(GENERATORS[fmt](data.draw(st.integers(1, 4)), False), "rows")
    n_same = data.draw(st.integers(1, 3), "identical rows")
    same_rows = []
    for _ in range(n_same):
        if fmt == "nemo_comparison":
            t = data.draw(text)
            same_rows += [{"text": t}, {"text": t}]
        else:
            src = records[data.draw(st.integers(0, len(records) - 1))]
            same_rows.append({**src, "rejected": src["chosen"]})
    renderer = TextRenderer(tok)
    # generated rows whose two sides render the same (e.g. roles "user" and "Human") count too
    identical = sum(1 for e in expected if renderer.render(e[1], e[2]) == renderer.render(e[1], e[3]))
    with tempfile.TemporaryDirectory() as d:
        path, _ = write("jsonl", d, records + same_rows)
        ds, rep = build_dataset([path], tok, kind="pairs", cache_dir="none", max_length=4096)
        assert rep.excluded.get("identical_texts", 0) == n_same + identical
        assert rep.skipped_bad_rows == 0
        assert rep.examples == len(expected) - identical - rep.excluded.get("identical_after_truncation", 0)


def test_duplicate_pairs_are_counted_in_the_exclusion_report(tmp_path, tok):
    row = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    path, _ = write("jsonl", str(tmp_path), [row, {"prompt": "Yo", "chosen": "A", "rejected": "B"}, dict(row)])
    ds, rep = build_dataset([path], tok, kind="pairs", cache_dir="none")
    assert rep.rows_read == 3
    assert rep.excluded == {"duplicate_pairs": 1} and rep.examples == 2
    kept, rep2 = build_dataset([path], tok, kind="pairs", cache_dir="none", drop_duplicates=False)
    assert rep2.excluded == {} and rep2.examples == 3  # kept when asked, never silently


# ------------------------------------------------------------------ 8. nothing but DataError, whatever the input


record_like = st.one_of(
    json_value,
    st.dictionaries(st.one_of(st.sampled_from(sorted(KNOWN)), text), json_value, max_size=5),
    st.dictionaries(st.sampled_from(sorted(KNOWN)), st.one_of(json_value, messages, st.lists(json_value, max_size=3)), max_size=5),
)


@_settings(100)
@given(data=st.data())
def test_any_json_rows_give_examples_or_data_errors_and_every_row_is_accounted_for(data, tok):
    count("any_json_rows")
    records = data.draw(st.lists(record_like, min_size=1, max_size=6), "records")
    fmt = data.draw(st.sampled_from(["auto"] + FORMATS), "format")
    reader = data.draw(st.sampled_from(LINE_READERS + LIST_READERS), "reader")
    with tempfile.TemporaryDirectory() as d:
        path, _ = write(reader, d, records)
        for skip in (False, True):
            report = ParseReport()
            try:
                out = parse(path, fmt, skip=skip, report=report)
            except DataError as e:
                assert not skip, str(e)  # with skip_bad_rows every bad row is skipped, none stops the run
                assert str(e).startswith(path), str(e)
                continue
            # every row read is an example (a NeMo comparison pair uses two), or a counted skip
            used = sum(2 if re.search(r"(:\d+|\[\d+\])-\d+$", o.where) else 1 for o in out)
            assert report.rows_read == len(records) == used + sum(report.skipped.values())
        kind = data.draw(st.sampled_from(["pairs", "rated"]), "kind")
        try:
            build_dataset([path], tok, kind=kind, fmt=fmt, attributes=ATTRS if kind == "rated" else None,
                          cache_dir="none", skip_bad_rows=data.draw(st.booleans(), "skip"))
        except DataError:
            pass


@_settings(60)
@given(raw=st.one_of(st.binary(max_size=300), st.sampled_from([b"", b"\x1f\x8b", b"PAR1", b"PAR1\x00\x00PAR1", b"[", b"{}", b"null"])),
       reader=st.sampled_from(READERS))
def test_any_bytes_give_rows_or_data_errors(raw, reader):
    count("any_bytes")
    with tempfile.TemporaryDirectory() as d:
        path, _ = write(reader, d, [])
        Path(path).write_bytes(raw)
        for skip in (False, True):
            try:
                parse(path, "auto", skip=skip)
            except DataError as e:
                assert str(e).startswith(path) or path in str(e)


# ------------------------------------------------------------------ 9. field_map never loses a field


@_settings(30)
@given(a=text, b=text, c=text)
def test_field_map_swaps_and_refuses_to_overwrite(tmp_path_factory, a, b, c):
    count("field_map")
    d = tmp_path_factory.mktemp("fm")
    path, wheres = write("jsonl", str(d), [{"prompt": a, "chosen": b, "rejected": c}])
    (ex,) = parse(path, field_map={"chosen": "rejected", "rejected": "chosen"})  # swap two columns
    assert (ex.chosen[0]["content"], ex.rejected[0]["content"]) == (c, b)
    path, wheres = write("jsonl", str(d), [{"prompt": a, "question": b, "chosen": c, "rejected": c + "!"}])
    with pytest.raises(DataError, match=r"renames field 'question' to 'prompt', but the row also has a field 'prompt'") as e:
        parse(path, field_map={"prompt": "question"})
    assert str(e.value).startswith(wheres[0] + ": ")
    report = ParseReport()
    assert parse(path, field_map={"prompt": "question"}, skip=True, report=report) == [] and report.skipped == {"bad_row": 1}


# ------------------------------------------------------------------ 10. saved Hugging Face datasets


@_settings(5)
@given(data=st.data())
def test_hf_dataset_dir_round_trip_and_bad_rows(data):
    count("hf_dataset")
    import datasets

    records, expected = data.draw(explicit_rows(3, True), "rows")
    # (datasets itself cannot save a column named, say, "\x00": keep other fields to plain names)
    records = [{k: v for k, v in r.items() if k in KNOWN or k.isidentifier()} for r in records]
    expected = [e[:5] + ({k: v for k, v in e[5].items() if k.isidentifier()},) for e in expected]
    records[1]["chosen"] = "" if isinstance(records[1]["chosen"], str) else []
    with tempfile.TemporaryDirectory() as d:
        datasets.Dataset.from_list(records).save_to_disk(os.path.join(d, "ds"))
        path = os.path.join(d, "ds")
        with pytest.raises(DataError, match=r"ds:train\[1\]: field 'chosen'"):
            parse(path, "explicit")
        report = ParseReport()
        out = parse(path, "explicit", skip=True, report=report)
        assert report.skipped == {"bad_row": 1}
        assert [as_tuple(o) for o in out] == [expected[0], expected[2]]
