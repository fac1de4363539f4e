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
import weakref
from collections.abc import Iterable
from typing import Any

import regex

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

    # Hugging Face export: BPETokenizer.to_hf_json with these two steps (the ByteLevel byte <-> symbol map).
    def _hf_pre_tokenizer(self) -> dict[str, Any]:
        return {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        }

    def _hf_decoder(self) -> dict[str, Any]:
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}

    @classmethod
    def _hf_num_base(cls, tokens: list[str]) -> int:
        return 256
