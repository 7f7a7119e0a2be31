"""Row formats, auto-detection, readers (JSON/JSONL/gzip/Parquet/HF datasets) and bad-row errors."""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl

from rewardforge.data import DataError, build_dataset, detect_format, parse_rows, read_rows, setup_template
from rewardforge.data.formats import ParseReport, RatedResponse
from rewardforge.data.readers import Row
from rewardforge.models.reward_model import load_tokenizer

HH_CHOSEN = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water."
HH_REJECTED = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How do I boil an egg?\n\nAssistant: Go away."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def rows(records, source="f.jsonl"):
    return [Row(r, source, i + 1) for i, r in enumerate(records)]


def parse(records, fmt="auto", **kw):
    return list(parse_rows(rows(records), fmt, **kw))


@pytest.fixture(scope="module")
def tok(tiny_model):
    """The tiny GPT-2 tokenizer with rewardforge's plain Human:/Assistant: template installed."""
    t = load_tokenizer(str(tiny_model("gpt2")))
    assert setup_template(t, "auto") == "plain"
    return t


def pairs_ds(paths, tok, **kw):
    return build_dataset([str(p) for p in paths], tok, kind="pairs", cache_dir="none", **kw)


def rated_ds(paths, tok, attributes, **kw):
    return build_dataset([str(p) for p in paths], tok, kind="rated", attributes=attributes, cache_dir="none", **kw)


def texts(tok, seqs):
    return [tok.decode(s) for s in seqs]


# ------------------------------------------------------------------ formats


def test_explicit_string_prompt_keeps_margin_and_extra():
    (ex,) = parse([{"prompt": "Hi", "chosen": "A", "rejected": "B", "margin": 2, "subset": "rude", "id": 7}])
    assert ex.prompt == [user("Hi")]
    assert ex.chosen == [assistant("A")] and ex.rejected == [assistant("B")]
    assert ex.margin == 2.0 and isinstance(ex.margin, float)
    assert ex.extra == {"subset": "rude", "id": 7}
    assert ex.where == "f.jsonl:1"
    (no_margin,) = parse([{"prompt": "Hi", "chosen": "A", "rejected": "B", "margin": None}])
    assert no_margin.margin is None and no_margin.extra == {}


def test_explicit_message_list_prompt():
    prompt = [{"role": "system", "content": "Be kind."}, user("Hi")]
    (ex,) = parse([{"prompt": prompt, "chosen": "A", "rejected": [assistant("B")]}])
    assert ex.prompt == prompt
    assert ex.chosen == [assistant("A")] and ex.rejected == [assistant("B")]


def test_explicit_rendered_texts(tmp_path, tok):
    f = write_jsonl(tmp_path / "e.jsonl", [
        {"prompt": "Hi", "chosen": "A", "rejected": "B"},
        {"prompt": [{"role": "system", "content": "Be kind."}, user("Hi")], "chosen": "A", "rejected": [assistant("B")]},
    ])
    ds, rep = pairs_ds([f], tok)
    assert texts(tok, ds.chosen) == ["Human: Hi\n\nAssistant: A", "System: Be kind.\n\nHuman: Hi\n\nAssistant: A"]
    assert texts(tok, ds.rejected) == ["Human: Hi\n\nAssistant: B", "System: Be kind.\n\nHuman: Hi\n\nAssistant: B"]
    # the prompt key (validation split) is the same for both sides and differs between prompts
    assert len(set(ds.prompt_keys)) == 2


def test_implicit_prompt_hh_splits_at_last_shared_assistant_turn():
    (ex,) = parse([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    assert ex.prompt == [user("Hi"), assistant("Hello"), user("How do I boil an egg?")]
    assert ex.chosen == [assistant("Put it in boiling water.")]
    assert ex.rejected == [assistant("Go away.")]


def test_implicit_prompt_pairs_differing_only_in_earlier_turns():
    c = "\n\nHuman: Hi\n\nAssistant: Hello there\n\nHuman: Egg?\n\nAssistant: Boil it."
    r = "\n\nHuman: Hi\n\nAssistant: Go away\n\nHuman: Egg?\n\nAssistant: Boil it."
    (ex,) = parse([{"chosen": c, "rejected": r}])
    # The last turns are equal, but the dialogues split where they first differ: after the first user turn.
    assert ex.prompt == [user("Hi")]
    assert ex.chosen == [assistant("Hello there"), user("Egg?"), assistant("Boil it.")]
    assert ex.rejected == [assistant("Go away"), user("Egg?"), assistant("Boil it.")]


def test_implicit_prompt_identical_pair_parses_then_is_excluded(tmp_path, tok):
    (ex,) = parse([{"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}])
    assert ex.chosen == ex.rejected == [assistant("Put it in boiling water.")]
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    ds, rep = pairs_ds([f], tok)
    assert len(ds) == 1 and rep.excluded == {"identical_texts": 1}
    assert rep.rows_read == 2 and rep.examples == 1
    # The rendered text is the dialogue itself (plain template == HH-RLHF turns).
    assert texts(tok, ds.chosen) == [HH_CHOSEN.lstrip("\n")]
    assert texts(tok, ds.rejected) == [HH_REJECTED.lstrip("\n")]


def test_implicit_prompt_without_turn_markers_uses_common_prefix():
    (ex,) = parse([{"chosen": "Q: why? A: because", "rejected": "Q: why? A: no idea"}])
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Q: why? A: ", "because", "no idea")


def test_conversational():
    c = [user("Hi"), assistant("Hello!")]
    r = [user("Hi"), assistant("Go away.")]
    (ex,) = parse([{"chosen": c, "rejected": r, "margin": 0.5}])
    assert ex.prompt == [user("Hi")] and ex.chosen == [assistant("Hello!")] and ex.rejected == [assistant("Go away.")]
    assert ex.margin == 0.5


def test_nemo_comparison_consecutive_lines():
    recs = [{"text": "Q1 A: good"}, {"text": "Q1 A: bad"}, {"text": "Q2 A: yes", "id": 3}, {"text": "Q2 A: no", "id": 4}]
    out = parse(recs)
    assert [(e.prompt, e.chosen, e.rejected) for e in out] == [("Q1 A: ", "good", "bad"), ("Q2 A: ", "yes", "no")]
    assert [e.where for e in out] == ["f.jsonl:1-2", "f.jsonl:3-4"]
    assert out[1].extra == {"id": 4}


def test_nemo_comparison_odd_line_count():
    recs = [{"text": "Q1 good"}, {"text": "Q1 bad"}, {"text": "Q2 lonely"}]
    with pytest.raises(DataError, match=r"f\.jsonl:3: NeMo comparison data needs an even number of lines"):
        parse(recs)
    report = ParseReport()
    out = list(parse_rows(rows(recs), skip_bad_rows=True, report=report))
    assert len(out) == 1 and report.rows_read == 3 and report.skipped == {"bad_row": 1}


def test_nemo_comparison_odd_first_file_is_not_dropped_silently():
    a = rows([{"text": "Q1 good"}, {"text": "Q1 bad"}, {"text": "Q2 lonely"}], "a.jsonl")
    b = rows([{"text": "Q3 good"}, {"text": "Q3 bad"}], "b.jsonl")
    with pytest.raises(DataError, match=r"a\.jsonl:3: NeMo comparison data needs an even number of lines"):
        list(parse_rows(a + b))


def test_nemo_comparison_bad_line_skips_its_partner_not_the_alignment():
    recs = [{"text": f"Q{i // 2} " + ("good" if i % 2 == 0 else "bad")} for i in range(6)]
    recs[3] = {"txt": "Q1 bad"}  # second line of the second pair is malformed
    report = ParseReport()
    out = list(parse_rows(rows(recs), skip_bad_rows=True, report=report))
    # Pairs (1,2) and (5,6) survive intact; line 3 goes with its bad partner; nothing is mis-paired.
    assert [(e.prompt, e.chosen, e.rejected, e.where) for e in out] == [
        ("Q0 ", "good", "bad", "f.jsonl:1-2"),
        ("Q2 ", "good", "bad", "f.jsonl:5-6"),
    ]
    assert report.rows_read == 6 and report.skipped == {"bad_row": 2}
    assert report.examples[0].startswith("f.jsonl:4: missing field 'text'")
    assert report.examples[1].startswith("f.jsonl:3: skipped because the other line")
    # A bad first line takes the second one with it too.
    recs[3] = {"text": "Q1 bad"}
    recs[2] = {"text": 5}
    report = ParseReport()
    out = list(parse_rows(rows(recs), skip_bad_rows=True, report=report))
    assert [e.where for e in out] == ["f.jsonl:1-2", "f.jsonl:5-6"] and report.skipped == {"bad_row": 2}


def test_regression_rows():
    (ex,) = parse(
        [{"prompt": "p", "response": "r", "labels": {"helpfulness": 3, "safety": None}, "source": "x"}],
        attributes=["helpfulness", "safety", "verbosity"],
    )
    assert isinstance(ex, RatedResponse)
    assert ex.prompt == [user("p")] and ex.response == [assistant("r")]
    assert ex.labels == {"helpfulness": 3.0, "safety": None, "verbosity": None}
    assert ex.extra == {"source": "x"}


def test_nemo_regression_minus_100_is_missing():
    attrs = ["helpfulness", "safety"]
    (ex,) = parse([{"text": "Human: hi Assistant: yo", "label": [2.5, -100]}], attributes=attrs)
    assert ex.prompt == "" and ex.response == "Human: hi Assistant: yo"
    assert ex.labels == {"helpfulness": 2.5, "safety": None}
    (single,) = parse([{"text": "t", "label": 4}], attributes=["score"])  # scalar label, one attribute
    assert single.labels == {"score": 4.0}
    with pytest.raises(DataError, match=r"f\.jsonl:1: every label is missing; a row needs at least one of \['helpfulness', 'safety'\]"):
        parse([{"text": "t", "label": [-100, -100]}], attributes=attrs)
    with pytest.raises(DataError, match=r"f\.jsonl:1: field 'label' must be a list of 2 numbers"):
        parse([{"text": "t", "label": [1, 2, 3]}], attributes=attrs)
    with pytest.raises(DataError, match=r"model\.attributes is empty"):
        parse([{"text": "t", "label": [1]}])


def test_rated_build_dataset_labels_nan_where_missing(tmp_path, tok):
    f = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p", "response": "r", "labels": {"helpfulness": 3}},
        {"prompt": "q", "response": "s", "labels": {"safety": 1.5}},
    ])
    ds, rep = rated_ds([f], tok, ["helpfulness", "safety"])
    assert rep.examples == 2 and ds.attributes == ["helpfulness", "safety"]
    np.testing.assert_array_equal(ds.labels, np.array([[3.0, np.nan], [np.nan, 1.5]], np.float32))
    assert texts(tok, ds.ids) == ["Human: p\n\nAssistant: r", "Human: q\n\nAssistant: s"]


# ------------------------------------------------------------------ auto-detection and field_map


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "explicit"),
        ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "implicit_prompt"),
        ({"chosen": [user("x")], "rejected": [user("y")]}, "conversational"),
        ({"text": "t"}, "nemo_comparison"),
        ({"text": "t", "label": [1]}, "nemo_regression"),
        ({"prompt": "p", "response": "r", "labels": {}}, "regression"),
        ({"response": "r", "labels": {}}, "regression"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record, "f.jsonl:1") == fmt


def test_detect_format_errors_list_fields():
    with pytest.raises(DataError, match=r"f\.jsonl:1: cannot tell the data format from the fields \['answer', 'question'\]"):
        detect_format({"question": 1, "answer": 2}, "f.jsonl:1")
    with pytest.raises(DataError, match=r"f\.jsonl:1: expected a JSON object, got list"):
        detect_format([1, 2], "f.jsonl:1")
    with pytest.raises(DataError, match=r"data\.format='csv' is not valid; choose one of auto, explicit"):
        parse([{"prompt": "p"}], fmt="csv")


def test_auto_detection_is_per_source(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Hi", "chosen": "A", "rejected": "B"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "Q: x A: good"}, {"text": "Q: x A: bad"}])
    ds, rep = pairs_ds([a, b], tok)
    assert rep.examples == 2 and rep.rows_read == 3
    assert texts(tok, ds.chosen) == ["Human: Hi\n\nAssistant: A", "Q: x A: good"]
    assert texts(tok, ds.rejected) == ["Human: Hi\n\nAssistant: B", "Q: x A: bad"]


def test_field_map(tmp_path, tok):
    f = write_jsonl(tmp_path / "m.jsonl", [{"source": "Hi", "good": "A", "bad": "B", "subset": "s"}])
    ds, rep = pairs_ds([f], tok, field_map={"prompt": "source", "chosen": "good", "rejected": "bad"})
    assert rep.examples == 1 and ds.extra == [{"subset": "s"}]
    assert texts(tok, ds.chosen) == ["Human: Hi\n\nAssistant: A"]
    (ex,) = parse([{"q": "p", "a": "r", "scores": {"h": 1}}], field_map={"prompt": "q", "response": "a", "labels": "scores"}, attributes=["h"])
    assert ex.labels == {"h": 1.0} and ex.response == [assistant("r")]


def test_margin_and_extra_survive_build_dataset(tmp_path, tok):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi", "chosen": "A", "rejected": "B", "margin": 2, "subset": "rude"},
        {"prompt": "Yo", "chosen": "C", "rejected": "D", "subset": "vague"},
    ])
    ds, rep = pairs_ds([f], tok)
    np.testing.assert_array_equal(ds.margin, np.array([2.0, np.nan], np.float32))
    assert ds.extra == [{"subset": "rude"}, {"subset": "vague"}]
    assert ds[0]["margin"] == 2.0 and math.isnan(ds[1]["margin"])


def test_kind_mismatch_is_an_error(tmp_path, tok):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "A", "rejected": "B"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: this is a preference pair, but the model type needs rated responses"):
        rated_ds([f], tok, ["h"])


# ------------------------------------------------------------------ readers

ROWS = [{"prompt": f"Question {i}", "chosen": "Good answer.", "rejected": "Bad answer.", "subset": "x"} for i in range(3)]


def _check_three(ds, rep, tok):
    assert rep.rows_read == 3 and rep.examples == 3 and len(ds) == 3
    assert texts(tok, ds.chosen) == [f"Human: Question {i}\n\nAssistant: Good answer." for i in range(3)]


def test_read_json_list_and_object(tmp_path, tok):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    for name in ("a.json", "b.json"):
        _check_three(*pairs_ds([tmp_path / name], tok), tok)
    assert [r.where for r in read_rows(str(tmp_path / "a.json"))] == [f"{tmp_path}/a.json[{i}]" for i in range(3)]
    (tmp_path / "c.json").write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(DataError, match=r"c\.json: expected a JSON list of records \(or an object with one list field\)"):
        list(read_rows(str(tmp_path / "c.json")))


def test_read_jsonl_disguised_as_json(tmp_path, tok):
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    _check_three(*pairs_ds([tmp_path / "lines.json"], tok), tok)


def test_read_gzip(tmp_path, tok):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in ROWS))
    with gzip.open(tmp_path / "b.json.gz", "wt") as fh:
        fh.write(json.dumps(ROWS))
    for name in ("a.jsonl.gz", "b.json.gz"):
        _check_three(*pairs_ds([tmp_path / name], tok), tok)
    assert next(read_rows(str(tmp_path / "a.jsonl.gz"))).where == f"{tmp_path}/a.jsonl.gz:1"


def test_read_parquet(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    ds, rep = pairs_ds([tmp_path / "a.parquet"], tok)
    _check_three(ds, rep, tok)
    assert ds.extra == [{"subset": "x"}] * 3
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read Parquet"):
        pairs_ds([tmp_path / "bad.parquet"], tok)


def test_read_hf_dataset_saved_to_disk(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    _check_three(*pairs_ds([tmp_path / "ds"], tok), tok)
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    ds, rep = pairs_ds([tmp_path / "dd"], tok, split="test")
    _check_three(ds, rep, tok)
    assert next(read_rows(str(tmp_path / "dd"), "test")).where == f"{tmp_path}/dd:test[0]"
    with pytest.raises(DataError, match=r"dd: has splits \['test'\], not 'train'; set data\.split"):
        pairs_ds([tmp_path / "dd"], tok)


def test_glob_and_missing_paths(tmp_path, tok):
    write_jsonl(tmp_path / "x1.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "x2.jsonl", ROWS[2:])
    ds, rep = pairs_ds([tmp_path / "x*.jsonl"], tok)
    assert rep.sources == [str(tmp_path / "x1.jsonl"), str(tmp_path / "x2.jsonl")] and len(ds) == 3
    with pytest.raises(DataError, match=r"data path '.*nothing\*\.jsonl' matches no file"):
        pairs_ds([tmp_path / "nothing*.jsonl"], tok)
    with pytest.raises(DataError, match=r"data file '.*missing\.jsonl' does not exist"):
        pairs_ds([tmp_path / "missing.jsonl"], tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file type"):
        pairs_ds([tmp_path / "x.csv"], tok)
    with pytest.raises(DataError, match=r"no data given"):
        pairs_ds([], tok)


# ------------------------------------------------------------------ bad rows: errors name file:line and field

GOOD = json.dumps({"prompt": "Hi", "chosen": "A", "rejected": "B"})
GOOD2 = json.dumps({"prompt": "Hello", "chosen": "A", "rejected": "B"})  # not a duplicate of GOOD
RATED_GOOD = json.dumps({"prompt": "p", "response": "r", "labels": {"helpfulness": 1}})


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "Hi", "chosen": "A",', r"bad\.jsonl:2: invalid JSON \(Expecting property name enclosed in double quotes at column 32\)"),
        ('{"prompt": "Hi", "chosen": 5, "rejected": "B"}', r"bad\.jsonl:2: field 'chosen' must be a string or a list of messages, got int 5"),
        ('{"prompt": "Hi", "chosen": "A", "rejected": [{"role": "assistant"}]}', r"bad\.jsonl:2: field 'rejected'\[0\] must be a message"),
        ('{"prompt": "Hi", "chosen": "A"}', r"bad\.jsonl:2: missing field 'rejected' required by format 'explicit' \(fields present: \['chosen', 'prompt'\]\)"),
        ('{"prompt": "Hi", "chosen": "A", "rejected": "B", "margin": "big"}', r"bad\.jsonl:2: field 'margin' must be a number, got str 'big'"),
        ('{"prompt": "Hi", "chosen": "A", "rejected": "B", "margin": Infinity}', r"bad\.jsonl:2: field 'margin' must be finite, got inf"),
        ('[1, 2]', r"bad\.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_bad_pair_rows(tmp_path, tok, bad_line, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad_line, GOOD2])
    with pytest.raises(DataError, match=message):
        pairs_ds([f], tok)
    ds, rep = pairs_ds([f], tok, skip_bad_rows=True)
    assert (rep.rows_read, rep.examples, rep.skipped_bad_rows) == (3, 2, 1)
    assert len(rep.bad_row_messages) == 1 and rep.bad_row_messages[0].startswith(f"{f}:2: ")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "p", "response": "r", "labels": {"helpfulness": NaN}}', r"bad\.jsonl:2: field 'labels\.helpfulness' must be finite, got nan"),
        ('{"prompt": "p", "response": "r", "labels": {"safety": -Infinity}}', r"bad\.jsonl:2: field 'labels\.safety' must be finite, got -inf"),
        ('{"prompt": "p", "response": "r", "labels": {"helpfulness": "high"}}', r"bad\.jsonl:2: field 'labels\.helpfulness' must be a number, got str 'high'"),
        ('{"prompt": "p", "response": "r", "labels": {"helpfulness": true}}', r"bad\.jsonl:2: field 'labels\.helpfulness' must be a number, got bool True"),
        ('{"prompt": "p", "response": "r", "labels": {"helpfullness": 1}}', r"bad\.jsonl:2: label 'helpfullness' is not one of model\.attributes \['helpfulness', 'safety'\]"),
        ('{"prompt": "p", "response": "r", "labels": [1, 2]}', r"bad\.jsonl:2: field 'labels' must be an object \{attribute: value\}"),
        ('{"prompt": "p", "labels": {"safety": 1}}', r"bad\.jsonl:2: missing field 'response' required by format 'regression'"),
        ('{"prompt": "p", "response": "r", "labels": {}}', r"bad\.jsonl:2: every label is missing"),
    ],
)
def test_bad_rated_rows(tmp_path, tok, bad_line, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [RATED_GOOD, bad_line, RATED_GOOD])
    with pytest.raises(DataError, match=message):
        rated_ds([f], tok, ["helpfulness", "safety"])
    ds, rep = rated_ds([f], tok, ["helpfulness", "safety"], skip_bad_rows=True)
    assert (rep.rows_read, rep.examples, rep.skipped_bad_rows) == (3, 2, 1)


def test_invalid_utf8_names_its_line(tmp_path, tok):
    f = tmp_path / "u.jsonl"
    f.write_bytes(
        (GOOD + "\n").encode()
        + b'{"prompt": "caf\xe9", "chosen": "A", "rejected": "B"}\n'  # latin-1 byte, not UTF-8
        + (GOOD2 + "\n").encode()
    )
    with pytest.raises(DataError, match=r"u\.jsonl:2: not valid UTF-8 \(invalid continuation byte at byte 15 of the line\)"):
        pairs_ds([f], tok)
    ds, rep = pairs_ds([f], tok, skip_bad_rows=True)
    assert (rep.rows_read, rep.examples, rep.skipped_bad_rows) == (3, 2, 1)


def test_truncated_gzip(tmp_path, tok):
    rng = random.Random(0)
    lines = [json.dumps({"prompt": "%032x" % rng.getrandbits(128), "chosen": "A", "rejected": "B"}) for _ in range(2000)]
    data = gzip.compress("".join(line + "\n" for line in lines).encode())
    f = tmp_path / "t.jsonl.gz"
    f.write_bytes(data[: len(data) // 2])
    # A stream that ends early cannot be told from damage, so no line of it is read, with or without skip_bad_rows.
    for skip in (False, True):
        with pytest.raises(DataError, match=r"t\.jsonl\.gz: is damaged or truncated: its compressed data ends early, "
                                            r"so no line of it can be trusted; re-download or re-compress the file"):
            pairs_ds([f], tok, skip_bad_rows=skip)


def test_skip_bad_rows_counts_every_kind(tmp_path, tok):
    f = write_jsonl(tmp_path / "mixed.jsonl", [
        GOOD,
        "{not json",
        '{"prompt": "Hi", "chosen": "A"}',
        '{"prompt": "Hi", "chosen": "A", "rejected": "B", "margin": NaN}',
        GOOD2,
        '{"prompt": "Same", "chosen": "X", "rejected": "X"}',
    ])
    ds, rep = pairs_ds([f], tok, skip_bad_rows=True)
    assert rep.rows_read == 6 and rep.skipped_bad_rows == 3 and rep.excluded == {"identical_texts": 1}
    assert rep.examples == len(ds) == 2
    assert rep.rows_read == rep.examples + sum(rep.excluded.values()) + rep.skipped_bad_rows
    assert [m.split(": ")[0] for m in rep.bad_row_messages] == [f"{f}:2", f"{f}:3", f"{f}:4"]


# ------------------------------------------------------------------ templates


def test_template_that_writes_bos_is_not_doubled(tiny_model):
    from rewardforge.data import TextRenderer

    t = load_tokenizer(str(tiny_model("llama")))  # the tokenizer adds BOS itself
    t.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    assert setup_template(t, "auto") == "tokenizer"
    text, start = TextRenderer(t).render([user("Hi")], [assistant("Yo")])
    assert text == "[user] Hi\n[assistant] Yo\n" and text[start:] == "Yo\n"
    ids = t(text)["input_ids"]
    assert ids[0] == t.bos_token_id and ids.count(t.bos_token_id) == 1


def test_setup_template_choices(tiny_model):
    t = load_tokenizer(str(tiny_model("llama")))
    with pytest.raises(DataError, match=r"data\.template=tokenizer but the tokenizer has no chat template"):
        setup_template(t, "tokenizer")
    with pytest.raises(DataError, match=r"data\.template='jinja' is not valid; choose one of auto, plain, tokenizer"):
        setup_template(t, "jinja")
    q = load_tokenizer(str(tiny_model("qwen2")))
    assert setup_template(q, "auto") == "tokenizer" and "im_start" in q.chat_template
    assert setup_template(q, "plain") == "plain" and "Human: " in q.chat_template


def test_the_shipped_synthetic_data_keeps_validation_questions_out_of_training(tmp_path):
    """The quickstart's validation accuracy is on prompts the model never saw (eval's overlap check agrees)."""
    from rewardforge.data.synthetic import TOPICS, write, write_lists

    questions = {q.lower() for q, _ in TOPICS}

    def asked(path):
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        return {q for r in rows for q in questions if r["prompt"].lower().endswith(q)}

    for writer in (write, write_lists):
        tr, va = writer(tmp_path / writer.__name__)
        assert asked(tr) and asked(va) and not asked(tr) & asked(va)
    for shipped in ("quickstart", "lists"):
        root = Path(__file__).resolve().parents[1] / "examples" / shipped
        assert not asked(root / "train.jsonl") & asked(root / "validation.jsonl"), f"regenerate examples/{shipped}"
