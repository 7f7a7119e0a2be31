"""What the model reads: the one home for turning any item into the model's input ids.

Every path that feeds the model goes through here: training and validation (``InputFormat.ends`` for
truncation), :class:`rewardforge.scoring.RewardScorer`, ``rewardforge score`` and every server endpoint
(:class:`ModelInputs`). An item is a prompt + response, a conversation (messages), raw text, or token ids.

**The input format** of a tokenizer (:class:`InputFormat`) is what surrounds the rendered conversation:

* ``lead`` / ``trail``: the special tokens every sequence starts / ends with ([CLS] ... [SEP] for BERT,
  ``<s>`` for Llama-2-style tokenizers). A training tokenizer adds them itself (``written=False``); an
  export writes them in its chat template instead and its tokenizer adds none (``written=True``, see
  :func:`make_self_sufficient`), so ``apply_chat_template(messages, tokenize=True)``,
  ``tokenizer(text, add_special_tokens=False)`` and ``tokenizer(text)`` all give the ids the model was
  trained on.
* ``suffix``: the template's end-of-turn text after a response (ChatML's ``<|im_end|>\\n``,
  Llama-3's ``<|eot_id|>``); truncation keeps it, so the reward is read where training read it.

**Normalisation** (on by default for text and token ids from clients; :meth:`ModelInputs.normalize_text`,
token ids decoded and read as text) brings what an RL trainer sends to that format, and says what it did:
padding (left or right, the RM's or the policy's pad) is stripped; a lead written twice (the policy's BOS
plus the tokenizer's) becomes one, a missing lead is added; trailing EOS runs the RM never saw are
stripped; a missing or partial end-of-turn suffix is completed. With a policy tokenizer
(:class:`ChatFormat`), a query in the policy's chat format is parsed into messages and rendered with the
RM's own template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from rewardforge.data.formats import Conversation
from rewardforge.data.readers import DataError
from rewardforge.data.template import TextRenderer, unwrap_template, wrap_template
from rewardforge.data.tokenize import TruncationStats, kept_ranges, text_ends, tokenize_texts

# A response nobody writes: rendered to find where a template puts the response's content.
SENTINEL = "\u2063rf-response\u2063"

# ---------------------------------------------------------------- the format


def _token_text(tokenizer, ids: Sequence[int]) -> str:
    return "".join(tokenizer.convert_ids_to_tokens(list(ids)))


def _added_by_tokenizer(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer itself puts before and after any text (its post-processor)."""
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    whole = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for k in range(len(whole) - len(bare) + 1):
        if whole[k : k + len(bare)] == bare:
            return list(whole[:k]), list(whole[k + len(bare):])
    return [], []


@dataclass(frozen=True)
class InputFormat:
    """What surrounds the rendered conversation in the model's input (see the module docstring).

    Attributes:
        lead: special-token text every sequence starts with ("" for none).
        trail: special-token text every whole conversation ends with.
        written: True when the text carries ``lead``/``trail`` (exports); False when the tokenizer adds them.
        suffix: the template's text after a response's content (end of turn), before ``trail``.
        lead_ids, trail_ids, suffix_ids: the same as token ids.
        eos, pad: the tokenizer's EOS and pad token texts (None if it has none).
    """

    lead: str = ""
    trail: str = ""
    written: bool = False
    suffix: str = ""
    lead_ids: tuple[int, ...] = ()
    trail_ids: tuple[int, ...] = ()
    suffix_ids: tuple[int, ...] = ()
    eos: str | None = None
    pad: str | None = None
    eos_id: int | None = None
    pad_id: int | None = None

    @classmethod
    def of(cls, tokenizer) -> "InputFormat":
        """The format of ``tokenizer`` with its chat template installed (``setup_template`` or an export)."""
        wrapped = unwrap_template(getattr(tokenizer, "chat_template", None))
        added_lead, added_trail = _added_by_tokenizer(tokenizer)
        if wrapped is not None and not (added_lead or added_trail):
            _, lead, trail = wrapped
            written = True
            lead_ids = tuple(tokenizer(lead, add_special_tokens=False)["input_ids"]) if lead else ()
            trail_ids = tuple(tokenizer(trail, add_special_tokens=False)["input_ids"]) if trail else ()
        else:
            lead, trail = _token_text(tokenizer, added_lead), _token_text(tokenizer, added_trail)
            written, lead_ids, trail_ids = False, tuple(added_lead), tuple(added_trail)
        suffix = template_suffix(tokenizer)
        suffix_ids = tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else ()
        return cls(lead, trail, written, suffix, lead_ids, trail_ids, suffix_ids,
                   tokenizer.eos_token, tokenizer.pad_token, tokenizer.eos_token_id, tokenizer.pad_token_id)

    @property
    def ends(self) -> tuple[str, str]:
        """(lead, tail) strings that truncation keeps (``tokenize_texts(..., ends=)``)."""
        return (self.lead if self.written else "", self.suffix + (self.trail if self.written else ""))

    def as_dict(self) -> dict[str, Any]:
        return {"lead": self.lead, "trail": self.trail, "written_by_template": self.written, "suffix": self.suffix}


def template_suffix(tokenizer) -> str:
    """The template's text after an assistant response's content (end of turn), without the format's trail.

    Rendered from a probe conversation; "" when the template writes nothing after the content or when the
    content cannot be found in the rendering.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return ""
    wrapped = unwrap_template(template)
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": SENTINEL}]
    try:
        if wrapped is not None:
            text = _render_jinja(tokenizer, wrapped[0], probe)
        else:
            text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects the probe: no suffix known
        return ""
    k = text.rfind(SENTINEL)
    return "" if k < 0 else text[k + len(SENTINEL):]


def _render_jinja(tokenizer, template: str, messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


# ---------------------------------------------------------------- exports


_NO_SPECIALS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def make_self_sufficient(tokenizer) -> tuple[bool, str]:
    """Make an export's tokenizer write its special tokens in the chat template instead of adding them.

    After this the template writes the lead ([CLS], BOS) and trail ([SEP]) the model was trained with, and
    ``tokenizer(text)`` adds none, so every ``add_special_tokens=False`` reader (TRL, verl, OpenRLHF's server)
    and plain ``tokenizer(text)`` read the same ids as training. Returns (done, reason if not).
    """
    from tokenizers import processors

    if unwrap_template(getattr(tokenizer, "chat_template", None)) is not None:
        return True, ""
    lead_ids, trail_ids = _added_by_tokenizer(tokenizer)
    base = getattr(tokenizer, "chat_template", None)
    if not base:
        return False, "the tokenizer has no chat template"
    if lead_ids or trail_ids:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        post = getattr(backend, "post_processor", None)
        if backend is None or post is None:
            return False, "the tokenizer adds special tokens but has no post-processor to change"
        kind = json.loads(post.__getstate__()).get("type")
        if kind in ("TemplateProcessing", "BertProcessing"):
            backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
        elif kind == "Sequence":
            members = json.loads(post.__getstate__()).get("processors", [])
            if any(m.get("type") == "RobertaProcessing" for m in members):
                return False, "a RobertaProcessing post-processor inside a Sequence"
            keep = [processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])]
            for m in members:
                if m.get("type") == "ByteLevel":
                    keep.append(processors.ByteLevel(trim_offsets=m.get("trim_offsets", True)))
            backend.post_processor = processors.Sequence(keep)
        else:
            return False, f"the tokenizer's post-processor {kind!r} is not one rewardforge can change"
        for flag in ("add_bos_token", "add_eos_token"):  # Llama-style classes rebuild the post-processor from these
            if hasattr(tokenizer, flag):
                try:
                    setattr(tokenizer, flag, False)
                except Exception:  # noqa: BLE001 - a read-only flag: the check just below says whether specials remain
                    continue
        if _added_by_tokenizer(tokenizer) != ([], []):
            return False, "the tokenizer still adds special tokens after its post-processor was changed"
    lead, trail = _token_text(tokenizer, lead_ids), _token_text(tokenizer, trail_ids)
    tokenizer.chat_template = wrap_template(base, lead, trail)
    return True, ""


def finish_saved_tokenizer(directory) -> None:
    """After ``save_pretrained``: load the tokenizer as the generic fast class, which takes tokenizer.json as
    written (model-specific classes such as BertTokenizer rebuild the post-processor and add [CLS]/[SEP] again)."""
    from pathlib import Path

    path = Path(directory) / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in cfg:
            cfg[flag] = False
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- parsing a policy's chat format


_PROBES = {"system": "\u2063rf-system\u2063", "user": "\u2063rf-user\u2063", "assistant": "\u2063rf-assistant\u2063",
           "user2": "\u2063rf-user-2\u2063", "assistant2": "\u2063rf-assistant-2\u2063"}


@dataclass
class ChatFormat:
    """A chat template read back from probe renderings, to parse text in that format into messages.

    Learned from the policy's tokenizer (``--policy-tokenizer``): the text before the first user turn (with
    and without a system message), between a user turn and the assistant's answer, between an answer and the
    next user turn, and after the last answer.
    """

    head: str
    head_system: str | None
    system_to_user: str
    user_to_assistant: str
    assistant_to_user: str
    generation: str  # after a user turn, with add_generation_prompt
    tail: str
    eos: str | None = None
    pad: str | None = None
    bos: str | None = None
    tokenizer: Any = None

    @classmethod
    def learn(cls, tokenizer) -> "ChatFormat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the policy tokenizer has no chat template; parsing its queries needs one")
        P = _PROBES
        conv = [{"role": "user", "content": P["user"]}, {"role": "assistant", "content": P["assistant"]},
                {"role": "user", "content": P["user2"]}, {"role": "assistant", "content": P["assistant2"]}]
        try:
            t = tokenizer.apply_chat_template(conv, tokenize=False)
            g = tokenizer.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"the policy tokenizer's chat template cannot render a probe conversation ({e})") from None
        pos = [t.find(P[k]) for k in ("user", "assistant", "user2", "assistant2")]
        if min(pos) < 0 or pos != sorted(pos):
            raise DataError("the policy tokenizer's chat template does not write message contents verbatim; "
                            "its queries cannot be parsed (drop --policy-tokenizer)")
        head = t[: pos[0]]
        u2a = t[pos[0] + len(P["user"]) : pos[1]]
        a2u = t[pos[1] + len(P["assistant"]) : pos[2]]
        tail = t[pos[3] + len(P["assistant2"]):]
        generation = g[g.find(P["user"]) + len(P["user"]):]
        head_system, s2u = None, ""
        try:
            ts = tokenizer.apply_chat_template([{"role": "system", "content": P["system"]}] + conv[:2], tokenize=False)
            ks, ku = ts.find(P["system"]), ts.find(P["user"])
            if 0 <= ks < ku:
                head_system, s2u = ts[:ks], ts[ks + len(P["system"]) : ku]
        except Exception:  # noqa: BLE001 - templates without a system role
            pass
        return cls(head, head_system, s2u, u2a, a2u, generation, tail,
                   tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token, tokenizer)

    def parse(self, text: str) -> tuple[list[dict], str] | None:
        """(prompt messages, response) of ``text`` (a whole conversation in this format, the last turn the
        assistant's, possibly unfinished); None if ``text`` is not in this format."""
        messages: list[dict] = []
        rest = None
        if self.head_system is not None and self.head_system != self.head and text.startswith(self.head_system) \
                and self.system_to_user:
            body = text[len(self.head_system):]
            k = body.find(self.system_to_user)
            if k >= 0:
                messages.append({"role": "system", "content": body[:k]})
                rest = body[k + len(self.system_to_user):]
        if rest is None:
            if not text.startswith(self.head):
                return None
            rest = text[len(self.head):]
        answer_sep = self.generation if self.generation and self.generation in rest else self.user_to_assistant
        while True:
            k = rest.find(self.user_to_assistant) if self.user_to_assistant else -1
            if k < 0:
                k = rest.find(answer_sep) if answer_sep else -1
                sep = answer_sep
            else:
                sep = self.user_to_assistant
            if k < 0:
                return None
            messages.append({"role": "user", "content": rest[:k]})
            rest = rest[k + len(sep):]
            j = rest.find(self.assistant_to_user) if self.assistant_to_user else -1
            if j < 0:
                response = rest
                break
            messages.append({"role": "assistant", "content": rest[:j]})
            rest = rest[j + len(self.assistant_to_user):]
        # the end of the last turn: the template's tail (or its start), EOS and padding
        for _ in range(64):
            before = response
            for s in (self.pad, self.eos, self.tail):
                if s and response.endswith(s):
                    response = response[: -len(s)]
            if self.tail:
                for k in range(len(self.tail) - 1, 0, -1):
                    if response.endswith(self.tail[:k]) and self.tail[:k].strip():
                        response = response[:-k]
                        break
            if response == before:
                break
        return messages, response


# ---------------------------------------------------------------- items -> ids


NORMALIZATIONS = ("stripped_padding", "stripped_duplicate_lead", "added_lead", "stripped_eos", "added_suffix", "rerendered",
                  "retokenized")


@dataclass
class Prepared:
    """Model inputs of n items, in item order."""

    seqs: list[np.ndarray]
    num_tokens: np.ndarray
    truncated: np.ndarray
    texts: list[str | None]  # the text each item became before truncation (None for token ids)
    starts: list[int]
    normalized: list[list[str]] = field(default_factory=list)  # per item, what normalisation did
    full_lengths: np.ndarray | None = None  # tokens before truncation

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(NORMALIZATIONS, 0)
        for acts in self.normalized:
            for a in acts:
                out[a] = out.get(a, 0) + 1
        return out


class ModelInputs:
    """Turns items into the model's input ids with an export's (or a run's) tokenizer and limits.

    Args:
        tokenizer: the model's tokenizer with its chat template installed.
        max_length: the most tokens the model reads; longer inputs are truncated (``truncation``).
        truncation: ``prompt_left`` or ``response_right`` (:mod:`rewardforge.data.tokenize`).
        policy: a :class:`ChatFormat` of the policy's tokenizer, to re-render its queries (optional).
    """

    def __init__(self, tokenizer, max_length: int, truncation: str = "prompt_left", policy: ChatFormat | None = None):
        self.tokenizer = tokenizer
        self.max_length, self.truncation = int(max_length), truncation
        self.renderer = TextRenderer(tokenizer)
        self.format = InputFormat.of(tokenizer)
        self.policy = policy
        self._own: ChatFormat | bool | None = None

    # ------------------------------------------------------------ rendering

    def render(self, prompt: Conversation, response: Conversation, where: str = "") -> tuple[str, int]:
        """(text, response_start) of a prompt (string: one user turn; or messages) and a response."""
        p = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        r = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
        return self.renderer.render(p, r, where)

    def render_messages(self, messages: list[dict], where: str = "") -> tuple[str, int]:
        """A whole conversation whose last message is the assistant response scored."""
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise DataError(f"{where + ': ' if where else ''}messages: the last message must be the assistant response to score")
        return self.renderer.render(list(messages[:-1]), list(messages[-1:]), where)

    # ------------------------------------------------------------ normalisation

    def _strip_end(self, text: str, strings: Sequence[str | None]) -> tuple[str, bool]:
        changed = False
        again = True
        while again:
            again = False
            for s in strings:
                if s and text.endswith(s):
                    text, again, changed = text[: -len(s)], True, True
        return text, changed

    def normalize_text(self, text: str, response_start: int | None = None) -> tuple[str, int, list[str]]:
        """``text`` (a whole sequence, perhaps with the policy's special tokens and padding) in the model's format.

        Returns (text, response_start moved with it, what was done). See the module docstring for the rules.
        """
        f, acts = self.format, []
        start = len(text) if response_start is None else response_start
        pads = [p for p in {f.pad, getattr(self.policy, "pad", None)} if p]
        eoses = [e for e in {f.eos, getattr(self.policy, "eos", None)} if e]
        # padding at either end
        stripped_front = 0
        again = True
        while again:
            again = False
            for p in pads:
                if text.startswith(p):
                    text, stripped_front, again = text[len(p):], stripped_front + len(p), True
            for e in eoses:  # EOS runs as left padding (OpenRLHF 0.8 pads with the policy's EOS)
                if e != f.lead and text.startswith(e):
                    text, stripped_front, again = text[len(e):], stripped_front + len(e), True
        text, pad_end = self._strip_end(text, pads)
        if stripped_front or pad_end:
            acts.append("stripped_padding")
        start = max(0, start - stripped_front)
        # the lead: exactly once when the text carries it, never when the tokenizer adds it
        if f.lead:
            n = 0
            while text.startswith(f.lead):
                text, n = text[len(f.lead):], n + 1
            start = max(0, start - n * len(f.lead))
            if n > 1 or (n == 1 and not f.written):
                acts.append("stripped_duplicate_lead")
            if f.written:
                if n == 0:
                    acts.append("added_lead")
                text, start = f.lead + text, start + len(f.lead)
        # the end: no trailing EOS the model never saw; the end-of-turn suffix complete; the trail once
        trail = f.trail if f.written else ""
        body, _ = self._strip_end(text, [trail, *eoses, *pads] if trail else [*eoses, *pads])
        removed, added = text[len(body):], ""
        if f.suffix and not body.endswith(f.suffix):
            k = next((k for k in range(len(f.suffix) - 1, 0, -1) if body.endswith(f.suffix[:k])), 0)
            added = f.suffix[k:]
        new = body + added + trail
        if new != text:
            if removed and not (added + trail).startswith(removed):
                acts.append("stripped_eos")
            if added:
                acts.append("added_suffix")
        return new, min(start, len(body)), acts

    def _own_format(self) -> "ChatFormat | None":
        if self._own is None:
            try:
                self._own = ChatFormat.learn(self.tokenizer)
            except DataError:
                self._own = False
        return self._own or None

    def _response_start(self, text: str) -> int | None:
        """Where the response starts in ``text`` (a whole conversation in the model's own format), or None."""
        own = self._own_format()
        parsed = own.parse(text) if own is not None else None
        if parsed is None or not parsed[0]:
            return None
        try:
            t, s = self.render(parsed[0], parsed[1])
        except DataError:
            return None
        return s if t == text else None

    def from_text(self, text: str, prompt: str | None = None) -> tuple[str, int, list[str]]:
        """A whole sequence from an RL trainer (OpenRLHF's ``query``, decoded token ids) as the model's input:
        (text, response_start, actions).

        In order: a text in the policy's chat format (:class:`ChatFormat` of ``--policy-tokenizer``) is parsed into
        messages and rendered with the model's own template; otherwise the text is normalised
        (:meth:`normalize_text`) and, when it then parses as a conversation in the model's own chat format, rendered
        from those messages exactly as ``score(messages)`` renders them (templates that trim contents, say); otherwise
        the response starts after ``prompt`` (OpenRLHF's ``prompts``) when the text starts with it, so truncation cuts
        what it cuts for ``score(messages)``.
        """
        if self.policy is not None:
            parsed = self.policy.parse(self._strip_padding(text))
            if parsed is not None and parsed[0]:
                t, s = self.render(parsed[0], parsed[1], "query")
                return t, s, ["rerendered"]
        t, s, acts = self.normalize_text(text)
        own = self._own_format()
        parsed = own.parse(t) if own is not None else None
        if parsed is not None and parsed[0]:
            try:
                t2, s2 = self.render(parsed[0], parsed[1])
            except DataError:
                t2 = None
            if t2 is not None:
                if t2 != t:
                    acts = acts + ["rerendered"]
                return t2, s2, acts
        if prompt:
            bare = self._bare_start(prompt)
            at = len(self.format.lead) if self.format.written else 0
            if bare and t.startswith(bare, at):
                s = at + len(bare)
        return t, s, acts

    def _bare_start(self, text: str) -> str:
        """``text`` without the padding, EOS and leads at its start and the padding at its end."""
        text = self._strip_padding(text)
        lead = self.format.lead
        while lead and text.startswith(lead):
            text = text[len(lead):]
        return text

    def decode(self, ids) -> str:
        """Token ids as text (the policy's tokenizer when one is given), special tokens kept."""
        tok = getattr(self.policy, "tokenizer", None) or self.tokenizer
        return tok.decode([int(x) for x in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _strip_padding(self, text: str) -> str:
        """Padding at both ends, and EOS runs at the start (OpenRLHF 0.8 left-pads with the policy's EOS)."""
        f = self.format
        pads = [p for p in {f.pad, getattr(self.policy, "pad", None)} if p]
        front = pads + [e for e in {f.eos, getattr(self.policy, "eos", None)} if e and e != f.lead]
        again = True
        while again:
            again = False
            for p in front:
                if text.startswith(p):
                    text, again = text[len(p):], True
        text, _ = self._strip_end(text, pads)
        return text

    # ------------------------------------------------------------ tokenization

    def encode(self, texts: list[str], starts: list[int], stats: TruncationStats | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """(int32 ids truncated to max_length, lengths before truncation) of rendered texts."""
        return tokenize_texts(self.tokenizer, texts, starts, self.max_length, self.truncation,
                              stats if stats is not None else TruncationStats(), ends=self.format.ends)

    def truncate_ids(self, ids: np.ndarray) -> tuple[np.ndarray, bool]:
        """Token ids cut to max_length as text is: the prompt's oldest tokens first, the lead and the
        end-of-turn tail kept (token ids carry no response boundary: the whole sequence counts as prompt)."""
        n = len(ids)
        if n <= self.max_length:
            return ids, False
        f = self.format
        keep_lead = len(f.lead_ids) if list(ids[: len(f.lead_ids)]) == list(f.lead_ids) else 0
        tail = list(f.suffix_ids) + list(f.trail_ids)
        keep_tail = len(tail) if tail and list(ids[n - len(tail):]) == tail else 0
        room = self.max_length - keep_lead - keep_tail
        if room < 1:
            raise DataError(f"max_length={self.max_length} leaves no room for content after the special tokens")
        body = ids[keep_lead : n - keep_tail]
        return np.concatenate([ids[:keep_lead], body[len(body) - room:], ids[n - keep_tail:]]), True

    def read_text(self, text: str, start: int) -> str:
        """The part of ``text`` the model reads after truncation (``text`` itself when it fits).

        ``tokenizer(result)`` (and ``tokenizer(result, add_special_tokens=False)`` for exports) gives the ids read.
        """
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True,
                             return_attention_mask=False, return_token_type_ids=False, verbose=False)
        ids = enc["input_ids"]
        if len(ids) <= self.max_length:
            return text
        offsets, special = enc["offset_mapping"], enc["special_tokens_mask"]
        ranges = kept_ranges(ids, offsets, special, start, self.max_length, self.truncation,
                             text_ends(text, self.format.ends), len(text))
        pieces = []
        for a, b in ranges:
            spans = [offsets[k] for k in range(a, b) if offsets[k][1] > offsets[k][0]]
            if spans:
                pieces.append(text[spans[0][0] : spans[-1][1]])
        return "".join(pieces)

    # ------------------------------------------------------------ items

    def prepare(self, items: list[dict[str, Any]], field_name: str = "items", *, normalize: bool = True,
                check_ids=None, where: Sequence[str] | None = None) -> Prepared:
        """Model inputs of items, each one of ``{"prompt", "response"}``, ``{"messages"}``, ``{"text"}`` (optionally
        with ``"prompt"`` for an OpenRLHF query), ``{"input_ids"}``.

        ``check_ids(ids, where)`` validates token ids (vocabulary range) before they are used.
        Raises DataError naming the item (``where[i]``, default ``field_name[i]``) for an item that cannot be rendered.
        """
        n = len(items)
        seqs: list[np.ndarray | None] = [None] * n
        num_tokens = np.zeros(n, np.int64)
        truncated = np.zeros(n, bool)
        texts: list[str | None] = [None] * n
        starts = [0] * n
        acts: list[list[str]] = [[] for _ in range(n)]
        full_lengths = np.zeros(n, np.int64)
        original: dict[int, list[int]] = {}  # token-id items read as text
        text_idx: list[int] = []
        labels = list(where) if where is not None else [f"{field_name}[{i}]" for i in range(n)]
        for i, item in enumerate(items):
            where_i = labels[i]
            if "input_ids" in item:
                arr = check_ids(item["input_ids"], f"{where_i}.input_ids") if check_ids else np.asarray(item["input_ids"], np.int64)
                if normalize:  # decoded and read as text: the tokenization the model was trained on
                    t, s, acts[i] = self.from_text(self.decode(arr))
                    original[i] = [int(x) for x in arr]
                else:
                    full_lengths[i] = len(arr)
                    arr, truncated[i] = self.truncate_ids(arr)
                    seqs[i] = arr.astype(np.int32)
                    num_tokens[i] = len(arr)
                    continue
            elif "text" in item:
                if normalize:
                    t, s, acts[i] = self.from_text(item["text"], item.get("prompt"))
                else:
                    t, s = item["text"], len(item["text"])
            elif "messages" in item:
                t, s = self.render_messages(item["messages"], where_i)
            else:
                t, s = self.render(item["prompt"], item["response"], where_i)
            texts[i], starts[i] = t, s
            text_idx.append(i)
        if text_idx:
            ids, full = self.encode([texts[i] for i in text_idx], [starts[i] for i in text_idx])
            for k, i in enumerate(text_idx):
                if len(ids[k]) == 0:
                    raise DataError(f"{labels[i]}: the text has no tokens; send some text")
                seqs[i] = ids[k]
                num_tokens[i] = len(ids[k])
                truncated[i] = full[k] > len(ids[k])
                full_lengths[i] = full[k]
                if i in original:
                    texts[i] = None
                    if not acts[i] and not truncated[i] and [int(x) for x in ids[k]] != original[i]:
                        acts[i] = ["retokenized"]
        return Prepared(seqs, num_tokens, truncated, texts, starts, acts, full_lengths)  # type: ignore[arg-type]
