"""Chat templates as data: a conversation -> text -> token ids with a per-token "supervised" mask.

A chat model is trained on conversations rendered to one string by a *chat template*; at inference the same
template renders the prompt and appends the *generation prompt* (the assistant header), so the model continues
exactly where it learned to answer. Any difference between the two renderings (a missing newline, a different
end-of-turn token) silently costs accuracy, which is why the template is data (``ChatTemplate``) used for
training, for generation and for the Jinja ``chat_template`` string that Hugging Face's
``tokenizer.apply_chat_template`` runs — one source, three uses.

Templates (``TEMPLATES``; u/a = user/assistant content, s = system prompt):

=======  ==================================================================================================
plain    the synthetic ``Q:/A:`` format (``intro2llm.data.synthetic``): ``s\\n`` + ``u`` + ``a`` + ``<|endoftext|>``
         (user content is the prompt ``"Q: 12+35=?\\nA:"``, assistant content the response ``" 47\\n"``)
chatml   ``<|im_start|>system\\ns<|im_end|>\\n<|im_start|>user\\nu<|im_end|>\\n<|im_start|>assistant\\na<|im_end|>\\n``
llama2   ``<s>[INST] <<SYS>>\\ns\\n<</SYS>>\\n\\nu [/INST] a </s>`` (the system prompt goes into the first user turn;
         every later turn is ``<s>[INST] u [/INST] a </s>``), as Meta's / Hugging Face's Llama-2 chat format
=======  ==================================================================================================

Supervision (what SFT trains on): the assistant *content* and its *end token* (``assistant_end``: ``<|im_end|>``,
`` </s>``, ``<|endoftext|>``), so the model learns both the answer and when to stop. Everything else — system,
user turns, role headers, the newline after ``<|im_end|>`` — is context only (label -100).

Tokenization: ``encode_conversation`` encodes the rendered *segments* one by one (template text with the
template's special tokens allowed, message content with every special token *disallowed*, so a user who types
``<|im_end|>`` gets a ``ValueError`` instead of a forged turn) and concatenates the ids. Hence the prompt ids
(``encode_prompt``, with the generation prompt) are always an exact prefix of the training ids of the same
conversation. Where the pre-tokenizer splits at these boundaries anyway (character-level; GPT-2 byte-level for
ChatML and plain) the ids also equal Hugging Face's whole-text ``apply_chat_template`` ids (tested); Llama-2's
``"[INST] "`` ends in a space that whole-text BPE merges into the next word, so there the ids differ at that seam
(the reason TRL, too, tokenizes prompt and completion separately).

Special tokens: ``ensure_special_tokens(tokenizer, template)`` appends the template's special tokens that the
tokenizer lacks (they are then saved by ``tokenizer.save`` in ``tokenizer.json``); the model's embedding must
grow to match (``intro2llm.training.sft_trainer.resize_token_embeddings``). ``write_chat_template(dir, ...)``
writes ``tokenizer_config.json`` with the Jinja ``chat_template`` (with ``{% generation %}`` blocks, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks the same characters as our mask).

Not handled: tool calls, multi-modal content, the Llama-3 / Gemma formats, whitespace stripping of contents
(contents are rendered verbatim; Hugging Face's Llama-2 template ``strip()``s them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from intro2llm._io import atomic_write

ROLES = ("system", "user", "assistant")
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format as data: the literal text around each message (see the module docstring)."""

    name: str
    special_tokens: tuple[str, ...]  # tokens that must be single special ids in the tokenizer
    stop_token: str  # the special token generation stops at (end of an assistant turn)
    system_prefix: str = ""  # a separate system turn: system_prefix + s + system_suffix
    system_suffix: str = ""
    system_in_user: str | None = None  # else: the system prompt is put in the first user turn by this format
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""  # the generation prompt (context, not supervised)
    assistant_end: str = ""  # supervised, right after the content; contains stop_token
    assistant_after: str = ""  # context after the end token (e.g. ChatML's newline)

    def __post_init__(self) -> None:
        if self.stop_token not in self.special_tokens or self.stop_token not in self.assistant_end:
            raise ValueError(f"template {self.name!r}: stop_token {self.stop_token!r} must be one of its special "
                             f"tokens and appear in assistant_end {self.assistant_end!r}")

    # ------------------------------------------------------------------------------------------ rendering
    def segments(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False
                 ) -> list[tuple[str, str, bool]]:
        """The rendered conversation as ``(text, kind, supervised)`` pieces; kind is "template" or "content"."""
        msgs = validate_messages(messages, allow_no_assistant=True)
        out: list[tuple[str, str, bool]] = []
        system = None
        if msgs and msgs[0]["role"] == "system":
            system = msgs[0]["content"]
            msgs = msgs[1:]
            if self.system_in_user is None:
                out += [(self.system_prefix, "template", False), (system, "content", False),
                        (self.system_suffix, "template", False)]
                system = None
        for i, m in enumerate(msgs):
            if m["role"] == "user":
                out.append((self.user_prefix, "template", False))
                if system is not None and i == 0:
                    before, after = self.system_in_user.split("{system}")
                    out += [(before, "template", False), (system, "content", False), (after, "template", False)]
                out += [(m["content"], "content", False), (self.user_suffix, "template", False)]
            else:
                out += [(self.assistant_prefix, "template", False), (m["content"], "content", True),
                        (self.assistant_end, "template", True), (self.assistant_after, "template", False)]
        if add_generation_prompt:
            if msgs and msgs[-1]["role"] == "assistant":
                raise ValueError("add_generation_prompt=True needs a conversation that ends with a user turn")
            out.append((self.assistant_prefix, "template", False))
        return [s for s in out if s[0]]

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The conversation as one string (what ``apply_chat_template(tokenize=False)`` returns)."""
        return "".join(t for t, _, _ in self.segments(messages, add_generation_prompt=add_generation_prompt))

    # ------------------------------------------------------------------------------------------ Jinja
    def jinja(self) -> str:
        """A Jinja ``chat_template`` for Hugging Face that renders exactly ``render`` (with generation blocks)."""
        q = _jinja_str
        parts = ["{%- set msgs = messages -%}"]
        if self.system_in_user is not None:
            before, after = self.system_in_user.split("{system}")
            parts.append(
                "{%- if msgs and msgs[0]['role'] == 'system' -%}"
                "{%- set sys_text = " + q(before) + " + msgs[0]['content'] + " + q(after) + " -%}"
                "{%- set msgs = msgs[1:] -%}"
                "{%- else -%}{%- set sys_text = '' -%}{%- endif -%}"
            )
        parts.append("{%- for m in msgs -%}")
        parts.append("{%- if m['role'] == 'system' -%}{{ " + q(self.system_prefix) + " + m['content'] + "
                     + q(self.system_suffix) + " }}")
        user_sys = " + sys_text" if self.system_in_user is not None else ""
        parts.append("{%- elif m['role'] == 'user' -%}{{ " + q(self.user_prefix)
                     + (" + (sys_text if loop.first else '')" if user_sys else "")
                     + " + m['content'] + " + q(self.user_suffix) + " }}")
        parts.append("{%- elif m['role'] == 'assistant' -%}{{ " + q(self.assistant_prefix) + " }}"
                     "{%- generation -%}{{ m['content'] + " + q(self.assistant_end) + " }}{%- endgeneration -%}"
                     "{{ " + q(self.assistant_after) + " }}")
        parts.append("{%- endif -%}{%- endfor -%}")
        parts.append("{%- if add_generation_prompt -%}{{ " + q(self.assistant_prefix) + " }}{%- endif -%}")
        return "".join(parts)


def _jinja_str(s: str) -> str:
    """A Jinja string literal for ``s`` (JSON escapes are valid Jinja escapes)."""
    return json.dumps(s, ensure_ascii=False)


TEMPLATES: dict[str, ChatTemplate] = {
    "plain": ChatTemplate(
        name="plain", special_tokens=("<|endoftext|>",), stop_token="<|endoftext|>",
        system_suffix="\n", assistant_end="<|endoftext|>",
    ),
    "chatml": ChatTemplate(
        name="chatml", special_tokens=("<|im_start|>", "<|im_end|>"), stop_token="<|im_end|>",
        system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant_end="<|im_end|>", assistant_after="\n",
    ),
    "llama2": ChatTemplate(
        name="llama2", special_tokens=("<s>", "</s>"), stop_token="</s>",
        system_in_user="<<SYS>>\n{system}\n<</SYS>>\n\n",
        user_prefix="<s>[INST] ", user_suffix=" [/INST]", assistant_prefix=" ", assistant_end=" </s>",
    ),
}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """The template called ``name``; ``ValueError`` listing the valid names otherwise."""
    if isinstance(name, ChatTemplate):
        return name
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown chat template {name!r}; valid templates: {', '.join(TEMPLATES)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------------------------
def validate_messages(messages: Sequence[Mapping[str, str]], *, allow_no_assistant: bool = False
                      ) -> list[dict[str, str]]:
    """Check a conversation: optional leading system turn, then user/assistant turns alternating from a user
    turn; contents are strings and assistant contents are non-empty. Returns plain dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"a conversation is a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TypeError(f"message {i} ({role}) content must be a str, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if role == "assistant" and not content:
            raise ValueError(f"message {i}: empty assistant response (nothing to learn or to prefer)")
        out.append({"role": role, "content": content})
    turns = out[1:] if out and out[0]["role"] == "system" else out
    for j, m in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"turns must alternate user/assistant starting with user; turn {j} is {m['role']!r}")
    if not allow_no_assistant and not any(m["role"] == "assistant" for m in out):
        raise ValueError("the conversation has no assistant turn: nothing to supervise")
    return out


def messages(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    """Alternating user / assistant contents -> ``[system?, user, assistant, user, ...]`` messages."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def pair_to_messages(prompt: str, response: str, system: str | None = None) -> list[dict[str, str]]:
    """``(prompt, response)`` -> ``[system?, user, assistant]`` messages."""
    return messages(prompt, response, system=system)


# ---------------------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------------------
def _encode_segments(tokenizer: Any, template: ChatTemplate, segs: list[tuple[str, str, bool]]
                     ) -> tuple[list[int], list[bool]]:
    missing = [t for t in template.special_tokens if t not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"the tokenizer lacks the {template.name!r} template's special tokens {missing}; "
                         "call intro2llm.data.chat.ensure_special_tokens(tokenizer, template) first")
    allowed = set(template.special_tokens)
    ids: list[int] = []
    mask: list[bool] = []
    for text, kind, supervised in segs:
        if kind == "template":
            piece = tokenizer.encode(text, allowed_special=allowed, disallowed_special=())
        else:
            try:
                piece = tokenizer.encode(text)  # every special token disallowed in user-controlled text
            except ValueError as exc:
                raise ValueError(f"message content {text[:60]!r}: {exc}") from None
        ids += piece
        mask += [supervised] * len(piece)
    return ids, mask


def encode_conversation(tokenizer: Any, template: str | ChatTemplate, messages: Sequence[Mapping[str, str]]
                        ) -> tuple[list[int], list[bool]]:
    """Token ids of a training conversation and a same-length mask, True on the tokens SFT supervises
    (assistant content + its end token). ``ValueError`` without an assistant turn or with an empty response."""
    template = get_template(template)
    validate_messages(messages)
    return _encode_segments(tokenizer, template, template.segments(messages))


def encode_prompt(tokenizer: Any, template: str | ChatTemplate, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation that ends with a user turn, plus the generation prompt (for ``generate``)."""
    template = get_template(template)
    return _encode_segments(tokenizer, template, template.segments(messages, add_generation_prompt=True))[0]


def ensure_special_tokens(tokenizer: Any, template: str | ChatTemplate) -> list[str]:
    """Add the template's special tokens the tokenizer lacks (appended after its vocabulary); returns the added
    ones. Save the tokenizer afterwards (``tokenizer.save``) and grow the model's embeddings to its vocab_size."""
    template = get_template(template)
    added = [t for t in template.special_tokens if t not in tokenizer.special_tokens]
    if added:
        tokenizer._add_special_tokens(added)
    return added


def stop_token_id(tokenizer: Any, template: str | ChatTemplate) -> int:
    """The id generation stops at (the end of an assistant turn)."""
    template = get_template(template)
    try:
        return tokenizer.special_tokens[template.stop_token]
    except KeyError:
        raise ValueError(f"the tokenizer has no {template.stop_token!r} token; call ensure_special_tokens") from None


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer config
# ---------------------------------------------------------------------------------------------------------------
def hf_tokenizer_config(tokenizer: Any, template: str | ChatTemplate) -> dict[str, Any]:
    """The ``tokenizer_config.json`` fields: ``chat_template`` plus the special-token roles."""
    template = get_template(template)
    cfg: dict[str, Any] = {"chat_template": template.jinja(), "intro2llm_chat_template": template.name,
                           "additional_special_tokens": list(template.special_tokens)}
    for role in ("bos", "eos", "pad", "unk"):
        text = getattr(tokenizer, "roles", {}).get(role)
        if text is not None:
            cfg[f"{role}_token"] = text
    return cfg


def write_chat_template(out_dir: str | os.PathLike, tokenizer: Any, template: str | ChatTemplate) -> Path:
    """Write (or update) ``out_dir/tokenizer_config.json`` with the template's ``chat_template``."""
    path = Path(out_dir) / TOKENIZER_CONFIG_FILE
    cfg: dict[str, Any] = {}
    if path.exists():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None
    cfg.update(hf_tokenizer_config(tokenizer, template))
    atomic_write(path, json.dumps(cfg, ensure_ascii=False, indent=1) + "\n")
    return path


def read_chat_template_name(ckpt_dir: str | os.PathLike) -> str | None:
    """The template name an SFT checkpoint was trained with (``tokenizer_config.json``), or None."""
    path = Path(ckpt_dir) / TOKENIZER_CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("intro2llm_chat_template")
    except json.JSONDecodeError:
        return None
