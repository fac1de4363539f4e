"""BaseTokenizer: what every tokenizer shares — special tokens, batching, decoding, save/load.

A subclass supplies ``encode_ordinary(text) -> list[int]`` (text with no special tokens) and the byte string of
every id (``_id_to_bytes``); this class adds, as in Karpathy's minbpe ``Tokenizer`` base class:

* special tokens with tiktoken's semantics (``tiktoken.Encoding.encode``): special-token *text* inside ordinary
  input becomes a special id only when it is in ``allowed_special``; if it is in ``disallowed_special`` (by
  default: every special token not allowed) ``encode`` raises ``ValueError``; a special token that is neither
  allowed nor disallowed is encoded as ordinary text. So ``"<|endoftext|>"`` typed by a user never silently
  becomes the end-of-text id.
* roles: ``bos``/``eos``/``pad``/``unk`` name one of the special tokens each (``tok.eos_token_id`` ...).
* ``encode_batch`` with truncation, padding (``"longest"`` / ``"max_length"``, right or left) and an attention
  mask; ``decode`` / ``decode_batch`` that never raise (bytes that are not UTF-8 become U+FFFD).
* ``save(path)`` / ``load(path)``: a versioned, human-readable JSON file written atomically (temp file in the
  same directory, then ``os.replace``); ``load`` checks every field and names the file in its errors.
* ``save_pretrained(dir)`` / ``from_pretrained(dir)``: a checkpoint directory as Hugging Face lays it out — ours
  under ``intro2llm_tokenizer.json``, ``tokenizer.json`` in Hugging Face's format (``AutoTokenizer`` gives our
  ids) and ``tokenizer_config.json``; ``from_pretrained`` also reads older directories (our format under the name
  ``tokenizer.json``) and Hugging Face-only ones.

Not handled here: the tokenization algorithm itself (see ``bpe_tokenizer.py``), normalisation (NFC etc.: text is
tokenized as given), offsets/alignment to the input text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import regex

from intro2llm._io import atomic_write
from intro2llm.course import lesson_task

FORMAT_NAME = "intro2llm.tokenizer"
FORMAT_VERSION = 1
ROLES = ("bos", "eos", "pad", "unk")


def _role_token_id(role: str) -> property:
    """The read-only ``<role>_token_id`` property: the id of the special token playing ``role``, else None."""
    return property(lambda self: self._role_id(role), doc=f"Id of the special token playing {role!r}, or None.")


class BaseTokenizer:
    """Special tokens, batching, decoding and (de)serialisation shared by all tokenizers."""

    def __init__(self) -> None:
        self._id_to_bytes: list[bytes] = []  # id -> the bytes it decodes to (ordinary tokens, then specials)
        self.special_tokens: dict[str, int] = {}  # special-token text -> id
        self.roles: dict[str, str] = {}  # "bos"/"eos"/"pad"/"unk" -> special-token text
        self._special_re_cache: dict[frozenset[str], Any] = {}

    # ---- what a subclass provides ----------------------------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text``, treating special-token text as ordinary text."""
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        """Subclass fields for ``save`` (merges, pattern, ...)."""
        raise NotImplementedError

    @classmethod
    def _from_state(cls, state: dict[str, Any], path: str) -> BaseTokenizer:
        """Rebuild from ``_state()``'s fields; raise ``ValueError`` naming ``path`` when something is wrong."""
        raise NotImplementedError

    # ---- vocabulary and special tokens -----------------------------------------------------------------------
    @property
    @lesson_task(1)
    def vocab_size(self) -> int:
        """Number of ids (ordinary tokens + special tokens)."""
        return len(self._id_to_bytes)

    def _add_special_tokens(self, tokens: Iterable[str], roles: dict[str, str | None] | None = None) -> None:
        """Append special tokens after the ordinary vocabulary and assign roles (each must name a special)."""
        for text in tokens:
            if not isinstance(text, str) or not text:
                raise ValueError(f"a special token must be a non-empty string, got {text!r}")
            if text in self.special_tokens:
                continue
            self.special_tokens[text] = len(self._id_to_bytes)
            self._id_to_bytes.append(text.encode("utf-8"))
        for role, text in (roles or {}).items():
            if role not in ROLES:
                raise ValueError(f"unknown special-token role {role!r}; expected one of {ROLES}")
            if text is None:
                continue
            if text not in self.special_tokens:
                raise ValueError(
                    f"{role}_token={text!r} is not a special token of this tokenizer; "
                    f"add it to special_tokens (have {sorted(self.special_tokens)})"
                )
            self.roles[role] = text
        self._special_re_cache.clear()

    def _role_id(self, role: str) -> int | None:
        text = self.roles.get(role)
        return None if text is None else self.special_tokens[text]

    bos_token_id = _role_token_id("bos")
    eos_token_id = _role_token_id("eos")
    pad_token_id = _role_token_id("pad")
    unk_token_id = _role_token_id("unk")

    def _special_set(self, spec: Literal["all"] | Collection[str], name: str) -> set[str]:
        if spec == "all":
            return set(self.special_tokens)
        if isinstance(spec, str):
            raise TypeError(f"{name} must be 'all' or a collection of special-token strings, got the string {spec!r}")
        chosen = set(spec)
        unknown = chosen - self.special_tokens.keys()
        if unknown:
            known = sorted(self.special_tokens)
            raise ValueError(f"{name} names unknown special tokens {sorted(unknown)}; known: {known}")
        return chosen

    def _specials_regex(self, texts: frozenset[str]):
        pattern = self._special_re_cache.get(texts)
        if pattern is None:
            # Longest first, so that "<|a|>" never wins over "<|a|>x" when both are special.
            alternatives = sorted(texts, key=lambda s: (-len(s), s))
            pattern = regex.compile("|".join(regex.escape(s) for s in alternatives))
            self._special_re_cache[texts] = pattern
        return pattern

    # ---- encoding ---------------------------------------------------------------------------------------------
    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Token ids of ``text`` with tiktoken's special-token rules (see the module docstring)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        allowed = self._special_set(allowed_special, "allowed_special")
        disallowed = self._special_set(disallowed_special, "disallowed_special")
        if disallowed_special == "all":
            disallowed -= allowed
        if disallowed:
            found = self._specials_regex(frozenset(disallowed)).search(text)
            if found:
                raise ValueError(
                    f"the text contains the special token {found.group()!r} (at character {found.start()}); "
                    "pass allowed_special={...} to encode it as a special id, or disallowed_special=() to encode "
                    "it as ordinary text"
                )
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in self._specials_regex(frozenset(allowed)).finditer(text):
            ids.extend(self.encode_ordinary(text[start : match.start()]))
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids.extend(self.encode_ordinary(text[start:]))
        return ids

    @lesson_task(1)
    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
        padding: bool | Literal["longest", "max_length"] = False,
        max_length: int | None = None,
        truncation: bool = False,
        padding_side: Literal["right", "left"] = "right",
        return_attention_mask: bool = True,
    ) -> dict[str, list[list[int]]]:
        """Encode several texts: ``{"input_ids": [[...], ...], "attention_mask": [[1, .., 0], ...]}``.

        ``truncation=True`` cuts each sequence to ``max_length`` (keeping its start); ``padding="longest"`` (or
        True) pads to the longest sequence, ``"max_length"`` to ``max_length``, with ``pad_token_id`` on
        ``padding_side``. The mask is 1 on real tokens and 0 on padding.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of strings, got a single str; use encode()")
        if padding is True:
            padding = "longest"
        if padding not in (False, "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if (truncation or padding == "max_length") and max_length is None:
            raise ValueError("truncation=True and padding='max_length' need max_length")
        batch = [self.encode(t, allowed_special=allowed_special, disallowed_special=disallowed_special) for t in texts]
        if truncation:
            batch = [ids[:max_length] for ids in batch]
        masks = [[1] * len(ids) for ids in batch]
        if padding:
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError("padding needs a pad token: train/load the tokenizer with pad_token=... set")
            width = max_length if padding == "max_length" else max((len(ids) for ids in batch), default=0)
            for i, ids in enumerate(batch):
                extra = max(0, width - len(ids))
                if padding_side == "right":
                    batch[i] = ids + [pad_id] * extra
                    masks[i] = masks[i] + [0] * extra
                else:
                    batch[i] = [pad_id] * extra + ids
                    masks[i] = [0] * extra + masks[i]
        out = {"input_ids": batch}
        if return_attention_mask:
            out["attention_mask"] = masks
        return out

    # ---- decoding ---------------------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids``; raises ``ValueError`` for an id outside ``[0, vocab_size)``."""
        table = self._id_to_bytes
        ids = ids if isinstance(ids, list) else list(ids)
        try:
            if ids and min(ids) < 0:  # a negative index would silently wrap around
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(table):
                    raise ValueError(f"token id {i!r} is not an int in the vocabulary [0, {len(table)})") from None
            raise

    @lesson_task(1)
    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. ids that split a character) becomes U+FFFD, never an error."""
        if skip_special_tokens and self.special_tokens:
            specials = set(self.special_tokens.values())
            ids = [i for i in ids if i not in specials]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_batch(self, batch: Iterable[Iterable[int]], *, skip_special_tokens: bool = False) -> list[str]:
        """``decode`` for each sequence of ``batch``."""
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def id_to_token(self, token_id: int) -> bytes:
        """The bytes of one token id."""
        return self.decode_bytes([token_id])

    # ---- save / load ------------------------------------------------------------------------------------------
    @lesson_task(1)
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as versioned JSON, atomically (temp file in the same directory + ``os.replace``)."""
        path = os.fspath(path)
        state = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "type": type(self).__name__,
            **self._state(),
            "special_tokens": dict(self.special_tokens),
            "roles": dict(self.roles),
        }
        atomic_write(path, json.dumps(state, ensure_ascii=False, indent=1) + "\n")

    @classmethod
    @lesson_task(1)
    def load(cls, path: str | os.PathLike) -> BaseTokenizer:
        """Read a file written by ``save``; the class is taken from the file (it must be ``cls`` or a subclass)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"tokenizer path {path!r} is a directory; give the tokenizer .json file inside it "
                             "(or use from_pretrained(directory))")
        return cls._load_state(_read_json(path), path)

    @classmethod
    def _load_state(cls, state: Any, path: str) -> BaseTokenizer:
        """``load`` of already parsed JSON (``path`` names the file in errors)."""
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise ValueError(f'{path!r} is not an intro2llm tokenizer file (missing "format": "{FORMAT_NAME}")')
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path!r} has tokenizer format version {state.get('version')!r}; this intro2llm reads version "
                f"{FORMAT_VERSION}"
            )
        klass = _subclasses(BaseTokenizer).get(state.get("type"))
        if klass is None or not issubclass(klass, cls):
            raise ValueError(f"{path!r} holds a tokenizer of type {state.get('type')!r}, which is not a {cls.__name__}")
        if klass._from_state.__func__ is BaseTokenizer._from_state.__func__:
            concrete = sorted(n for n, k in _subclasses(BaseTokenizer).items() if k is not klass)
            raise ValueError(f"{path!r} names the abstract tokenizer type {klass.__name__!r}; expected a concrete "
                             f"one such as {concrete}")
        tok = klass._from_state(state, path)
        specials, roles = state.get("special_tokens", {}), state.get("roles", {})
        if not isinstance(specials, dict) or not isinstance(roles, dict):
            raise ValueError(f"{path!r}: 'special_tokens' and 'roles' must be JSON objects")
        expected = list(range(tok.vocab_size, tok.vocab_size + len(specials)))
        if sorted(specials.values()) != expected or list(specials.values()) != expected:
            raise ValueError(
                f"{path!r}: special-token ids {list(specials.values())} must be {expected} "
                "(consecutive, right after the ordinary vocabulary, in file order)"
            )
        try:
            tok._add_special_tokens(specials, roles)
        except ValueError as exc:
            raise ValueError(f"{path!r}: {exc}") from None
        return tok

    # ---- checkpoint directories (Hugging Face layout) -----------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, *, model_max_length: int | None = None) -> Path:
        """Write this tokenizer into a checkpoint directory, readable both by ``from_pretrained`` and by Hugging
        Face's ``AutoTokenizer.from_pretrained``: ``intro2llm_tokenizer.json`` (ours), ``tokenizer.json``
        (Hugging Face ``tokenizers`` format, same ids: ``to_hf_json``) and ``tokenizer_config.json`` (updated:
        the fields of other writers, such as the chat template, are kept). Returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save(directory / TOKENIZER_FILE)
        if hasattr(self, "export_hf"):
            self.export_hf(directory / HF_TOKENIZER_FILE)
        elif (directory / HF_TOKENIZER_FILE).is_file():
            (directory / HF_TOKENIZER_FILE).unlink()  # a stale file would describe another tokenizer
        path = directory / HF_CONFIG_FILE
        cfg = _read_json(path) if path.is_file() else {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{path} is not a JSON object")
        cfg.update(self.hf_tokenizer_config(model_max_length))
        atomic_write(path, json.dumps(cfg, ensure_ascii=False, indent=1) + "\n")
        return directory

    def hf_tokenizer_config(self, model_max_length: int | None = None) -> dict[str, Any]:
        """``tokenizer_config.json`` fields for ``transformers`` (no chat template: ``data.chat`` adds it)."""
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,  # decode must return exactly our text
            "add_bos_token": False,
            "add_eos_token": False,
            "intro2llm_tokenizer_file": TOKENIZER_FILE,
        }
        if model_max_length is not None:
            cfg["model_max_length"] = int(model_max_length)
        for role in ROLES:
            cfg[f"{role}_token"] = self.roles.get(role)
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> BaseTokenizer:
        """The tokenizer of a checkpoint directory (or one file): ``intro2llm_tokenizer.json``, else
        ``tokenizer.json`` in either format — ours (directories written before the Hugging Face export) or
        Hugging Face's BPE (``BPETokenizer.from_hf``; roles from ``tokenizer_config.json``)."""
        path = Path(path)
        if path.is_dir():
            found = tokenizer_file(path)
            if found is None:
                raise FileNotFoundError(f"no tokenizer in {path}: expected {TOKENIZER_FILE} or {HF_TOKENIZER_FILE}")
            directory, path = path, found
        else:
            directory = path.parent
        state = _read_json(str(path))
        if isinstance(state, dict) and "format" not in state and isinstance(state.get("model"), dict):
            from intro2llm.tokenizer.bpe_tokenizer import BPETokenizer

            tok = BPETokenizer.from_hf(path)
            if not isinstance(tok, cls):
                raise ValueError(f"{str(path)!r} holds a {type(tok).__name__}, which is not a {cls.__name__}")
            cfg_path = directory / HF_CONFIG_FILE
            cfg = _read_json(str(cfg_path)) if cfg_path.is_file() else {}
            roles = {r: cfg.get(f"{r}_token") for r in ROLES if isinstance(cfg, dict)}
            tok._add_special_tokens((), {r: t for r, t in roles.items() if t in tok.special_tokens})
            return tok
        return cls._load_state(state, str(path))


TOKENIZER_FILE = "intro2llm_tokenizer.json"  # our format, in a checkpoint directory
HF_TOKENIZER_FILE = "tokenizer.json"  # Hugging Face tokenizers' format (ours too, in older directories)
HF_CONFIG_FILE = "tokenizer_config.json"


def tokenizer_file(directory: str | os.PathLike) -> Path | None:
    """The file ``from_pretrained`` reads in ``directory`` (ours first, then ``tokenizer.json``), or None."""
    directory = Path(directory)
    for name in (TOKENIZER_FILE, HF_TOKENIZER_FILE):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_json(path: str | os.PathLike) -> Any:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"tokenizer path {path!r} is a directory; give the tokenizer .json file inside it") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path!r} is not a tokenizer file: it is not valid UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path!r} is not a tokenizer file: its JSON is nested too deeply") from None


def _subclasses(root: type) -> dict[str, type]:
    found, todo = {root.__name__: root}, [root]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.setdefault(sub.__name__, sub)
            todo.append(sub)
    return found
