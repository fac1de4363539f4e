"""BPE training engines: count words once, then learn merges over (word, count) pairs.

Sennrich et al. 2016 ("Neural Machine Translation of Rare Words with Subword Units") learn merges by
repeatedly merging the most frequent adjacent pair. Three engines here give *identical* merges:

* ``train_merges_reference`` — the lesson's version (minbpe's loop): recount every pair after each merge.
  O(merges x corpus): fine for a few hundred merges on a few hundred KB, hopeless at 8k merges on 20 MB.
* ``train_merges_incremental`` — the same result in pure Python, fast: pair counts are updated only for the
  words that contain the merged pair (an index pair -> words), and the next pair comes from a lazy max-heap.
* ``train_merges_cpp`` — the incremental algorithm in C++ (``torch.ops.intro2llm.bpe_train``,
  ``csrc/cpu/bpe_train.cpp``), used when ``intro2llm._C`` is built.

Conventions shared by all three (the tests check that they agree):

* a word is a list of symbol ids; pairs are counted at every adjacent position (``aaa`` holds ``(a, a)`` twice)
  and a merge replaces occurrences left to right without overlap;
* the pair chosen is the one with the highest count; ties go to the smallest ``(left id, right id)``;
* a merge whose concatenation already is a token (``"ab"+"c"`` after ``"a"+"bc"``) reuses that token's id and
  does not count towards the vocabulary size (as Hugging Face ``tokenizers`` does), so a token's string is
  unique and its id is its rank;
* training stops after ``num_new_tokens`` new tokens, when no pair is left, or when the best count is below
  ``min_frequency``.

Word counting (``count_words``) splits texts with the pre-tokenization regex, in parallel across processes
for large inputs. Merges are returned as ``(left id, right id, new id)`` triples.
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence

import regex

Merge = tuple[int, int, int]
_PARALLEL_MIN_BYTES = 4 << 20  # below this, starting processes costs more than it saves
_CHUNK_CHARS = 1 << 20


def _count_chunk(args: tuple[str, list[str], str | None]) -> Counter:
    """Word counts of ``texts``; with ``specials`` (a regex of the special tokens) each text is first split at
    them and they are not counted, so no word, hence no merge, crosses or contains a special token (as in
    Hugging Face ``tokenizers`` when special tokens are given to the trainer)."""
    pattern, texts, specials = args
    compiled = regex.compile(pattern)
    findall = compiled.findall
    split = regex.compile(specials).split if specials else None
    counts: Counter = Counter()
    for text in texts:
        for piece in split(text) if split is not None else (text,):
            words = findall(piece)
            if sum(map(len, words)) != len(piece):
                from intro2llm.tokenizer.bpe_tokenizer import uncovered_error

                raise uncovered_error(pattern, piece, compiled)
            counts.update(words)
    return counts


def _chunks(texts: Iterable[str], on_text: Callable[[str], None] | None) -> Iterable[list[str]]:
    chunk: list[str] = []
    size = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"training texts must be str, got {type(text).__name__}")
        if on_text is not None:
            on_text(text)
        chunk.append(text)
        size += len(text)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def count_words(
    texts: Iterable[str],
    pattern: str,
    *,
    num_workers: int | None = None,
    on_text: Callable[[str], None] | None = None,
    special_tokens: Iterable[str] = (),
) -> Counter:
    """Frequency of each pre-token (regex match) over ``texts``; ``num_workers`` processes for large inputs.
    Occurrences of ``special_tokens`` split the texts and are not counted (see ``_count_chunk``)."""
    specials = sorted(set(special_tokens), key=lambda s: (-len(s), s))  # longest first, as encode() does
    specials_re = "|".join(regex.escape(s) for s in specials) if specials else None
    workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
    chunks = _chunks(texts, on_text)
    total: Counter = Counter()
    first = next(chunks, None)
    if first is None:
        return total
    second = next(chunks, None)
    if second is None or workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for chunk in (first, second) if second is not None else (first,):
            total.update(_count_chunk((pattern, chunk, specials_re)))
        for chunk in chunks:
            total.update(_count_chunk((pattern, chunk, specials_re)))
        return total
    # At least two chunks (>= ~1M characters): count in worker processes, merge the counters here.
    ctx = multiprocessing.get_context("fork")

    def jobs():
        yield pattern, first, specials_re
        yield pattern, second, specials_re
        for chunk in chunks:
            yield pattern, chunk, specials_re

    with ctx.Pool(workers) as pool:
        for counts in pool.imap_unordered(_count_chunk, jobs()):
            total.update(counts)
    return total


# ---- the reference trainer (lesson code) ---------------------------------------------------------------------
def get_stats(words: Sequence[Sequence[int]], counts: Sequence[int]) -> Counter:
    """Count of every adjacent pair, each word weighted by its frequency."""
    stats: Counter = Counter()
    for word, count in zip(words, counts):
        for pair in zip(word, word[1:]):
            stats[pair] += count
    return stats


def merge_word(word: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``word`` (left to right, no overlap) by ``new_id``."""
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_merges_reference(
    words: Sequence[Sequence[int]], counts: Sequence[int], tokens: Sequence[str], num_new_tokens: int,
    min_frequency: int = 1,
) -> list[Merge]:
    """Learn merges the simple way: recount all pairs, merge the best one everywhere, repeat.

    ``words``: symbol ids; ``counts``: each word's frequency; ``tokens``: the string of each existing id (used to
    spot a merge that recreates an existing token).
    """
    words = [list(w) for w in words]
    tokens = list(tokens)
    index = {t: i for i, t in enumerate(tokens)}
    merges: list[Merge] = []
    added = 0
    while added < num_new_tokens:
        stats = get_stats(words, counts)
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))  # most frequent; ties: smallest ids
        if stats[pair] < min_frequency:
            break
        text = tokens[pair[0]] + tokens[pair[1]]
        new_id = index.get(text)
        if new_id is None:
            new_id = index[text] = len(tokens)
            tokens.append(text)
            added += 1
        merges.append((pair[0], pair[1], new_id))
        words = [merge_word(w, pair, new_id) for w in words]
    return merges


# ---- the incremental trainer (same merges, pure Python) ------------------------------------------------------
def train_merges_incremental(
    words: Sequence[Sequence[int]],
    counts: Sequence[int],
    tokens: Sequence[str],
    num_new_tokens: int,
    min_frequency: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[Merge]:
    """``train_merges_reference``'s merges, updating only the pair counts that a merge changes.

    ``pair_counts[p]`` is kept exact; ``where[p]`` lists (a superset of) the words holding ``p``; the heap holds
    ``(-count, a, b)`` entries, and an entry is stale (skipped) unless its count equals the current one. Each
    step pushes one entry per pair whose count changed, so the current count of every pair is always in the
    heap and the heap's top valid entry is the true maximum.
    """
    words = [list(w) for w in words]
    tokens = list(tokens)
    index = {t: i for i, t in enumerate(tokens)}
    pair_counts: defaultdict = defaultdict(int)
    where: defaultdict = defaultdict(list)
    for w, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            holders = where[pair]
            if not holders or holders[-1] != w:
                holders.append(w)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[Merge] = []
    added = 0
    while added < num_new_tokens and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg or neg == 0:
            continue  # stale entry: the pair's count changed after this entry was pushed
        if -neg < min_frequency:
            break
        text = tokens[a] + tokens[b]
        new_id = index.get(text)
        if new_id is None:
            new_id = index[text] = len(tokens)
            tokens.append(text)
            added += 1
            if progress is not None:
                progress(1)
        merges.append((a, b, new_id))
        delta: defaultdict = defaultdict(int)
        for w in sorted(set(where.pop((a, b), ()))):
            word, count = words[w], counts[w]
            merged = merge_word(word, (a, b), new_id)
            if len(merged) == len(word):
                continue  # stale index entry: the pair left this word in an earlier merge
            for pair in zip(word, word[1:]):
                delta[pair] -= count
            for pair in zip(merged, merged[1:]):
                delta[pair] += count
                if new_id in pair:
                    holders = where[pair]
                    if not holders or holders[-1] != w:
                        holders.append(w)
            words[w] = merged
        for pair, d in delta.items():
            if d:
                c = pair_counts[pair] + d
                pair_counts[pair] = c
                if c > 0:
                    heapq.heappush(heap, (-c, pair[0], pair[1]))
                else:
                    del pair_counts[pair]
    return merges


# ---- the C++ trainer -------------------------------------------------------------------------------------------
def cpp_available() -> bool:
    """True when ``intro2llm._C`` (with the ``bpe_train`` op) can be loaded."""
    try:
        import torch

        from intro2llm import _C  # noqa: F401  (registers torch.ops.intro2llm.*)

        return hasattr(torch.ops.intro2llm, "bpe_train")
    except (ImportError, OSError, RuntimeError):
        return False


def train_merges_cpp(
    flat: Sequence[int] | bytes,
    offsets: Sequence[int],
    counts: Sequence[int],
    num_base: int,
    num_new_tokens: int,
    min_frequency: int = 1,
) -> list[Merge]:
    """The incremental algorithm in C++. Words are given flat: word i is ``flat[offsets[i]:offsets[i+1]]``.

    Symbols must be base ids (``< num_base``); tokens are identified by their expansion into base symbols, so
    a repeated concatenation is recognised exactly as in the Python trainers.
    """
    import numpy as np
    import torch

    from intro2llm import _C  # noqa: F401

    if isinstance(flat, (bytes, bytearray)):
        words_t = torch.from_numpy(np.frombuffer(flat, dtype=np.uint8).astype(np.int32))
    else:
        words_t = torch.as_tensor(np.asarray(flat, dtype=np.int32))
    offsets_t = torch.as_tensor(np.asarray(offsets, dtype=np.int64))
    counts_t = torch.as_tensor(np.asarray(counts, dtype=np.int64))
    out = torch.ops.intro2llm.bpe_train(words_t, offsets_t, counts_t, num_base, num_new_tokens, min_frequency)
    return [tuple(row) for row in out.tolist()]
