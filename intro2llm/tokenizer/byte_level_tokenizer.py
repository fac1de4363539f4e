"""ByteLevelBPETokenizer: GPT-2 style byte-level BPE, interchangeable with tiktoken and Hugging Face ``tokenizers``.

Radford et al. 2019 (GPT-2, ``encoder.py``): run BPE over the UTF-8 *bytes* of each regex pre-token, so the 256
byte values are the alphabet and nothing is ever unknown. Bytes are shown as printable characters through the
reversible map ``bytes_to_unicode`` (space -> ``Ġ``, newline -> ``Ċ``), which lets the character-level machinery
of ``BPETokenizer`` run unchanged on byte strings: this class only swaps the alphabet and the symbol <-> bytes
conversion. Token id ``b`` (< 256) is the single byte ``b``; merged tokens follow in rank order.

Encoding runs in C++ (``csrc/cpu/bpe_encode.cpp``: the GPT-2 / cl100k regex as a hand-written scanner, then
tiktoken's merge rule) when ``intro2llm._C`` is built and the pattern is one of those two; otherwise, or with
``encoder="python"``, on the Python path of ``BPETokenizer`` (same ids, tested).

Guarantees (tested): ``decode(encode(s)) == s`` for every ``s`` that encodes to UTF-8 (lone surrogates are
replaced by U+FFFD first, as tiktoken does); ``decode`` of any id sequence never raises; ``to_tiktoken()`` builds a
``tiktoken.Encoding`` from our ranks whose ids equal ours on any text; ``export_hf`` writes a ``tokenizer.json``
giving our ids in ``tokenizers``; ``from_hf`` reads one back.

Not handled: ``add_prefix_space`` (GPT-2 on HF adds none either), HF files whose special tokens come before the
ordinary vocabulary or whose ordinary ids are not ranks (``from_hf`` rejects them with an error).
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from collections.abc import Iterable
from typing import Any

import regex

from intro2llm._io import atomic_write
from intro2llm.course import lesson_task
from intro2llm.tokenizer import _train
from intro2llm.tokenizer.bpe_tokenizer import CL100K_PATTERN, GPT2_PATTERN, BPETokenizer

_NATIVE_PATTERNS = {GPT2_PATTERN: 0, CL100K_PATTERN: 1}  # patterns the C++ scanner implements


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the other 68 bytes
    (controls, space, ...) to U+0100 onwards, so every byte is a visible, non-whitespace character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}
_TO_SYMBOLS = str.maketrans({chr(b): c for b, c in BYTE_TO_UNICODE.items()})  # latin-1 char of a byte -> symbol
_TO_LATIN1 = str.maketrans({c: chr(b) for b, c in BYTE_TO_UNICODE.items()})  # symbol -> latin-1 char of its byte


@functools.cache
def _char_classes():
    """uint8 table over all code points: 1 = \\p{L}, 2 = \\p{N}, 4 = \\s, computed with the regex package itself so
    that the C++ scanner classifies every character exactly as the Python path does (~0.2 s, once per process)."""
    import numpy as np
    import torch

    table = np.zeros(0x110000, dtype=np.uint8)
    everything = np.arange(0x110000, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass")  # every code point
    for bit, cls in ((1, r"\p{L}"), (2, r"\p{N}"), (4, r"\s")):
        hits = np.fromiter((m.start() for m in regex.finditer(cls, everything)), dtype=np.int64)
        table[hits] |= bit
    return torch.from_numpy(table)


def native_encoder_available() -> bool:
    """True when ``intro2llm._C`` has the C++ byte-level encoder."""
    if not _train.cpp_available():
        return False
    import torch

    return hasattr(torch.ops.intro2llm, "bpe_encode")


class ByteLevelBPETokenizer(BPETokenizer):
    """BPE over UTF-8 bytes with GPT-2 (``pattern="gpt2"``) or cl100k (``pattern="cl100k"``) pre-tokenization."""

    def __init__(self, pattern: str | None = None, *, encoder: str = "auto") -> None:
        if encoder not in ("auto", "python", "cpp"):
            raise ValueError(f"encoder must be 'auto', 'python' or 'cpp', got {encoder!r}")
        self.encoder = encoder  # "auto": the C++ encoder when built and the pattern is gpt2/cl100k, else Python
        self._native_handle: int | None = None
        super().__init__(pattern)
        alphabet = [BYTE_TO_UNICODE[b] for b in range(256)]
        self._set_vocab(alphabet, [])

    def _set_vocab(self, alphabet, merges, where: str = "") -> None:
        super()._set_vocab(alphabet, merges, where)
        self._native_handle = None  # rebuilt lazily for the new ranks

    def _native(self) -> int | None:
        """Handle of this vocabulary's C++ encoder, or None when the Python path must run."""
        if self._native_handle is not None:
            return self._native_handle
        if self.encoder == "python":
            return None
        usable = native_encoder_available() and self.pattern in _NATIVE_PATTERNS
        if not usable:
            if self.encoder == "cpp":
                raise RuntimeError(
                    "encoder='cpp' needs intro2llm._C (bpe_encode) and the 'gpt2' or 'cl100k' pattern; "
                    f"built: {native_encoder_available()}, pattern: {self.pattern!r}"
                )
            return None
        import numpy as np
        import torch

        blobs = self._id_to_bytes[: self.num_ordinary_tokens]
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        handle = torch.ops.intro2llm.bpe_encoder_new(
            data, torch.from_numpy(offsets), _char_classes(), _NATIVE_PATTERNS[self.pattern]
        )
        weakref.finalize(self, torch.ops.intro2llm.bpe_encoder_free, handle).atexit = False
        self._native_handle = handle
        return handle

    # ---- the byte <-> symbol conversion -------------------------------------------------------------------------
    @lesson_task(1)
    def _to_symbols(self, word: str) -> str:
        return word.encode("utf-8").decode("latin-1").translate(_TO_SYMBOLS)

    @lesson_task(1)
    def _symbol_bytes(self, symbols: str) -> bytes:
        return symbols.translate(_TO_LATIN1).encode("latin-1")

    def _training_alphabet(self, words: Iterable[str]) -> list[str]:
        return [BYTE_TO_UNICODE[b] for b in range(256)]

    def _default_specials(self) -> tuple[list[str], dict[str, str]]:
        return [], {}

    def _check_min_vocab(self, vocab_size: int, num_specials: int) -> None:
        if vocab_size < 256 + num_specials:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the 256 byte tokens plus {num_specials} special tokens"
            )

    def _check_alphabet(self, alphabet: list[str], where: str) -> None:
        if len(alphabet) != 256 or set(alphabet) != set(UNICODE_TO_BYTE):
            raise ValueError(f"{where}a byte-level alphabet must hold each of the 256 byte symbols exactly once")

    def encode_ordinary(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode_ordinary expects a str, got {type(text).__name__}")
        handle = self._native()
        try:
            if handle is None:
                return super().encode_ordinary(text)
            return self._encode_native(handle, text.encode("utf-8"))
        except UnicodeEncodeError:
            # Lone surrogates cannot be UTF-8: replace them by U+FFFD, as tiktoken does.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return super().encode_ordinary(text) if handle is None else self._encode_native(handle, text.encode())

    @staticmethod
    def _encode_native(handle: int, data: bytes) -> list[int]:
        if not data:
            return []
        import torch

        return torch.ops.intro2llm.bpe_encode(handle, torch.frombuffer(bytearray(data), dtype=torch.uint8)).tolist()

    def _learn(self, alphabet, symbols, freqs, num_new, min_frequency, engine, show_progress):
        if engine == "cpp" and alphabet == [BYTE_TO_UNICODE[b] for b in range(256)] and _train.cpp_available():
            # Symbol id == byte value: hand the raw bytes of all words to C++ in one buffer.
            flat = "".join(symbols).translate(_TO_LATIN1).encode("latin-1")
            offsets = [0]
            total = 0
            for s in symbols:
                total += len(s)
                offsets.append(total)
            return _train.train_merges_cpp(flat, offsets, freqs, 256, num_new, min_frequency)
        return super()._learn(alphabet, symbols, freqs, num_new, min_frequency, engine, show_progress)

    # ---- interop ------------------------------------------------------------------------------------------------
    def mergeable_ranks(self) -> dict[bytes, int]:
        """token bytes -> id for the ordinary tokens (tiktoken's ``mergeable_ranks``)."""
        return {self._id_to_bytes[i]: i for i in range(self.num_ordinary_tokens)}

    def to_tiktoken(self, name: str = "intro2llm"):
        """A ``tiktoken.Encoding`` with our pattern, ranks and special tokens (same ids as ``encode``)."""
        try:
            import tiktoken
        except ImportError as exc:
            raise ImportError("to_tiktoken() needs the tiktoken package (pip install tiktoken)") from exc
        return tiktoken.Encoding(
            name,
            pat_str=self.pattern,
            mergeable_ranks=self.mergeable_ranks(),
            special_tokens=dict(self.special_tokens),
            explicit_n_vocab=self.vocab_size,
        )

    def _hf_merges(self) -> list[list[str]]:
        """Every split of every token into two tokens, in rank order of the token.

        tiktoken (and our encoder) merges any adjacent pair whose concatenation is a token, ranked by that token;
        ``tokenizers`` merges only listed pairs, ranked by list position. Listing all splits, token by token,
        makes the two rules agree.
        """
        ranks = self._ranks
        merges = []
        for token in self._tokens[256:]:
            for k in range(1, len(token)):
                if token[:k] in ranks and token[k:] in ranks:
                    merges.append([token[:k], token[k:]])
        return merges

    def to_hf_json(self) -> dict[str, Any]:
        """The ``tokenizer.json`` content (Hugging Face ``tokenizers`` format) for this tokenizer."""
        vocab = {t: i for i, t in enumerate(self._tokens)}
        vocab.update(self.special_tokens)
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {
                    "id": i,
                    "content": t,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
                for t, i in self.special_tokens.items()
            ],
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
                ],
            },
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": True,  # a pre-token that is a token is taken whole, as tiktoken does
                "vocab": vocab,
                "merges": self._hf_merges(),
            },
        }

    def export_hf(self, path: str | os.PathLike) -> str:
        """Write a Hugging Face ``tokenizer.json`` (``path`` is the file, or a directory to put it in); returns it."""
        path = os.fspath(path)
        if not path.endswith(".json"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, "tokenizer.json")
        atomic_write(path, json.dumps(self.to_hf_json(), ensure_ascii=False, indent=1) + "\n")
        return path

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> ByteLevelBPETokenizer:
        """Read a byte-level BPE ``tokenizer.json`` (a file, or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"Hugging Face tokenizer file {path!r} does not exist") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path!r} is not a tokenizer.json: not valid UTF-8 JSON ({exc})") from None
        where = f"{path!r}: "
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise ValueError(f"{where}not a BPE tokenizer.json (model.type is not 'BPE')")
        vocab, merges = model.get("vocab"), model.get("merges")
        if not isinstance(vocab, dict) or not isinstance(merges, list):
            raise ValueError(f"{where}model.vocab must be an object and model.merges a list")
        pattern = _hf_pattern(data.get("pre_tokenizer"), where)
        specials = {}
        for added in data.get("added_tokens") or []:
            if added.get("special"):
                specials[added["content"]] = added["id"]
        ordinary = {t: i for t, i in vocab.items() if t not in specials}
        tokens = sorted(ordinary, key=ordinary.get)
        if [ordinary[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError(f"{where}ordinary token ids must be 0..{len(tokens) - 1} with special tokens after them")
        for k, m in enumerate(merges):
            pair = m.split(" ") if isinstance(m, str) else m
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise ValueError(f"{where}merge #{k} {m!r} is not a pair of tokens")
        # Our encoder needs only the ranks (ids); rebuild a merge list from them: each token = the first split
        # into two tokens of lower rank (the file's own merges may list splits into later tokens, as ours do).
        ranks = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for i, token in enumerate(tokens[256:], start=256):
            split = next(
                (k for k in range(1, len(token)) if ranks.get(token[:k], i) < i and ranks.get(token[k:], i) < i), None
            )
            if split is None:
                raise ValueError(f"{where}token {token!r} (id {i}) is not the concatenation of two lower-id tokens")
            pairs.append((token[:split], token[split:]))
        tok = cls(pattern)
        alphabet = tokens[:256]
        tok._check_alphabet(alphabet, where)
        tok._set_vocab(alphabet, pairs, where)
        if tok._tokens != tokens:
            raise ValueError(f"{where}the vocabulary has repeated tokens")
        order = sorted(specials, key=specials.get)
        if [specials[t] for t in order] != list(range(len(tokens), len(tokens) + len(order))):
            raise ValueError(f"{where}special-token ids must follow the ordinary vocabulary consecutively")
        tok._add_special_tokens(order)
        return tok


def _hf_pattern(pre: Any, where: str) -> str:
    """The pre-tokenization regex of a tokenizer.json: a Split's regex, or GPT-2's for ByteLevel(use_regex)."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "Split":
            regex_pattern = (step.get("pattern") or {}).get("Regex")
            if isinstance(regex_pattern, str):
                return regex_pattern
        if isinstance(step, dict) and step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return GPT2_PATTERN
    raise ValueError(f"{where}no byte-level pre-tokenizer with a regex found (need Split(Regex) or ByteLevel)")
