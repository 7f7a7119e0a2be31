"""Tokenize rendered texts in batches with truncation that never drops or corrupts an example.

Truncation (``data.truncation``):

* ``prompt_left`` (default): drop the prompt's oldest tokens first, then the response's last
  content tokens only if the response alone is still too long.
* ``response_right``: drop the response's last content tokens first, then the prompt's oldest.

Special tokens the tokenizer adds at the start ([CLS], BOS) and at the end ([SEP], EOS) are
always kept, and so are the template's own ends when the caller names them (``ends``: the special
tokens written before the text, and the end-of-turn text after the response, e.g. ChatML's
``<|im_end|>\n`` or Llama-3's ``<|eot_id|>``), so the token the reward is read at survives even
when the response alone is longer than ``max_length``.

Fast paths (on by default; ``fast=False`` or ``REWARDFORGE_FAST_PREPROCESS=0`` turns them off), each giving
exactly the ids, lengths and truncation counts of the reference path (``tokenizer(...)`` with offsets on every
text; tests/test_preprocess_fast.py compares them):

* the Rust tokenizer is called directly, in the state ``tokenizer(...)`` puts it in, and offsets and special-token
  masks are read only for the texts longer than ``max_length``. Used only where the transformers class does not
  override the calling path, and only after a sample of the texts came out the same both ways;
* prompt and response tokenized apart (the prompt once per pair when chosen and rejected share it, see
  ``build_dataset``) where that is provably the same as tokenizing the text whole: a normalizer that works
  character by character, a pre-tokenizer that always splits at whitespace and drops it (BERT/WordPiece style),
  added tokens that cannot reach across whitespace, a post-processor that only puts fixed special tokens around
  the text, and a prompt that ends with a space, tab or newline. Byte-level BPE and SentencePiece tokenizers,
  whose tokens can run across that boundary, are tokenized whole. A sample is checked against the whole-text
  tokenization on every call; any difference turns the split off.

Calls with fewer than 256 texts (serving, scoring a few texts) take the reference path: there the sample check
would cost more than the fast path saves.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import signal
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from rewardforge.data.readers import DataError
from rewardforge.data.template import fast_paths_enabled


@dataclass
class TruncationStats:
    sequences: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0
    tokens_removed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def protect_ends(special: list[int], offsets, text_length: int, ends: tuple[int, int] | None) -> list[int]:
    """``special`` with the tokens inside the protected ends marked too.

    ``ends`` is (characters of the template's lead, characters of its tail) for this text: tokens ending within
    the first ``lead`` characters and tokens starting in the last ``tail`` characters are kept like special tokens.
    """
    if not ends or not (ends[0] or ends[1]):
        return special
    lead, tail = ends
    out = list(special)
    tail_from = text_length - tail
    for k, (a, b) in enumerate(offsets):
        if out[k]:
            continue
        if (lead and b <= lead and b > 0) or (tail and a >= tail_from and b > a):
            out[k] = 1
    return out


def truncate(
    ids: list[int],
    offsets: list[tuple[int, int]],
    special: list[int],
    response_start: int,
    max_length: int,
    mode: str,
    ends: tuple[int, int] | None = None,
    text_length: int = 0,
) -> tuple[list[int], bool, bool]:
    """Cut ``ids`` to ``max_length``; return (ids, prompt_was_cut, response_was_cut).

    ``response_start`` is the character where the response begins; content tokens that start
    before it ends are prompt tokens; a token that straddles the boundary belongs to the response.
    ``ends`` (lead characters, tail characters of a text of ``text_length`` characters) are kept whole.
    """
    return _cut(ids, protect_ends(special, offsets, text_length, ends), max_length, mode,
                _split_finder(offsets, response_start))


def kept_ranges(
    ids: list[int], offsets, special: list[int], response_start: int, max_length: int, mode: str,
    ends: tuple[int, int] | None = None, text_length: int = 0,
) -> list[tuple[int, int]]:
    """The token ranges ``[a, b)`` that :func:`truncate` keeps, in order (for the text the model read)."""
    n = len(ids)
    if n <= max_length:
        return [(0, n)]
    special = protect_ends(special, offsets, text_length, ends)
    lead, trail = _special_ends(special)
    _, p_start, split, r_end = _cut_plan(n, special, max_length, mode, _split_finder(offsets, response_start))
    return [r for r in ((0, lead), (p_start, split), (split, r_end), (trail, n)) if r[1] > r[0]]


def _split_finder(offsets, response_start: int):

    def split_at(lead: int, trail: int) -> int:
        split = lead
        while split < trail and offsets[split][1] <= response_start:  # a token reaching into the response is response
            split += 1
        return split

    return split_at


def _cut(ids: list[int], special: list[int], max_length: int, mode: str, split_at) -> tuple[list[int], bool, bool]:
    """``truncate`` with the first response token found by ``split_at(lead, trail)``."""
    n = len(ids)
    if n <= max_length:
        return ids, False, False
    if not isinstance(ids, list):
        ids = list(ids)
    (cut_prompt, cut_response), p_start, split, r_end = _cut_plan(n, special, max_length, mode, split_at)
    lead, trail = _special_ends(special)
    return ids[:lead] + ids[p_start:split] + ids[split:r_end] + ids[trail:], cut_prompt, cut_response


def _cut_plan(n: int, special: list[int], max_length: int, mode: str, split_at):
    """((prompt cut, response cut), first prompt token kept, first response token, one past the last response token kept)."""
    lead, trail = _special_ends(special)
    if (lead + n - trail) >= max_length:
        raise DataError(
            f"data.max_length={max_length} leaves no room for content after the {lead + n - trail} special tokens"
        )
    split = split_at(lead, trail)
    # prompt tokens: ids[p_start:split]; response tokens: ids[split:r_end]
    p_start, r_end = lead, trail
    excess = n - max_length
    cut_prompt = cut_response = False
    order = ("prompt", "response") if mode == "prompt_left" else ("response", "prompt")
    for part in order:
        if part == "prompt" and split > p_start and excess > 0:
            k = min(excess, split - p_start)
            p_start += k
            excess -= k
            cut_prompt = True
        elif part == "response" and r_end > split and excess > 0:
            # response_right keeps at least one response token and takes the rest from the prompt
            k = min(excess, r_end - split - (1 if mode == "response_right" else 0))
            if k > 0:
                r_end -= k
                excess -= k
                cut_response = True
    # max_length > number of special tokens, so the content left always covers the excess
    assert excess <= 0, "truncation arithmetic"
    return (cut_prompt, cut_response), p_start, split, r_end


def tokenize_texts(
    tokenizer,
    texts: list[str],
    response_starts: list[int],
    max_length: int,
    mode: str,
    stats: TruncationStats,
    batch_size: int = 2048,
    fast: bool | None = None,
    ends: tuple[str, str] | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Tokenize in batches with the fast tokenizer.

    Texts that share a prompt (``texts[i][:response_starts[i]]``) within a batch have it tokenized once
    where the split path applies, so pass a pair's chosen and rejected texts next to each other.
    ``ends`` = (lead, tail) strings: a text that starts with ``lead`` or ends with ``tail`` keeps those
    tokens when it is truncated (:class:`rewardforge.data.inputs.InputFormat.ends`).

    Returns:
        (int32 token arrays of at most ``max_length``, each text's length before truncation)
    """
    if fast is None:
        fast = fast_paths_enabled()
    # small calls (serving, scoring a few texts): the sample check would cost more than the fast path saves
    backend = _Backend.of(tokenizer) if fast and len(texts) >= _MIN_FAST else None
    out: list[np.ndarray] = []
    full_lengths = np.zeros(len(texts), np.int64)
    for start in range(0, len(texts), batch_size):
        chunk, starts = texts[start : start + batch_size], response_starts[start : start + batch_size]
        if backend is not None and not backend.verified:
            backend.verify(tokenizer, chunk, starts)
            if not backend.direct:
                backend = None
        if backend is None:
            arrays, lengths = _tokenize_reference(tokenizer, chunk, starts, max_length, mode, stats, ends)
        else:
            arrays, lengths = backend.tokenize(chunk, starts, max_length, mode, stats, ends)
        out += arrays
        full_lengths[start : start + len(lengths)] = lengths
    return out, full_lengths


def _count(stats: TruncationStats, ids: list[int], new: list[int], cp: bool, cr: bool) -> None:
    stats.truncated_prompt += cp
    stats.truncated_response += cr
    stats.tokens_removed += len(ids) - len(new)


def text_ends(text: str, ends: tuple[str, str] | None) -> tuple[int, int] | None:
    """(characters of ``ends[0]`` that ``text`` starts with, characters of ``ends[1]`` it ends with)."""
    if not ends:
        return None
    lead, tail = ends
    return (len(lead) if lead and text.startswith(lead) else 0, len(tail) if tail and text.endswith(tail) else 0)


def _tokenize_reference(tokenizer, texts, starts, max_length, mode, stats, ends=None) -> tuple[list[np.ndarray], list[int]]:
    """The reference path: ``tokenizer(...)`` with offsets and special-token masks for every text."""
    enc = tokenizer(
        texts,
        add_special_tokens=True,
        truncation=False,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    arrays, lengths = [], []
    for j, ids in enumerate(enc["input_ids"]):
        stats.sequences += 1
        lengths.append(len(ids))
        if len(ids) > max_length:
            new, cp, cr = truncate(ids, enc["offset_mapping"][j], enc["special_tokens_mask"][j], starts[j], max_length, mode,
                                   text_ends(texts[j], ends), len(texts[j]))
            _count(stats, ids, new, cp, cr)
            ids = new
        arrays.append(np.array(ids, dtype=np.int32))
    return arrays, lengths


# transformers modules whose calling path (__call__ -> _encode_plus/_batch_encode_plus -> backend.encode_batch)
# the direct path reproduces; a class overriding any of these methods elsewhere is tokenized the reference way
_TRANSFORMERS_MODULES = frozenset({
    "transformers.tokenization_utils_base", "transformers.tokenization_utils_fast", "transformers.tokenization_utils_tokenizers",
})
_CALL_PATH = ("__call__", "_call_one", "encode_plus", "batch_encode_plus", "_encode_plus", "_batch_encode_plus",
              "set_truncation_and_padding", "_convert_encoding", "prepare_for_tokenization")
# components under which tokenizing "prompt<whitespace>" and "response" apart equals tokenizing the whole text
_SPLIT_NORMALIZERS = frozenset({"BertNormalizer", "Lowercase", "NFD", "StripAccents"})  # character by character
_SPLIT_PRE_TOKENIZERS = frozenset({"BertPreTokenizer", "Whitespace", "WhitespaceSplit"})  # split at whitespace, drop it
_SPLIT_MODELS = frozenset({"WordPiece", "WordLevel"})  # each pre-token on its own, deterministic
_SPLIT_PROCESSORS = frozenset({"TemplateProcessing", "BertProcessing"})  # fixed tokens around the text
_SPLIT_BOUNDARY = frozenset(" \t\n")
_SAMPLE = 8  # texts compared with the reference before the fast path is trusted, once per call
_MIN_FAST = 256  # fewer texts than this: the reference path


def _component_types(component) -> list[str] | None:
    """The component's type names (the members of a Sequence), from its JSON state; None if unreadable."""
    import json

    if component is None:
        return []
    try:
        state = json.loads(component.__getstate__())
    except Exception:
        return None
    if state.get("type") == "Sequence":
        members = state.get("normalizers", state.get("pretokenizers", state.get("processors")))
        if not isinstance(members, list):
            return None
        return [m.get("type") for m in members]
    return [state.get("type")]


class _Backend:
    """Calls the Rust tokenizer behind a transformers fast tokenizer directly (see the module docstring)."""

    def __init__(self, tokenizer, bk):
        self.tokenizer, self.bk = tokenizer, bk
        self.direct = True
        self.verified = False
        self.split = False
        self.lead: list[int] = []
        self.trail: list[int] = []
        self._encode_fast = getattr(bk, "encode_batch_fast", None) or bk.encode_batch

    @classmethod
    def of(cls, tokenizer) -> "_Backend | None":
        bk = getattr(tokenizer, "backend_tokenizer", None)
        if bk is None or not getattr(tokenizer, "is_fast", False) or not hasattr(bk, "encode_batch"):
            return None
        klass = type(tokenizer)
        for name in _CALL_PATH:
            impl = getattr(klass, name, None)
            if impl is not None and getattr(impl, "__module__", None) not in _TRANSFORMERS_MODULES:
                return None
        return cls(tokenizer, bk)

    def _prepare(self) -> None:
        """The state ``tokenizer(..., truncation=False, padding=False)`` sets before it encodes."""
        bk = self.bk
        if bk.truncation is not None:
            bk.no_truncation()
        if bk.padding is not None:
            bk.no_padding()
        want = bool(getattr(self.tokenizer, "split_special_tokens", False))
        if hasattr(bk, "encode_special_tokens") and bk.encode_special_tokens != want:
            bk.encode_special_tokens = want

    def _split_possible(self) -> bool:
        bk = self.bk
        if type(bk.model).__name__ not in _SPLIT_MODELS:
            return False
        norm, pre, post = _component_types(bk.normalizer), _component_types(bk.pre_tokenizer), _component_types(bk.post_processor)
        if norm is None or pre is None or post is None:
            return False
        if not set(norm) <= _SPLIT_NORMALIZERS or len(pre) != 1 or pre[0] not in _SPLIT_PRE_TOKENIZERS or len(post) > 1:
            return False
        if post and post[0] not in _SPLIT_PROCESSORS:
            return False
        try:
            added = list(bk.get_added_tokens_decoder().values())
        except Exception:
            return False
        for t in added:  # an added token matching across the boundary, or eating the whitespace, would join the parts
            if t.lstrip or t.rstrip or any(c.isspace() for c in t.content) or not t.content:
                return False
        # the special tokens the post-processor puts around any text: the same for two different probes
        around = set()
        for probe in ("a", "hello world"):
            whole, bare = self.bk.encode(probe, add_special_tokens=True), self.bk.encode(probe, add_special_tokens=False)
            k = 0
            while k < len(whole.ids) and whole.special_tokens_mask[k]:
                k += 1
            m = len(bare.ids)
            if whole.ids[k : k + m] != bare.ids or any(bare.special_tokens_mask) or not all(whole.special_tokens_mask[k + m :]):
                return False
            around.add((tuple(whole.ids[:k]), tuple(whole.ids[k + m :])))
        if len(around) != 1:
            return False
        lead, trail = around.pop()
        self.lead, self.trail = list(lead), list(trail)
        return True

    def verify(self, tokenizer, texts: list[str], starts: list[int]) -> None:
        """Compare a sample with the reference call; any difference: the direct path (or the split) is off."""
        self.verified = True
        sample_idx = _sample(texts, starts)
        sample = [texts[i] for i in sample_idx]
        ref = tokenizer(sample, add_special_tokens=True, truncation=False, return_offsets_mapping=True,
                        return_special_tokens_mask=True, return_attention_mask=False, return_token_type_ids=False, verbose=False)
        try:
            self._prepare()
            whole = self.bk.encode_batch(sample, add_special_tokens=True)
        except Exception:
            self.direct = False
            return
        for j, e in enumerate(whole):
            if (e.ids != ref["input_ids"][j] or [tuple(o) for o in e.offsets] != [tuple(o) for o in ref["offset_mapping"][j]]
                    or e.special_tokens_mask != ref["special_tokens_mask"][j]):
                self.direct = False
                return
        try:
            self.split = self._split_possible()
        except Exception:
            self.split = False
        if not self.split:
            return
        for j, i in enumerate(sample_idx):
            s = starts[i]
            if not self._splittable(texts[i], s):
                continue
            head, resp = self._encode_fast([texts[i][:s], texts[i][s:]], add_special_tokens=False)
            ids = self.lead + head.ids + resp.ids + self.trail
            e = whole[j]
            special = [1] * len(self.lead) + head.special_tokens_mask + resp.special_tokens_mask + [1] * len(self.trail)
            split_ref = _first_response_token(e.offsets, e.special_tokens_mask, s)
            if ids != e.ids or special != e.special_tokens_mask or split_ref != len(self.lead) + len(head.ids):
                self.split = False
                return

    @staticmethod
    def _splittable(text: str, start: int) -> bool:
        return 0 < start <= len(text) and text[start - 1] in _SPLIT_BOUNDARY

    def tokenize(self, texts, starts, max_length, mode, stats, ends=None) -> tuple[list[np.ndarray], list[int]]:
        """(int32 arrays, lengths before truncation) of ``texts``, in order. The id lists become arrays at once:
        fewer live Python containers, fewer full garbage-collector passes over the heap."""
        self._prepare()
        arrays: list[Any] = [None] * len(texts)
        lengths = [0] * len(texts)
        whole_idx = list(range(len(texts)))
        if self.split:
            split_idx = [i for i in whole_idx if self._splittable(texts[i], starts[i])]
            whole_idx = [i for i in whole_idx if not self._splittable(texts[i], starts[i])]
            heads: dict[str, int] = {}
            for i in split_idx:
                heads.setdefault(texts[i][: starts[i]], len(heads))
            pieces = list(heads) + [texts[i][starts[i]:] for i in split_idx]
            encs = self._encode_fast(pieces, add_special_tokens=False) if pieces else []
            head_ids = [e.ids for e in encs[: len(heads)]]
            lead, trail, nl = self.lead, self.trail, len(self.lead)
            for k, i in enumerate(split_idx):
                h = heads[texts[i][: starts[i]]]
                resp = encs[len(heads) + k]
                ids = lead + head_ids[h] + resp.ids + trail
                n = len(ids)
                stats.sequences += 1
                if n > max_length:
                    resp_special = resp.special_tokens_mask
                    te = text_ends(texts[i], ends)
                    if te and te[1]:  # the template's tail lies in the response piece (offsets relative to it)
                        resp_special = protect_ends(resp_special, resp.offsets, len(texts[i]) - starts[i], (0, te[1]))
                    if te and te[0]:
                        head_special = protect_ends(encs[h].special_tokens_mask, encs[h].offsets, starts[i], (te[0], 0))
                    else:
                        head_special = encs[h].special_tokens_mask
                    special = [1] * nl + head_special + resp_special + [1] * len(trail)
                    hint = nl + len(head_ids[h])
                    new, cp, cr = _cut(ids, special, max_length, mode, lambda lo, hi, hint=hint: min(max(hint, lo), hi))
                    _count(stats, ids, new, cp, cr)
                    ids = new
                arrays[i], lengths[i] = np.array(ids, dtype=np.int32), n
        if whole_idx:
            encs = self.bk.encode_batch([texts[i] for i in whole_idx], add_special_tokens=True)
            for e, i in zip(encs, whole_idx):
                ids = e.ids
                n = len(ids)
                stats.sequences += 1
                if n > max_length:
                    new, cp, cr = truncate(ids, e.offsets, e.special_tokens_mask, starts[i], max_length, mode,
                                           text_ends(texts[i], ends), len(texts[i]))
                    _count(stats, ids, new, cp, cr)
                    ids = new
                arrays[i], lengths[i] = np.array(ids, dtype=np.int32), n
        return arrays, lengths


def _special_ends(special) -> tuple[int, int]:
    """(first non-special position, one past the last non-special position) of a sequence."""
    n = len(special)
    lead = 0
    while lead < n and special[lead]:
        lead += 1
    trail = n
    while trail > lead and special[trail - 1]:
        trail -= 1
    return lead, trail


def _first_response_token(offsets, special, start: int) -> int:
    lead, trail = _special_ends(special)
    split = lead
    while split < trail and offsets[split][1] <= start:
        split += 1
    return split


def _sample(texts: list[str], starts: list[int]) -> list[int]:
    """Up to _SAMPLE texts to verify on, spread evenly over the batch (the first one included)."""
    n = len(texts)
    if n <= _SAMPLE:
        return list(range(n))
    return sorted({(k * n) // _SAMPLE for k in range(_SAMPLE)})


# ------------------------------------------------------------------ chunks, in this process or in worker processes


@dataclass
class TokenizedChunk:
    """The sequences of one chunk of texts, back to back: ``values`` (int32) cut by ``lengths``, and their counts."""

    values: np.ndarray
    lengths: np.ndarray
    stats: TruncationStats


def tokenize_chunk(tokenizer, texts: list[str], starts: list[int], max_length: int, mode: str,
                   ends: tuple[str, str] | None = None) -> TokenizedChunk:
    """:func:`tokenize_texts` of one chunk, packed flat (what a worker process sends back)."""
    stats = TruncationStats()
    arrays, _ = tokenize_texts(tokenizer, texts, starts, max_length, mode, stats, ends=ends)
    lengths = np.fromiter((len(a) for a in arrays), np.int64, len(arrays))
    return TokenizedChunk(np.concatenate(arrays) if arrays else np.zeros(0, np.int32), lengths, stats)


def add_stats(total: TruncationStats, part: TruncationStats) -> None:
    for k, v in part.as_dict().items():
        setattr(total, k, getattr(total, k) + v)


_WORKER: dict[str, Any] = {}


def _start_worker(tokenizer, settings: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker (a forked Rust thread pool would hang)
    _WORKER["tokenizer"], _WORKER["settings"] = tokenizer, settings


def _work(texts: list[str], starts: list[int]) -> TokenizedChunk:
    return tokenize_chunk(_WORKER["tokenizer"], texts, starts, *_WORKER["settings"])


class ChunkTokenizer:
    """:func:`tokenize_chunk` over a stream of chunks, the results in the order of the chunks.

    With ``num_proc`` > 1 the chunks go to that many worker processes (forked where the platform can, so the
    tokenizer is not copied; each tokenizes with one thread), started only once a second chunk arrives, so a
    dataset of one chunk is tokenized here. Otherwise they are tokenized in this process, where the Rust
    tokenizer's own threads use the cores. The ids are the same either way: tokenization is per text.
    """

    def __init__(self, tokenizer, max_length: int, mode: str, ends: tuple[str, str] | None, num_proc: int):
        self.tokenizer, self.settings, self.num_proc = tokenizer, (max_length, mode, ends), max(1, int(num_proc))
        self.processes = 1  # how many tokenized (1: this process)

    def map(self, chunks: Iterable[tuple[list[str], list[int], Any]]) -> Iterator[tuple[Any, TokenizedChunk]]:
        """Yield ``(payload, TokenizedChunk)`` for each ``(texts, starts, payload)`` of ``chunks``, in order."""
        chunks = iter(chunks)
        head = list(itertools.islice(chunks, 2))
        if self.num_proc <= 1 or len(head) < 2:
            for texts, starts, payload in itertools.chain(head, chunks):
                yield payload, tokenize_chunk(self.tokenizer, texts, starts, *self.settings)
            return
        from concurrent.futures.process import BrokenProcessPool

        pool = self._start_pool()
        try:
            pending: collections.deque = collections.deque()
            for texts, starts, payload in itertools.chain(head, chunks):
                pending.append((payload, pool.submit(_work, texts, starts)))
                while len(pending) > self.num_proc:  # a few chunks in flight, never the whole data
                    payload, future = pending.popleft()
                    yield payload, future.result()
            while pending:
                payload, future = pending.popleft()
                yield payload, future.result()
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            raise DataError(f"a tokenizer worker process died (killed, e.g. out of memory?); set data.num_proc lower than "
                            f"{self.num_proc}, or to 1 to tokenize in the building process") from None
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    def _start_pool(self):
        from concurrent.futures import ProcessPoolExecutor

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(self.num_proc, mp_context=multiprocessing.get_context(method), initializer=_start_worker,
                                   initargs=(self.tokenizer, self.settings))
        # Forked workers start with the first task and inherit the environment: without TOKENIZERS_PARALLELISM set,
        # the tokenizers library prints a warning in each (and turns its threads off, as the workers do anyway).
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            pool.submit(int).result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        self.processes = self.num_proc
        return pool
