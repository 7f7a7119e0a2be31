"""Turn a prompt and a response into the exact text the model reads.

The tokenizer's own chat template is used when it has one; otherwise rewardforge installs its
``plain`` template (``Human: ...`` / ``Assistant: ...`` turns, as in HH-RLHF) *as the tokenizer's
chat template*, so the exported tokenizer carries it and plain ``transformers`` users can
reproduce the text with ``tokenizer.apply_chat_template``.
"""

from __future__ import annotations

import json
import os
import re

from rewardforge.data.formats import Conversation, common_prefix_length
from rewardforge.data.readers import DataError

PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' }}"
    "{% else %}{{ message['role'] | capitalize }}{{ ': ' }}{% endif %}"
    "{{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}{{ 'Assistant: ' }}{% endif %}"
)
TEMPLATES = ("auto", "plain", "tokenizer")


def setup_template(tokenizer, template: str) -> str:
    """Install the chosen template on the tokenizer and return its name ('tokenizer' or 'plain')."""
    if template not in TEMPLATES:
        raise DataError(f"data.template={template!r} is not valid; choose one of {', '.join(TEMPLATES)}")
    wrap = unwrap_template(getattr(tokenizer, "chat_template", None))
    base = wrap[0] if wrap is not None else getattr(tokenizer, "chat_template", None)
    has_own = bool(base) and base != PLAIN_TEMPLATE
    if template == "tokenizer" and not has_own:
        raise DataError("data.template=tokenizer but the tokenizer has no chat template; use data.template=plain or auto")
    if template == "plain" or (template == "auto" and not has_own):
        if base != PLAIN_TEMPLATE:
            tokenizer.chat_template = PLAIN_TEMPLATE
        return "plain"
    return "tokenizer"


def fast_paths_enabled() -> bool:
    """Whether the exact fast paths of rendering and tokenization are on (``REWARDFORGE_FAST_PREPROCESS=0``: off)."""
    return os.environ.get("REWARDFORGE_FAST_PREPROCESS", "1").strip().lower() not in ("0", "false", "no", "off")


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


_PLAIN_PREFIX = {"user": "Human: ", "assistant": "Assistant: "}


def _plain_parts(messages) -> list[str] | None:
    """Each message as PLAIN_TEMPLATE writes it, or None where only Jinja itself is sure to render the same.

    Only plain ``dict`` messages whose role and content are exactly ``str`` qualify; for them the template's
    output is ``'\\n\\n'.join`` of these parts (``role | capitalize`` is ``str.capitalize``). Anything else
    (other mappings, str subclasses, None, missing keys, an empty list, which transformers rejects) goes to
    Jinja, so errors are raised exactly as before.
    """
    if type(messages) is not list or not messages:
        return None
    parts = []
    for m in messages:
        if type(m) is not dict:
            return None
        role, content = m.get("role"), m.get("content")
        if type(role) is not str or type(content) is not str:
            return None
        prefix = _PLAIN_PREFIX.get(role)
        parts.append((prefix if prefix is not None else role.capitalize() + ": ") + content)
    return parts


class TextRenderer:
    """Renders (prompt, response) into one string plus the character where the response starts.

    The string is such that ``tokenizer(text)`` gives exactly the tokens the model reads: a BOS
    that the template writes and the tokenizer also adds is written only once.

    With rewardforge's own ``plain`` template installed, messages are rendered by a pure-Python
    equivalent of the Jinja template (byte-identical, see ``_plain_parts``; tests/test_preprocess_fast.py
    checks it against ``apply_chat_template``). ``fast=False`` (or ``REWARDFORGE_FAST_PREPROCESS=0``)
    always renders with Jinja.
    """

    def __init__(self, tokenizer, fast: bool | None = None):
        self.tokenizer = tokenizer
        self._strip_bos = tokenizer.bos_token if _adds_bos(tokenizer) else None
        self.fast = fast_paths_enabled() if fast is None else bool(fast)
        self._wrap_seen: object = object()  # the template _wrap was read from (re-read when it changes)
        self._wrap = None

    def _wrapped(self):
        """(base template, lead, trail) of an export's template (:func:`wrap_template`), or None."""
        template = getattr(self.tokenizer, "chat_template", None)
        if template is not getattr(self, "_wrap_seen", None):
            self._wrap_seen, self._wrap = template, unwrap_template(template)
        return self._wrap

    def _finish(self, text: str, generation_prompt: bool = False) -> str:
        wrap = self._wrapped()
        if wrap is not None:  # the export's template: its lead once, its trail after a whole conversation
            _, lead, trail = wrap
            if lead and text.startswith(lead):
                text = text[len(lead):]
            return lead + text + ("" if generation_prompt else trail)
        if self._strip_bos and text.startswith(self._strip_bos):
            text = text[len(self._strip_bos):]
        return text

    def _plain_ok(self) -> bool:
        # read on every call, as apply_chat_template reads it: the template may be changed after construction
        if not self.fast:
            return False
        wrap = self._wrapped()
        template = wrap[0] if wrap is not None else getattr(self.tokenizer, "chat_template", None)
        return template == PLAIN_TEMPLATE

    def _jinja(self, messages: list, generation_prompt: bool) -> str:
        wrap = self._wrapped()
        kwargs = {"chat_template": wrap[0]} if wrap is not None else {}
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
        return self._finish(text, generation_prompt)

    def _chat(self, messages: list, generation_prompt: bool) -> str:
        if self._plain_ok():
            parts = _plain_parts(messages)
            if parts is not None:
                return self._finish("\n\n".join(parts) + ("\n\nAssistant: " if generation_prompt else ""), generation_prompt)
        return self._jinja(messages, generation_prompt)

    def render(self, prompt: Conversation, response: Conversation, where: str = "") -> tuple[str, int]:
        """Return ``(text, response_start)``; ``text[:response_start]`` is the prompt part."""
        if isinstance(response, str):
            if not isinstance(prompt, str):
                prompt = self._chat(prompt, True) if prompt else ""
            return prompt + response, len(prompt)
        if isinstance(prompt, str):
            raise DataError(f"{where}: a plain-text prompt cannot be combined with a message-list response")
        try:
            full = self._chat(list(prompt) + list(response), False)
            head = self._chat(list(prompt), True) if prompt else ""
        except Exception as e:  # jinja errors, templates rejecting roles
            raise DataError(f"{where}: the chat template cannot render these messages ({type(e).__name__}: {e})") from None
        return full, self._start(head, full)

    def _start(self, head: str, full: str) -> int:
        if not self.fast:  # the reference: character by character
            n = min(len(head), len(full))
            i = 0
            while i < n and head[i] == full[i]:
                i += 1
            return i
        return common_prefix_length(head, full)

    def render_pair(
        self, prompt: Conversation, chosen: Conversation, rejected: Conversation, where: str = ""
    ) -> tuple[str, int, str, int]:
        """``render(prompt, chosen) + render(prompt, rejected)``, rendering the shared prompt once.

        Same texts, same starts and the same first error as the two ``render`` calls.
        """
        if not self.fast or isinstance(prompt, str) or isinstance(chosen, str) or isinstance(rejected, str):
            return (*self.render(prompt, chosen, where), *self.render(prompt, rejected, where))
        try:
            plain = self._plain_ok()
            pp = _plain_parts(list(prompt)) if plain and prompt else None
            cp = _plain_parts(list(chosen)) if pp is not None else None
            rp = _plain_parts(list(rejected)) if cp is not None else None
            if rp is not None:  # everything plain: join the parts (no Jinja at all)
                body = "\n\n".join(pp)
                full_c = self._finish(body + "\n\n" + "\n\n".join(cp))
                head = self._finish(body + "\n\nAssistant: ", True)
                full_r = self._finish(body + "\n\n" + "\n\n".join(rp))
            else:  # in the order render() would: chosen text, prompt head, rejected text
                full_c = self._chat(list(prompt) + list(chosen), False)
                head = self._chat(list(prompt), True) if prompt else ""
                full_r = self._chat(list(prompt) + list(rejected), False)
        except Exception as e:  # jinja errors, templates rejecting roles
            raise DataError(f"{where}: the chat template cannot render these messages ({type(e).__name__}: {e})") from None
        return full_c, self._start(head, full_c), full_r, self._start(head, full_r)


# ---------------------------------------------------------------- the exported chat template

_WRAP_HEAD = "{#- rewardforge input format: "
_WRAP_RE = re.compile(r"^\{#- rewardforge input format: (\{.*?\}) -#\}\{% set rf_body %\}(.*)\{% endset %\}", re.S)


def wrap_template(base: str, lead: str, trail: str) -> str:
    """``base`` as a template that also writes ``lead`` before and ``trail`` after the conversation.

    A ``lead`` the base template writes itself (Llama-3's ``<|begin_of_text|>``) is written once. ``trail``
    is left out when ``add_generation_prompt`` is set (the text goes on after it).
    """
    meta = json.dumps({"lead": lead, "trail": trail}, ensure_ascii=True)
    lit_lead, lit_trail = json.dumps(lead), json.dumps(trail)
    return (
        f"{_WRAP_HEAD}{meta} -#}}"
        "{% set rf_body %}" + base + "{% endset %}"
        f"{{%- set rf_lead = {lit_lead} -%}}"
        "{%- if rf_lead and rf_body.startswith(rf_lead) -%}{%- set rf_body = rf_body[rf_lead | length:] -%}{%- endif -%}"
        "{{- rf_lead -}}{{- rf_body -}}"
        f"{{%- if not add_generation_prompt -%}}{{{{- {lit_trail} -}}}}{{%- endif -%}}"
    )


def unwrap_template(template: str | None) -> tuple[str, str, str] | None:
    """(base template, lead, trail) of a template made by :func:`wrap_template`; None for any other."""
    if not template or not template.startswith(_WRAP_HEAD):
        return None
    m = _WRAP_RE.match(template)
    if m is None:
        return None
    meta = json.loads(m.group(1))
    return m.group(2), meta["lead"], meta["trail"]
