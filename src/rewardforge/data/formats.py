"""Row formats: detect them and turn raw rows into :class:`PreferencePair` / :class:`RatedResponse`.

Supported formats (``data.format``):

* ``explicit``         ``{"prompt", "chosen", "rejected"}``; prompt a string or a list of messages
* ``implicit_prompt``  ``{"chosen", "rejected"}`` whole dialogues (HH-RLHF); the shared prompt is split
                       off at the last common assistant-turn boundary
* ``conversational``   ``chosen`` / ``rejected`` as lists of ``{"role", "content"}`` messages
* ``nemo_comparison``  consecutive lines ``{"text": prompt+chosen}``, ``{"text": prompt+rejected}``; other
                       fields of both lines go to ``extra`` (the second line's value where both have one)
* ``regression``       ``{"prompt", "response", "labels": {"attr": value}}``
* ``nemo_regression``  ``{"text", "label": [v, ...]}`` with -100 marking a missing attribute

An optional ``margin`` is kept; every other field goes to ``extra`` (e.g. ``subset``) for evaluation.

Text is kept exactly as read (no stripping, no Unicode normalisation). A row is bad, and raises
:class:`DataError` naming its ``file:line`` and field (or is skipped and counted with
``skip_bad_rows``), when a field is missing or of the wrong type, a top-level text field
(``prompt``, ``chosen``, ``rejected``, ``response``, ``text``) is the empty string, a string holds a
lone UTF-16 surrogate (a broken ``\\uXXXX`` escape, which no tokenizer can encode), a number is not
finite, or, with ``format: auto``, the row has the fields of another format than the file's first
row. An empty turn *inside* a dialogue (e.g. HH-RLHF's ``"...\\n\\nAssistant:"``) is kept: it is a
real, sometimes preferred, empty reply.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Union

from rewardforge.data.readers import DataError, Row

Message = dict  # {"role": str, "content": str}
Conversation = Union[str, list]  # raw text (used verbatim) or a list of messages (templated)

PAIR_FORMATS = ("explicit", "implicit_prompt", "conversational", "nemo_comparison")
RATED_FORMATS = ("regression", "nemo_regression")
FORMATS = ("auto",) + PAIR_FORMATS + RATED_FORMATS
NEMO_MISSING_LABEL = -100
FLOAT32_MAX = 3.4028234663852886e38  # margins and labels are stored as float32


@dataclass
class PreferencePair:
    """Two responses to one prompt, the chosen one preferred by a human."""

    prompt: Conversation
    chosen: Conversation
    rejected: Conversation
    margin: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""


@dataclass
class RatedResponse:
    """One response with numeric labels per attribute (None where missing)."""

    prompt: Conversation
    response: Conversation
    labels: dict[str, float | None]
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""


@dataclass
class ParseReport:
    """What the reader skipped, by reason, with the first few messages."""

    rows_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # source -> the format its rows were read in

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(message)


def detect_format(record: Any, where: str) -> str:
    """Pick the format from the keys of the first row.

    The most specific signature wins, so an extra field (say a ``text`` column kept next to
    ``prompt``/``response``/``labels``) does not turn rated rows into NeMo comparison lines.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys:
            return "explicit"
        return "conversational" if isinstance(record["chosen"], list) else "implicit_prompt"
    if "labels" in keys and "response" in keys:
        return "regression"
    if "text" in keys and "label" in keys:
        return "nemo_regression"
    if "text" in keys:
        return "nemo_comparison"
    if "responses" in keys and keys & {"scores", "ranking"}:
        raise DataError(f"{where}: this row is a list of responses with scores or a ranking; train it with "
                        "model.reward_model_type=listwise (or expand it to pairs)")
    raise DataError(
        f"{where}: cannot tell the data format from the fields {sorted(keys)}; expected prompt/chosen/rejected, "
        "chosen/rejected, text (NeMo comparison), prompt/response/labels or text/label (NeMo regression). "
        "Set data.format or data.field_map to map your column names."
    )


# ------------------------------------------------------------------ field checks

# The fields each format needs (for the "which field is missing" part of an error).
REQUIRED_FIELDS = {
    "explicit": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "nemo_comparison": ("text",),
    "regression": ("response", "labels"),
    "nemo_regression": ("text", "label"),
}
_SKIP_HINT = "set data.skip_bad_rows=true to skip such rows"


def _unicode(value: str, where: str, name: str) -> str:
    """``value`` unchanged, or an error when it holds a lone surrogate (cannot be encoded as UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: field {name} holds a lone UTF-16 surrogate {value[e.start]!r} at character {e.start}, which is not "
            "valid Unicode (usually a broken \\uXXXX escape in the JSON); fix the text or " + _SKIP_HINT
        ) from None
    return value


def _text(value: Any, where: str, name: str, what: str = "a string") -> str:
    """A top-level text field: a non-empty, valid Unicode string, returned unchanged."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be {what}, got {_describe(value)}")
    if not value:
        raise DataError(f"{where}: field {name!r} is an empty string; give it text or {_SKIP_HINT}")
    return _unicode(value, where, repr(name))


def _messages(value: Any, where: str, name: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of messages, got {_describe(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: field {name!r}[{i}] must be a message {{\"role\": str, \"content\": str}}, got {_describe(m)}"
            )
        if not m["role"]:
            raise DataError(f"{where}: field {name!r}[{i}]['role'] is an empty string; use user, assistant or system")
        out.append({"role": _unicode(m["role"], where, f"{name!r}[{i}]['role']"),
                    "content": _unicode(m["content"], where, f"{name!r}[{i}]['content']")})
    return out


def _conversation(value: Any, where: str, name: str, role: str) -> Conversation:
    """A string becomes one message of ``role``; a list must be messages."""
    if isinstance(value, str):
        return [{"role": role, "content": _text(value, where, name)}]
    if isinstance(value, list):
        return _messages(value, where, name)
    raise DataError(f"{where}: field {name!r} must be a string or a list of messages, got {_describe(value)}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field {name!r} must be a number, got {_describe(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        raise DataError(f"{where}: field {name!r} must be finite, got an integer of {len(str(abs(value)))} digits") from None
    if not math.isfinite(number):
        raise DataError(f"{where}: field {name!r} must be finite, got {value}")
    if abs(number) > FLOAT32_MAX:  # margins and labels are stored as float32: this would become inf
        raise DataError(f"{where}: field {name!r} is too large ({value:.4g}); margins and labels are stored as 32-bit floats, at most {FLOAT32_MAX:.4g} in size")
    return number


def _require(record: Any, keys: Iterable[str], where: str, fmt: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_describe(record)}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} required by format {fmt!r} (fields present: {sorted(record)})")


def _extra(record: dict, used: set[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in used}


def _margin(record: dict, where: str) -> float | None:
    if "margin" not in record or record["margin"] is None:
        return None
    return _number(record["margin"], where, "margin")


# ------------------------------------------------------------------ dialogue splitting

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_dialogue(text: str) -> list[Message] | None:
    """Split an HH-RLHF style ``\\n\\nHuman: ...\\n\\nAssistant: ...`` string into messages.

    Returns None when the text has no such turn markers (it is then used verbatim). A turn's content
    is the text between its marker (``"\\n\\nHuman:"`` plus at most one space) and the next marker,
    unchanged; text before the first marker becomes a ``system`` turn unless it is only whitespace.
    """
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        return None
    lead, rest = parts[0], parts[1:]
    messages = []
    if lead.strip():
        messages.append({"role": "system", "content": lead})
    for role, content in zip(rest[0::2], rest[1::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content})
    return messages


def split_shared_prompt(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], list[Message], list[Message]]:
    """Split two dialogues at their last common assistant-turn boundary.

    The prompt is the longest common run of leading messages that is followed by an assistant
    turn in both; what follows is each side's response (one or more messages).
    """
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    # The response must start at an assistant turn in both dialogues.
    while k > 0 and not (
        k < len(chosen) and k < len(rejected) and chosen[k]["role"] == "assistant" and rejected[k]["role"] == "assistant"
    ):
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def common_prefix_length(a, b) -> int:
    """Number of leading items two strings (or two token-id arrays) share: the one definition.

    Strings compare in C (``startswith`` and bisection over slices), arrays with numpy.

    Example:
        >>> common_prefix_length("Human: hi", "Human: hello"), common_prefix_length([1, 2, 3], [1, 2, 4, 5])
        (8, 2)
    """
    if not isinstance(a, str):
        import numpy as np

        n = min(len(a), len(b))
        diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
        return int(diff[0]) if len(diff) else n
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _shared_prompt_length(a: str, b: str) -> int:
    """Length of the shared prompt of two raw texts: their common prefix, backed up to a whitespace
    boundary when the texts part mid-word (so both responses start with a whole word)."""
    n = min(len(a), len(b))
    i = common_prefix_length(a, b)
    if 0 < i < n and not a[i - 1].isspace():
        j = i
        while j > 0 and not a[j - 1].isspace():
            j -= 1
        i = j if j > 0 else i
    return i


# ------------------------------------------------------------------ parsing


def _parse_pair(record: Any, where: str, fmt: str) -> PreferencePair:
    if fmt == "explicit":
        _require(record, ("prompt", "chosen", "rejected"), where, fmt)
        prompt = _conversation(record["prompt"], where, "prompt", "user")
        chosen = _conversation(record["chosen"], where, "chosen", "assistant")
        rejected = _conversation(record["rejected"], where, "rejected", "assistant")
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(record[name], list) and len(side) > len(prompt) and side[: len(prompt)] == prompt:
                # The conversational layout with an extra 'prompt' column: the prompt would be read twice.
                raise DataError(
                    f"{where}: field {name!r} starts with the prompt's messages, so the prompt would appear twice; "
                    "for whole conversations in chosen/rejected set data.format=conversational (the 'prompt' field is then kept as metadata)"
                )
        used = {"prompt", "chosen", "rejected", "margin"}
    elif fmt in ("implicit_prompt", "conversational"):
        _require(record, ("chosen", "rejected"), where, fmt)
        c, r = record["chosen"], record["rejected"]
        if fmt == "conversational" or isinstance(c, list) or isinstance(r, list):
            cm, rm = _messages(c, where, "chosen"), _messages(r, where, "rejected")
        else:
            for name, v in (("chosen", c), ("rejected", r)):
                _text(v, where, name, "a string (a whole dialogue)")
            cm, rm = parse_dialogue(c), parse_dialogue(r)
            if cm is None or rm is None:
                # No turn markers: the shared text prefix is the prompt, used verbatim.
                n = _shared_prompt_length(c, r)
                return PreferencePair(c[:n], c[n:], r[n:], _margin(record, where), _extra(record, {"chosen", "rejected", "margin"}), where)
        prompt, chosen, rejected = split_shared_prompt(cm, rm)
        used = {"chosen", "rejected", "margin"}
    else:
        raise DataError(f"{where}: format {fmt!r} is not a pairwise format")
    return PreferencePair(prompt, chosen, rejected, _margin(record, where), _extra(record, used), where)


def _nemo_text(record: Any, where: str) -> str:
    _require(record, ("text",), where, "nemo_comparison")
    return _text(record["text"], where, "text")


def _parse_rated(record: Any, where: str, fmt: str, attributes: list[str]) -> RatedResponse:
    if fmt == "regression":
        _require(record, ("response", "labels"), where, fmt)
        # The prompt is optional: a missing or null prompt (or an empty message list) is no prompt.
        raw_prompt = record.get("prompt")
        prompt = [] if raw_prompt is None or raw_prompt == [] else _conversation(raw_prompt, where, "prompt", "user")
        response = _conversation(record["response"], where, "response", "assistant")
        raw = record["labels"]
        if not isinstance(raw, dict):
            raise DataError(f"{where}: field 'labels' must be an object {{attribute: value}}, got {_describe(raw)}")
        unknown = [k for k in raw if k not in attributes]
        if unknown:
            raise DataError(f"{where}: label {unknown[0]!r} is not one of model.attributes {attributes}")
        labels = {a: None if raw.get(a) is None else _number(raw[a], where, f"labels.{a}") for a in attributes}
        extra = _extra(record, {"prompt", "response", "labels"})
    elif fmt == "nemo_regression":
        _require(record, ("text", "label"), where, fmt)
        _text(record["text"], where, "text")
        raw = record["label"]
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            raw = [raw]
        if not isinstance(raw, list) or len(raw) != len(attributes):
            raise DataError(
                f"{where}: field 'label' must be a list of {len(attributes)} numbers (one per model.attributes "
                f"{attributes}, -100 for missing), got {_describe(raw)}"
            )
        values = [_number(v, where, f"label[{i}]") for i, v in enumerate(raw)]
        labels = {a: None if v == NEMO_MISSING_LABEL else v for a, v in zip(attributes, values)}
        prompt, response = "", record["text"]
        extra = _extra(record, {"text", "label"})
    else:
        raise DataError(f"{where}: format {fmt!r} is not a regression format")
    if all(v is None for v in labels.values()):
        raise DataError(f"{where}: every label is missing; a row needs at least one of {attributes}")
    return RatedResponse(prompt, response, labels, extra, where)


def _apply_field_map(row: Row, field_map: dict[str, str]) -> Row:
    """Rename the row's columns; all renames read the original row, so swapping two names works."""
    if not field_map or not isinstance(row.data, dict):
        return row
    original = row.data
    renamed = set(field_map.values())
    data = {k: v for k, v in original.items() if k not in renamed}
    for ours, theirs in field_map.items():
        if theirs in original:
            if ours in data:
                raise DataError(
                    f"{row.where}: data.field_map renames field {theirs!r} to {ours!r}, but the row also has a field {ours!r}; "
                    "one of the two would be lost: rename or drop one of them"
                )
            data[ours] = original[theirs]
    return replace(row, data=data)


def _same_format(record: Any, where: str, fmt: str, first: str) -> str:
    """With ``format: auto``: the row's format, which must be its file's (that of the first row, ``first``).

    HH-style text dialogues and message lists may alternate row by row (both parse the same way).
    """
    try:
        own = detect_format(record, where)
    except DataError:
        return fmt  # not another format's row; parsing names the missing or wrong field
    if own == fmt or {own, fmt} <= {"implicit_prompt", "conversational"}:
        return own
    missing = [k for k in REQUIRED_FIELDS[fmt] if k not in record]
    lacks = f"; it lacks field {missing[0]!r} of format {fmt!r}" if missing else ""
    raise DataError(
        f"{where}: this row has the fields of format {own!r} ({sorted(record)}), but {first}, the first row of this file, "
        f"is format {fmt!r}{lacks}. One file must hold one format: fix the row, split the file, or set data.format"
    )


def parse_rows(
    rows: Iterable[Row],
    fmt: str = "auto",
    *,
    attributes: list[str] | None = None,
    skip_bad_rows: bool = False,
    field_map: dict[str, str] | None = None,
    report: ParseReport | None = None,
) -> Iterator[PreferencePair | RatedResponse]:
    """Turn rows into examples; malformed rows raise :class:`DataError` or are skipped and counted.

    The format is detected on each source's first row when ``fmt`` is ``auto``.
    """
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not valid; choose one of {', '.join(FORMATS)}")
    report = report if report is not None else ParseReport()
    attributes = list(attributes or [])
    detected: dict[str, str] = {}
    # NeMo comparison pairs are lines (1, 2), (3, 4), ... of each source: pairing goes by position,
    # so a bad (skipped) line takes its partner with it instead of shifting every later pair.
    position: dict[str, int] = {}
    pending: Row | None = None  # first line of a NeMo comparison pair

    def bad(err: DataError) -> None:
        if not skip_bad_rows:
            raise err if _SKIP_HINT in str(err) else DataError(f"{err}; {_SKIP_HINT}")
        report.skip("bad_row", str(err))

    def unpaired(first: Row) -> DataError:
        return DataError(
            f"{first.where}: NeMo comparison data needs an even number of lines (chosen, rejected); "
            "this last line has no partner"
        )

    for row in rows:
        report.rows_read += 1
        pos = position.get(row.source, 0)
        position[row.source] = pos + 1
        if pending is not None and pending.source != row.source:
            first, pending = pending, None
            bad(unpaired(first))
        second = pos % 2 == 1
        try:
            if isinstance(row.data, DataError):
                raise row.data
            row = _apply_field_map(row, field_map or {})
            row_fmt = fmt
            if fmt != "auto":
                report.formats.setdefault(str(row.source), fmt)
            if row_fmt == "auto":
                if row.source not in detected:
                    detected[row.source] = (detect_format(row.data, row.where), row.where)
                    report.formats[str(row.source)] = detected[row.source][0] + " (detected)"
                row_fmt, first_where = detected[row.source]
                row_fmt = _same_format(row.data, row.where, row_fmt, first_where)
            if row_fmt in RATED_FORMATS:
                if not attributes:
                    raise DataError("model.attributes is empty; a regression model needs the attribute names")
                yield _parse_rated(row.data, row.where, row_fmt, attributes)
            elif row_fmt == "nemo_comparison":
                text = _nemo_text(row.data, row.where)
                if not second:
                    pending = replace(row, data=(text, _extra(row.data, {"text"})))
                    continue
                if pending is None:  # the first line of this pair was bad (and skipped)
                    report.skip("bad_row", f"{row.where}: skipped because the other line of its NeMo comparison pair is bad")
                    continue
                first, pending = pending, None
                first_text, first_extra = first.data
                n = _shared_prompt_length(first_text, text)
                # Both lines' other fields are kept; where both lines have one, the second line's value wins.
                extra = {**first_extra, **_extra(row.data, {"text"})}
                yield PreferencePair(first_text[:n], first_text[n:], text[n:], None, extra, f"{first.where}-{row.index}")
            else:
                yield _parse_pair(row.data, row.where, row_fmt)
        except DataError as err:
            bad(err)
            if second and pending is not None:
                report.skip("bad_row", f"{pending.where}: skipped because the other line of its NeMo comparison pair is bad")
                pending = None
    if pending is not None:
        bad(unpaired(pending))


# ------------------------------------------------------------------ best-of-N rows (evaluation)


@dataclass
class BestOfN:
    """A prompt with K responses and the index of the best one."""

    prompt: Any
    responses: list
    best: int
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def is_best_of_n(record: Any) -> bool:
    return isinstance(record, dict) and "responses" in record and "best" in record


def parse_best_of_n(row: Row) -> BestOfN:
    rec, where = row.data, row.where
    if isinstance(rec, DataError):
        raise rec
    if not is_best_of_n(rec):
        raise DataError(f"{where}: best-of-N rows need fields 'responses' and 'best' (fields present: {sorted(rec) if isinstance(rec, dict) else type(rec).__name__})")
    responses = rec["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{where}: field 'responses' must be a list of at least 2 responses, got {str(responses)[:60]!r}")
    best = rec["best"]
    if isinstance(best, bool) or not isinstance(best, int) or not 0 <= best < len(responses):
        raise DataError(f"{where}: field 'best' must be the index (0..{len(responses) - 1}) of the best response, got {best!r}")
    raw_prompt = rec.get("prompt")
    # Only a missing, null or empty-list prompt means "no prompt"; 0, False or "" are errors named by _conversation.
    prompt = [] if raw_prompt is None or raw_prompt == [] else _conversation(raw_prompt, where, "prompt", "user")
    resp = [_conversation(r, where, f"responses[{i}]", "assistant") for i, r in enumerate(responses)]
    extra = {k: v for k, v in rec.items() if k not in ("prompt", "responses", "best")}
    return BestOfN(prompt, resp, best, extra, where)
