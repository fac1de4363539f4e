"""BPETokenizer: classic character-level byte-pair encoding (Sennrich et al. 2016), minbpe-style.

Training: split the text into words with a regex (``_pretokenize``; GPT-2's pattern by default, so a word keeps
its leading space and ``decode(encode(s)) == s``), count each distinct word once, start from the characters
seen in training and repeatedly merge the most frequent adjacent pair of symbols (``_train.py`` has the
algorithm in three equivalent engines). Token ``id`` is its *rank*: earlier merges have smaller ids.

Encoding a word (``_bpe``) follows tiktoken exactly: a word that is itself a token is one id; otherwise start
from its characters and repeatedly merge the adjacent pair whose concatenation is the token of lowest rank
(leftmost on ties) until no adjacent pair forms a token. Results are cached per word. A character never seen in
training becomes ``unk_token`` (``"<unk>"``).

Not handled: Sennrich's end-of-word marker ``</w>`` (the regex keeps spaces inside tokens instead), BPE-dropout,
normalisation, characters outside the training alphabet other than through ``<unk>`` (``ByteLevelBPETokenizer``
has no unknowns at all).

Hugging Face: ``to_hf_json``/``export_hf`` write a ``tokenizer.json`` that ``tokenizers`` (and ``AutoTokenizer``)
encode to exactly our ids — a ``Split`` pre-tokenizer with our regex, a BPE model whose merge list holds every
split of every token in rank order (tiktoken's rule expressed as ``tokenizers``' rule), ``ignore_merges``, the
``<unk>`` token, and a ``Fuse`` decoder; ``from_hf`` reads such a file back. The JSON is written by hand, so the
``tokenizers`` package is not needed to export (only to test against).
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Collection, Iterable, Iterator
from itertools import chain
from typing import Any, Literal

import regex

from intro2llm._io import atomic_write
from intro2llm.course import lesson_task
from intro2llm.tokenizer import _train
from intro2llm.tokenizer.base_tokenizer import BaseTokenizer

# GPT-2's pre-tokenization regex (openai/gpt-2 encoder.py), and the one of cl100k_base (GPT-3.5/4, tiktoken):
# cl100k also splits numbers into groups of at most 3 digits, and keeps newlines apart from indentation.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN}
_LONG_WORD = 64  # words with more symbols than this use the O(n log n) heap merge
_CACHE_LIMIT = 1 << 19  # cached words; the cache is emptied when it grows past this


def resolve_pattern(pattern: str | None) -> str:
    """A pattern name (``"gpt2"``, ``"cl100k"``) or a regex -> the regex, checked to compile."""
    if pattern is None:
        return GPT2_PATTERN
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be 'gpt2', 'cl100k' or a non-empty regex string, got {pattern!r}")
    pattern = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"pattern {pattern!r} is not a valid regex: {exc}") from None
    return pattern


def uncovered_error(pattern: str, text: str, compiled=None) -> ValueError:
    """The error for a pre-tokenization pattern that does not match every character of ``text``."""
    pos = 0
    for m in (compiled or regex.compile(pattern)).finditer(text):
        if m.start() != pos:
            break
        pos = m.end()
    return ValueError(f"the tokenizer's pattern does not cover the text: {text[pos:pos + 1]!r} at character {pos} "
                      f"would be dropped (pattern {pattern[:80]!r}); use a pattern that matches every character, "
                      "e.g. one ending in '|\\s+|.'")


class _WordCache(dict):
    """word -> ids; a miss computes the ids (``dict.__missing__``), so lookups stay in C on hits."""

    def __init__(self, encode_word):
        super().__init__()
        self._encode_word = encode_word

    def __missing__(self, word: str) -> list[int]:
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        ids = self[word] = self._encode_word(word)
        return ids


class BPETokenizer(BaseTokenizer):
    """Character-level BPE: symbols are Unicode characters seen in training; merges by rank; ``<unk>`` for the rest."""

    def __init__(self, pattern: str | None = None) -> None:
        super().__init__()
        self.pattern = resolve_pattern(pattern)
        self._regex = regex.compile(self.pattern)
        self.alphabet: list[str] = []  # base symbols, ids 0..len-1
        self.merges: list[tuple[str, str]] = []  # in training order; a token's id is its rank
        self._tokens: list[str] = []  # id -> symbol string (ordinary tokens only)
        self._ranks: dict[str, int] = {}  # symbol string -> id
        self._cache = _WordCache(self._encode_word)

    def __getstate__(self) -> dict[str, Any]:
        # Pickle/deepcopy (DataLoader workers) without the word cache or a C++ encoder handle, which belongs to
        # this process and this object; both are rebuilt on first use.
        state = self.__dict__.copy()
        state["_cache"] = None
        if "_native_handle" in state:
            state["_native_handle"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = _WordCache(self._encode_word)

    # ---- hooks ByteLevelBPETokenizer overrides ----------------------------------------------------------------
    def _to_symbols(self, word: str) -> str:
        """The word as a string of base symbols (characters here; mapped bytes in the byte-level tokenizer)."""
        return word

    def _symbol_bytes(self, symbols: str) -> bytes:
        """The bytes a token decodes to."""
        return symbols.encode("utf-8")

    def _training_alphabet(self, words: Iterable[str]) -> list[str]:
        return sorted(set(chain.from_iterable(words)))

    def _default_specials(self) -> tuple[list[str], dict[str, str]]:
        return ["<unk>"], {"unk": "<unk>"}

    # ---- pre-tokenization and encoding ------------------------------------------------------------------------
    @lesson_task(1)
    def _pretokenize(self, text: str) -> list[str]:
        """Split text into words with the regex; BPE never merges across two words. A pattern that leaves some
        character unmatched would drop it silently: that raises ``ValueError`` naming it."""
        words = self._regex.findall(text)
        if sum(map(len, words)) != len(text):
            raise uncovered_error(self.pattern, text, self._regex)
        return words

    @lesson_task(1)
    def _bpe(self, parts: list[str]) -> list[str]:
        """Merge adjacent symbols by rank until no adjacent pair forms a token (tiktoken's rule)."""
        ranks = self._ranks
        if len(parts) > _LONG_WORD:
            return self._bpe_heap(parts)
        while len(parts) > 1:
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_i = rank, i  # strict <: the leftmost pair wins ties
            if best_rank is None:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return parts

    def _bpe_heap(self, parts: list[str]) -> list[str]:
        """``_bpe`` for long words in O(n log n): a heap of (rank, position) over a linked list of parts."""
        ranks = self._ranks
        n = len(parts)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None:
                heap.append((rank, i))
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if parts[i] is None or j >= n or ranks.get(parts[i] + parts[j]) != rank:
                continue  # stale: one side was merged since this entry was pushed
            parts[i] += parts[j]
            parts[j] = None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
                r = ranks.get(parts[i] + parts[nxt[i]])
                if r is not None:
                    heapq.heappush(heap, (r, i))
            if prv[i] >= 0:
                r = ranks.get(parts[prv[i]] + parts[i])
                if r is not None:
                    heapq.heappush(heap, (r, prv[i]))
        return [p for p in parts if p is not None]

    def _encode_word(self, word: str) -> list[int]:
        symbols = self._to_symbols(word)
        whole = self._ranks.get(symbols)
        if whole is not None:  # the whole word is a token (tiktoken takes it as is)
            return [whole]
        unk = self.unk_token_id
        ranks = self._ranks
        return [ranks[p] if p in ranks else unk for p in self._bpe(list(symbols))]

    @lesson_task(1)
    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token text treated as ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"encode_ordinary expects a str, got {type(text).__name__}")
        return list(chain.from_iterable(map(self._cache.__getitem__, self._pretokenize(text))))

    def encode_iterable(
        self,
        texts: Iterable[str],
        *,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> Iterator[int]:
        """Stream the ids of ``"".join(texts)`` (e.g. the lines of a file larger than memory): equal to
        ``encode`` of the whole text, with memory bounded by the longest pre-token plus one piece of input.

        Text is encoded up to the start of the last pre-token of what has been read (that word may still grow),
        and never past a point where a special token could begin; the rest waits for the next piece."""
        allowed = self._special_set(allowed_special, "allowed_special")
        disallowed = self._special_set(disallowed_special, "disallowed_special")
        if disallowed_special == "all":
            disallowed -= allowed
        specials = allowed | disallowed
        specials_re = self._specials_regex(frozenset(specials)) if specials else None
        hold = max(map(len, specials), default=1) - 1  # a special token may start in the last `hold` chars
        kwargs = dict(allowed_special=allowed, disallowed_special=disallowed)
        buf = ""
        for piece in texts:
            if not isinstance(piece, str):
                raise TypeError(f"encode_iterable expects str pieces, got {type(piece).__name__}")
            buf += piece
            seg_start = 0
            if specials_re is not None:
                for m in specials_re.finditer(buf):
                    seg_start = m.end()  # the last segment (after the last complete special) is still open
            limit = len(buf) - hold  # no cut past here: a special token could straddle the next piece
            cut = seg_start if seg_start <= limit else None
            for m in self._regex.finditer(buf, seg_start):
                if m.start() > limit:
                    break
                cut = m.start()  # the start of the last word that begins before the limit
            if cut:
                yield from self.encode(buf[:cut], **kwargs)
                buf = buf[cut:]
        if buf:
            yield from self.encode(buf, **kwargs)

    # ---- vocabulary ---------------------------------------------------------------------------------------------
    def _set_vocab(self, alphabet: list[str], merges: list[tuple[str, str]], where: str = "") -> None:
        """Tokens = alphabet, then the concatenation of each merge (a repeated concatenation keeps its first id)."""
        self.alphabet = list(alphabet)
        self._tokens = list(alphabet)
        self._ranks = {t: i for i, t in enumerate(self._tokens)}
        if len(self._ranks) != len(self._tokens):
            raise ValueError(f"{where}the alphabet has repeated symbols")
        self.merges = []
        for k, (a, b) in enumerate(merges):
            if a not in self._ranks or b not in self._ranks:
                raise ValueError(f"{where}merge #{k} ({a!r}, {b!r}) uses a symbol that no earlier token has")
            text = a + b
            if text not in self._ranks:
                self._ranks[text] = len(self._tokens)
                self._tokens.append(text)
            self.merges.append((a, b))
        self._id_to_bytes = [self._symbol_bytes(t) for t in self._tokens]
        self.special_tokens = {}
        self.roles = {}
        self._cache = _WordCache(self._encode_word)

    @property
    def num_ordinary_tokens(self) -> int:
        """Ids below this are ordinary tokens (ranks); special tokens follow."""
        return len(self._tokens)

    # ---- training -----------------------------------------------------------------------------------------------
    @lesson_task(1)
    def train(
        self,
        texts: str | Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        special_tokens: Iterable[str] = (),
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        engine: str = "auto",
        num_workers: int | None = None,
        show_progress: bool = False,
    ) -> BPETokenizer:
        """Learn merges from ``texts`` until ``vocab_size`` ids (special tokens included; fewer when no pair is
        seen ``min_frequency`` times any more); returns ``self``.

        ``engine``: ``"reference"`` (lesson loop), ``"incremental"`` (fast Python), ``"cpp"`` (``intro2llm._C``),
        ``"auto"`` (cpp when built, else incremental) — all give the same merges. Raises ``ValueError`` for a
        vocabulary smaller than alphabet + special tokens, or an empty corpus.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        if engine not in ("auto", "reference", "incremental", "cpp"):
            raise ValueError(f"engine must be 'auto', 'reference', 'incremental' or 'cpp', got {engine!r}")
        default_specials, roles = self._default_specials()
        specials = list(dict.fromkeys([*default_specials, *special_tokens]))
        roles = {**roles, "bos": bos_token, "eos": eos_token, "pad": pad_token}
        for role in ("bos", "eos", "pad"):
            if roles[role] is not None and roles[role] not in specials:
                raise ValueError(f"{role}_token={roles[role]!r} must also be listed in special_tokens={specials}")
        self._check_min_vocab(vocab_size, len(specials))

        bar = None
        on_text = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="counting words", unit="B", unit_scale=True)
            on_text = lambda t: bar.update(len(t))
        try:
            counts = _train.count_words(texts, self.pattern, num_workers=num_workers, on_text=on_text,
                                        special_tokens=specials)
        finally:
            if bar is not None:
                bar.close()
        if not counts:
            raise ValueError("cannot train on an empty corpus: the texts contain no characters")
        words = sorted(counts)  # a fixed order (the merges do not depend on it, the run time barely does)
        freqs = [counts[w] for w in words]
        symbols = [self._to_symbols(w) for w in words]
        alphabet = self._training_alphabet(symbols)
        base = len(alphabet) + len(specials)
        if vocab_size < base:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the {len(alphabet)} base symbols seen in training plus "
                f"{len(specials)} special tokens ({base})"
            )
        num_new = vocab_size - base
        if engine == "auto":
            engine = "cpp" if _train.cpp_available() else "incremental"
        merges = self._learn(alphabet, symbols, freqs, num_new, min_frequency, engine, show_progress)
        tokens = list(alphabet)
        pairs = []
        for a, b, new_id in merges:
            pairs.append((tokens[a], tokens[b]))
            if new_id == len(tokens):
                tokens.append(tokens[a] + tokens[b])
        self._set_vocab(alphabet, pairs)
        self._add_special_tokens(specials, roles)
        return self

    def _check_min_vocab(self, vocab_size: int, num_specials: int) -> None:
        if vocab_size < 1 + num_specials:
            raise ValueError(f"vocab_size={vocab_size} cannot hold {num_specials} special tokens and any symbol")

    def _learn(self, alphabet, symbols, freqs, num_new, min_frequency, engine, show_progress):
        index = {s: i for i, s in enumerate(alphabet)}
        if engine == "cpp":
            if not _train.cpp_available():
                raise RuntimeError("engine='cpp' needs the compiled extension intro2llm._C (bpe_train op); rebuild it")
            flat, offsets = [], [0]
            for s in symbols:
                flat.extend(index[c] for c in s)
                offsets.append(len(flat))
            return _train.train_merges_cpp(flat, offsets, freqs, len(alphabet), num_new, min_frequency)
        words = [[index[c] for c in s] for s in symbols]
        if engine == "reference":
            return _train.train_merges_reference(words, freqs, alphabet, num_new, min_frequency)
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_new, desc="merging", unit="tok")
        try:
            return _train.train_merges_incremental(
                words, freqs, alphabet, num_new, min_frequency, progress=bar.update if bar else None
            )
        finally:
            if bar is not None:
                bar.close()

    # ---- save / load ---------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "alphabet": self.alphabet, "merges": [list(m) for m in self.merges]}

    @classmethod
    def _from_state(cls, state: dict[str, Any], path: str) -> BPETokenizer:
        where = f"{path!r}: "
        pattern, alphabet, merges = state.get("pattern"), state.get("alphabet"), state.get("merges")
        if not isinstance(pattern, str):
            raise ValueError(f"{where}'pattern' must be a regex string, got {type(pattern).__name__}")
        if not isinstance(alphabet, list) or not all(isinstance(a, str) and len(a) == 1 for a in alphabet):
            raise ValueError(f"{where}'alphabet' must be a list of single characters")
        if not isinstance(merges, list) or not all(
            isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) and x for x in m) for m in merges
        ):
            raise ValueError(f"{where}'merges' must be a list of [left, right] pairs of non-empty strings")
        try:
            tok = cls(pattern)
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None
        tok._check_alphabet(alphabet, where)
        tok._set_vocab(alphabet, [tuple(m) for m in merges], where)
        return tok

    def _check_alphabet(self, alphabet: list[str], where: str) -> None:
        if not alphabet:
            raise ValueError(f"{where}the alphabet is empty")

    # ---- Hugging Face tokenizer.json --------------------------------------------------------------------------
    def _hf_merges(self) -> list[list[str]]:
        """Every split of every merged token into two tokens, in rank order of the token.

        tiktoken (and our encoder) merges any adjacent pair whose concatenation is a token, ranked by that token;
        ``tokenizers`` merges only listed pairs, ranked by list position. Listing all splits, token by token,
        makes the two rules agree.
        """
        ranks = self._ranks
        merges = []
        for token in self._tokens[len(self.alphabet):]:
            for k in range(1, len(token)):
                if token[:k] in ranks and token[k:] in ranks:
                    merges.append([token[:k], token[k:]])
        return merges

    def _hf_pre_tokenizer(self) -> dict[str, Any]:
        """The pre-tokenizer: our regex, each match one word (``Isolated``), as ``_pretokenize``."""
        return {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False}

    def _hf_decoder(self) -> dict[str, Any]:
        """Tokens are text: decoding concatenates them (without a decoder ``tokenizers`` joins with spaces)."""
        return {"type": "Fuse"}

    def to_hf_json(self) -> dict[str, Any]:
        """The ``tokenizer.json`` content (Hugging Face ``tokenizers`` format) giving exactly our ids."""
        vocab = {t: i for i, t in enumerate(self._tokens)}
        vocab.update(self.special_tokens)
        unk = self.roles.get("unk")
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
                for t, i in self.special_tokens.items()
            ],
            "normalizer": None,
            "pre_tokenizer": self._hf_pre_tokenizer(),
            "post_processor": None,
            "decoder": self._hf_decoder(),
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": unk,  # an unseen character -> one <unk> each (fuse_unk off), as _encode_word
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
    def _hf_num_base(cls, tokens: list[str]) -> int:
        """How many leading tokens of an HF vocabulary are the alphabet (single characters here)."""
        n = 0
        while n < len(tokens) and len(tokens[n]) == 1:
            n += 1
        return n

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a BPE ``tokenizer.json`` written by ``export_hf`` (a file, or a directory holding one); with a
        ``ByteLevel`` pre-tokenizer step ``BPETokenizer.from_hf`` returns a ``ByteLevelBPETokenizer``."""
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
        pattern, byte_level = _hf_pattern(data.get("pre_tokenizer"), where)
        if cls is BPETokenizer and byte_level:
            from intro2llm.tokenizer.byte_level_tokenizer import ByteLevelBPETokenizer

            cls = ByteLevelBPETokenizer
        specials = {}
        for added in data.get("added_tokens") or []:
            if isinstance(added, dict) and added.get("special"):
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
        n_base = cls._hf_num_base(tokens)
        pairs = []
        for i, token in enumerate(tokens[n_base:], start=n_base):
            split = next(
                (k for k in range(1, len(token)) if ranks.get(token[:k], i) < i and ranks.get(token[k:], i) < i), None
            )
            if split is None:
                raise ValueError(f"{where}token {token!r} (id {i}) is not the concatenation of two lower-id tokens")
            pairs.append((token[:split], token[split:]))
        tok = cls(pattern)
        alphabet = tokens[:n_base]
        tok._check_alphabet(alphabet, where)
        tok._set_vocab(alphabet, pairs, where)
        if tok._tokens != tokens:
            raise ValueError(f"{where}the vocabulary has repeated tokens")
        order = sorted(specials, key=specials.get)
        if [specials[t] for t in order] != list(range(len(tokens), len(tokens) + len(order))):
            raise ValueError(f"{where}special-token ids must follow the ordinary vocabulary consecutively")
        unk = model.get("unk_token")
        tok._add_special_tokens(order, {"unk": unk} if unk in specials else None)
        return tok


def _hf_pattern(pre: Any, where: str) -> tuple[str, bool]:
    """(the pre-tokenization regex, whether a ByteLevel step follows) of a tokenizer.json: a Split's regex, or
    GPT-2's for ByteLevel(use_regex)."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    byte_level = any(isinstance(s, dict) and s.get("type") == "ByteLevel" for s in steps)
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "Split":
            regex_pattern = (step.get("pattern") or {}).get("Regex")
            if isinstance(regex_pattern, str):
                return regex_pattern, byte_level
        if isinstance(step, dict) and step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return GPT2_PATTERN, True
    raise ValueError(f"{where}no pre-tokenizer with a regex found (need Split(Regex) or ByteLevel(use_regex))")
