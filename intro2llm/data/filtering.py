"""Text cleaning for pretraining corpora: normalization, rule filters, a perplexity filter, a pipeline.

References:
- Gopher quality rules: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from
  Training Gopher", appendix A.1.1 (MassiveWeb filtering); thresholds below are the paper's.
- Perplexity filtering: Wenzek et al. 2019, "CCNet" (score documents with a language model trained on
  clean text, drop the tails).

Words: a CJK character counts as one word (Chinese has no spaces); any other run of non-space
characters is one word. So ``"我爱NLP models"`` has 4 words: 我, 爱, NLP, models.

A filter is an object with ``name`` and ``check(text) -> str | None`` (None: keep; else the name of
the rule that dropped it, e.g. ``"quality.word_count"``); ``filter(text)`` is True when kept.
``Pipeline`` runs filters in order over a list and counts, per rule, how many documents it dropped.

Not handled: language identification beyond script statistics (no fastText/CLD model: English vs
French are both "en" = Latin script), toxicity/PII filtering, URL blocklists.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from intro2llm.course import lesson_task

# ------------------------------------------------------------------ normalization and words

_CJK_RANGES = (
    (0x3400, 0x4DBF),  # CJK Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x2EBEF),  # Extensions B-F
    (0x30000, 0x323AF),  # Extensions G-H
)
_CJK_CLASS = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in _CJK_RANGES)
_WORD_RE = re.compile(f"[{_CJK_CLASS}]|[^\\s{_CJK_CLASS}]+")
_KEEP_CONTROL = {"\n", "\t"}


def is_cjk(ch: str) -> bool:
    """True for a Han (Chinese) character."""
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _CJK_RANGES)


def normalize_text(text: str, *, form: str = "NFKC") -> str:
    """Unicode ``form`` normalization; drop control/format/private-use/unassigned characters.

    Kept: ``\\n`` and ``\\t``. ``\\r\\n``, ``\\r`` and U+2028/U+2029 (line/paragraph separators)
    become ``\\n``. NFKC folds full-width ASCII (``"ＡＢＣ１２３"`` -> ``"ABC123"``) and ligatures, which
    makes the later rules and dedup hashes see one spelling. Dropped categories: Cc (controls), Cf
    (zero-width space, BOM, bidi marks), Co (private use), Cs (lone surrogates), Cn (unassigned), and
    U+FFFD (decoding errors).
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_text expects str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # fast path (C speed): str.isprintable() is False exactly for the categories we drop, plus separators
    if "\ufffd" in text or not text.replace("\n", "").replace("\t", "").isprintable():
        out = []
        for ch in text:
            if ch in _KEEP_CONTROL:
                out.append(ch)
                continue
            cat = unicodedata.category(ch)
            if ch == "\ufffd" or cat in ("Cc", "Cf", "Co", "Cs", "Cn"):
                continue
            out.append("\n" if cat in ("Zl", "Zp") else ch)
        text = "".join(out)
    # normalize after removal, so that characters that were split by a removed one compose (idempotent)
    return unicodedata.normalize(form, text)


def words(text: str) -> list[str]:
    """Words: each CJK character, and each other run of non-space characters."""
    return _WORD_RE.findall(text)


def count_words(text: str) -> int:
    return len(words(text))


# ------------------------------------------------------------------ filter base


class Filter:
    """Base class: subclasses implement ``check``."""

    name = "filter"

    def check(self, text: str) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, text: str) -> bool:
        return self.check(text) is None


class FunctionFilter(Filter):
    """Wrap ``keep(text) -> bool`` as a filter named ``name``."""

    def __init__(self, name: str, keep: Callable[[str], bool]) -> None:
        self.name = name
        self._keep = keep

    def check(self, text: str) -> str | None:
        return None if self._keep(text) else self.name


class LengthFilter(Filter):
    """Keep ``min_chars <= len(text) <= max_chars`` and ``min_words <= words <= max_words``."""

    name = "length"

    def __init__(
        self,
        min_chars: int = 0,
        max_chars: int | None = None,
        min_words: int = 0,
        max_words: int | None = None,
    ) -> None:
        self.min_chars, self.max_chars = min_chars, max_chars
        self.min_words, self.max_words = min_words, max_words

    @lesson_task(6)
    def check(self, text: str) -> str | None:
        n = len(text)
        if n < self.min_chars or (self.max_chars is not None and n > self.max_chars):
            return "length.chars"
        if self.min_words or self.max_words is not None:
            w = count_words(text)
            if w < self.min_words or (self.max_words is not None and w > self.max_words):
                return "length.words"
        return None


# ------------------------------------------------------------------ Gopher quality rules

_BULLETS = ("•", "●", "○", "▪", "-", "*", "·", "‣")
_ELLIPSES = ("...", "…")
_SYMBOLS = ("#", "...", "…")


def duplicate_line_fraction(text: str) -> float:
    """Fraction of non-empty lines that repeat an earlier line."""
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def top_ngram_char_fraction(ws: Sequence[str], n: int) -> float:
    """Characters in the most frequent word n-gram (counted once per occurrence) / characters in all words."""
    total = sum(len(w) for w in ws)
    if total == 0 or len(ws) < n:
        return 0.0
    counts = Counter(tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))
    gram, c = counts.most_common(1)[0]
    if c < 2:
        return 0.0
    return sum(len(w) for w in gram) * c / total


def duplicate_ngram_char_fraction(ws: Sequence[str], n: int) -> float:
    """Characters of words covered by word n-grams that occur more than once / characters in all words.

    Overlapping duplicate n-grams count each word once (Gopher's definition).
    """
    total = sum(len(w) for w in ws)
    if total == 0 or len(ws) < n:
        return 0.0
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    counts = Counter(grams)
    covered = np.zeros(len(ws), dtype=bool)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = True
    return sum(len(w) for w, c in zip(ws, covered) if c) / total


@dataclass
class QualityFilter(Filter):
    """Gopher's MassiveWeb rules (defaults are the paper's thresholds).

    With CJK text (more than ``cjk_fraction`` of letters are Han), the mean-word-length rule is
    skipped (every "word" is one character) and the stop-word rule is off (it is English-only).
    """

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_line_fraction: float = 0.9
    max_ellipsis_line_fraction: float = 0.3
    min_alpha_word_fraction: float = 0.8  # i.e. the non-alphabetic word ratio must stay <= 0.2
    min_stop_words: int = 2
    stop_words: frozenset[str] = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
    max_duplicate_line_fraction: float = 0.3
    top_ngram_limits: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    dup_ngram_limits: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    cjk_fraction: float = 0.3
    name: str = "quality"

    @lesson_task(6)
    def check(self, text: str) -> str | None:
        ws = words(text)
        n = len(ws)
        if n < self.min_words or n > self.max_words:
            return "quality.word_count"
        letters = [c for c in text if c.isalpha()]
        cjk = bool(letters) and sum(map(is_cjk, letters)) / len(letters) > self.cjk_fraction
        if not cjk:
            mean_len = sum(len(w) for w in ws) / n
            if not self.min_mean_word_length <= mean_len <= self.max_mean_word_length:
                return "quality.mean_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > self.max_symbol_word_ratio:
            return "quality.symbol_word_ratio"
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        if lines:
            if sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > self.max_bullet_line_fraction:
                return "quality.bullet_lines"
            if sum(ln.endswith(_ELLIPSES) for ln in lines) / len(lines) > self.max_ellipsis_line_fraction:
                return "quality.ellipsis_lines"
        if sum(any(c.isalpha() for c in w) for w in ws) / n < self.min_alpha_word_fraction:
            return "quality.non_alpha_words"
        if not cjk and self.min_stop_words:
            found = sum(1 for w in ws if w.lower() in self.stop_words)
            if found < self.min_stop_words:
                return "quality.stop_words"
        if duplicate_line_fraction(text) > self.max_duplicate_line_fraction:
            return "quality.duplicate_lines"
        for k, limit in self.top_ngram_limits.items():
            if top_ngram_char_fraction(ws, k) > limit:
                return "quality.top_ngram"
        for k, limit in self.dup_ngram_limits.items():
            if duplicate_ngram_char_fraction(ws, k) > limit:
                return "quality.duplicate_ngrams"
        return None


# ------------------------------------------------------------------ language by script statistics

# A line "looks like code" when it starts with a keyword/declaration, ends like a C-family statement,
# assigns, ends with a call, is a comment, or closes a bracket. Measured on files under this machine's
# Python installation (first 4000 chars each): >= 30% such lines flags 97% of 240 .py files and 96% of 98
# .c/.h/.js/.sh files as code, and 1 of 156 LICENSE/README/.md files.
_CODE_LINE = re.compile(
    r"""
    ^\s*(def\s|class\s|import\s|from\s+[\w.]+\s+import|return\b|yield\b|raise\b|elif\b|else\s*:|try\s*:
         |except\b|finally\s*:|with\s.*:\s*$|for\s.*:\s*$|while\s.*:\s*$|if\s.*:\s*$|@\w
         |\#\s*(include|define|if|endif|ifdef|ifndef)\b
         |(public|private|protected|static|void|int|char|func|fn|let|const|var|package|using|namespace|struct|typedef)\s)
    | [;{}]\s*$
    | ^\s*[\w.\[\]'"]+\s*(=|\+=|-=|\*=|/=|:=)\s*\S
    | \w\([^()]*\)[:;]?\s*$
    | ^\s*(\#|//|/\*)
    | ^\s*[)\]}]
    """,
    re.X,
)
_DOCSTRING = re.compile(r'("""|\'\'\')[\s\S]*?\1')  # Python docstrings read like prose: not counted as lines
_CODE_CHARS = set("{}()[];=<>_/\\|&*+#:")


@dataclass(frozen=True)
class ScriptStats:
    """Character statistics of a text (fractions of letters or of non-space characters)."""

    cjk: float  # Han characters / letters
    latin: float  # ASCII + Latin-1/Extended letters / letters
    other: float  # letters of other scripts / letters
    code_chars: float  # code punctuation / non-space characters
    code_lines: float  # lines that look like code / non-empty lines (docstrings removed)


def script_stats(text: str) -> ScriptStats:
    letters = [c for c in text if c.isalpha()]
    nl = max(1, len(letters))
    cjk = sum(map(is_cjk, letters))
    latin = sum(1 for c in letters if ord(c) < 0x250)
    nonspace = [c for c in text if not c.isspace()]
    lines = [ln for ln in _DOCSTRING.sub("", text).split("\n") if ln.strip()]
    code_lines = sum(1 for ln in lines if _CODE_LINE.search(ln))
    return ScriptStats(
        cjk=cjk / nl,
        latin=latin / nl,
        other=(len(letters) - cjk - latin) / nl,
        code_chars=sum(c in _CODE_CHARS for c in nonspace) / max(1, len(nonspace)),
        code_lines=code_lines / max(1, len(lines)),
    )


@lesson_task(6)
def detect_language(text: str, *, cjk_threshold: float = 0.3, code_threshold: float = 0.3) -> str:
    """``"zh"``, ``"code"``, ``"en"`` (Latin script) or ``"other"``, from script statistics only."""
    s = script_stats(text)
    if s.cjk >= cjk_threshold:
        return "zh"
    if s.code_lines >= code_threshold:
        return "code"
    if s.latin >= 0.8:
        return "en"
    return "other"


class LanguageFilter(Filter):
    """Keep documents whose ``detect_language`` label is in ``keep`` (e.g. ``("zh", "en")``)."""

    name = "language"

    def __init__(self, keep: Iterable[str] = ("zh", "en", "code"), **detect_kwargs: float) -> None:
        self.keep = frozenset(keep)
        bad = self.keep - {"zh", "en", "code", "other"}
        if bad:
            raise ValueError(f"unknown language labels {sorted(bad)}; use zh, en, code, other")
        self.detect_kwargs = detect_kwargs

    def check(self, text: str) -> str | None:
        lang = detect_language(text, **self.detect_kwargs)
        return None if lang in self.keep else f"language.{lang}"


# ------------------------------------------------------------------ perplexity


class CharNGramScorer:
    """A tiny character n-gram LM (add-k smoothing) for perplexity scores without a neural model.

    ``fit(reference_texts)`` then ``scorer(text) -> perplexity`` (per character). CCNet uses a
    word-piece KenLM trained on Wikipedia; the idea is the same.
    """

    def __init__(self, n: int = 3, k: float = 0.1) -> None:
        if n < 1 or k <= 0:
            raise ValueError(f"need n >= 1 and k > 0, got n={n}, k={k}")
        self.n, self.k = n, k
        self.counts: Counter = Counter()
        self.context: Counter = Counter()
        self.vocab: set[str] = set()

    def fit(self, texts: Iterable[str]) -> CharNGramScorer:
        for t in texts:
            t = "\x02" * (self.n - 1) + t
            self.vocab.update(t)
            for i in range(self.n - 1, len(t)):
                self.counts[t[i - self.n + 1 : i + 1]] += 1
                self.context[t[i - self.n + 1 : i]] += 1
        return self

    def __call__(self, text: str) -> float:
        if not text:
            return float("inf")
        v = len(self.vocab) + 1
        t = "\x02" * (self.n - 1) + text
        nll = 0.0
        for i in range(self.n - 1, len(t)):
            c = self.counts.get(t[i - self.n + 1 : i + 1], 0)
            ctx = self.context.get(t[i - self.n + 1 : i], 0)
            nll -= math.log((c + self.k) / (ctx + self.k * v))
        return math.exp(nll / len(text))


def lm_perplexity_scorer(model: Callable, tokenizer, *, max_tokens: int = 1024, device: str = "cpu") -> Callable:
    """``text -> perplexity`` with a causal LM: ``model(ids)`` returns logits ``(1, T, V)`` (or an
    object with ``.logits``); ``tokenizer.encode(text) -> list[int]``. Texts are cut to ``max_tokens``."""
    import torch

    @torch.no_grad()
    def score(text: str) -> float:
        ids = tokenizer.encode(text)[:max_tokens]
        if len(ids) < 2:
            return float("inf")
        x = torch.tensor([ids], device=device)
        out = model(x)
        logits = getattr(out, "logits", out)  # (1, T, V)
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:])
        return float(torch.exp(nll))

    return score


class PerplexityFilter(Filter):
    """Drop documents whose score is a statistical outlier among the corpus.

    ``score_fn(text) -> float`` is any scorer (``lm_perplexity_scorer``, ``CharNGramScorer``, ...).
    Scores go through ``log`` first when ``log_scale`` (perplexities are heavy-tailed). Bounds, set by
    ``fit(texts)`` (the pipeline calls it on the documents that reach this filter):

    - ``method="mad"``: keep ``|s - median| <= k * 1.4826 * MAD`` (a robust z-score: 1.4826 * MAD is the
      standard deviation for normal data, but one outlier cannot inflate it the way it inflates std).
    - ``method="quantile"``: keep scores between the ``low`` and ``high`` quantiles.

    ``side="high"`` only drops the high tail (gibberish); ``"low"`` only the low tail (boilerplate,
    repeated text); ``"both"`` (default) drops both.
    """

    name = "perplexity"

    def __init__(
        self,
        score_fn: Callable[[str], float],
        *,
        method: str = "mad",
        k: float = 3.0,
        low: float = 0.05,
        high: float = 0.95,
        side: str = "both",
        log_scale: bool = True,
    ) -> None:
        if method not in ("mad", "quantile"):
            raise ValueError(f"method must be 'mad' or 'quantile', got {method!r}")
        if side not in ("both", "high", "low"):
            raise ValueError(f"side must be 'both', 'high' or 'low', got {side!r}")
        if not 0 <= low < high <= 1:
            raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
        self.score_fn, self.method, self.k = score_fn, method, k
        self.low, self.high, self.side, self.log_scale = low, high, side, log_scale
        self.bounds: tuple[float, float] | None = None

    def score(self, text: str) -> float:
        s = float(self.score_fn(text))
        if self.log_scale:
            s = math.log(s) if s > 0 else float("-inf")
        return s

    def fit(self, texts: Sequence[str]) -> PerplexityFilter:
        scores = np.array([self.score(t) for t in texts], dtype=np.float64)
        return self.fit_scores(scores)

    def fit_scores(self, scores: np.ndarray) -> PerplexityFilter:
        finite = scores[np.isfinite(scores)]
        if finite.size == 0:
            raise ValueError("PerplexityFilter.fit: no finite scores")
        if self.method == "quantile":
            lo, hi = np.quantile(finite, [self.low, self.high])
        else:
            med = float(np.median(finite))
            spread = 1.4826 * float(np.median(np.abs(finite - med)))
            if spread == 0:  # more than half the scores are equal: fall back to the mean deviation
                spread = 1.2533 * float(np.mean(np.abs(finite - med)))
            lo, hi = med - self.k * spread, med + self.k * spread
        self.bounds = (float(lo) if self.side != "high" else -math.inf, float(hi) if self.side != "low" else math.inf)
        return self

    def check(self, text: str) -> str | None:
        if self.bounds is None:
            raise ValueError("PerplexityFilter has no bounds yet: call fit(texts) first (Pipeline does)")
        s = self.score(text)
        if math.isnan(s):
            return "perplexity.high"
        if s < self.bounds[0]:
            return "perplexity.low"
        if s > self.bounds[1]:
            return "perplexity.high"
        return None


# ------------------------------------------------------------------ pipeline


@dataclass
class PipelineResult:
    kept: list[str]
    kept_indices: list[int]
    dropped: dict[int, str]  # input index -> rule that dropped it
    report: dict[str, int]  # "input", "kept", and one entry per rule that dropped something

    def format_report(self) -> str:
        width = max([len(k) for k in self.report] + [5])
        lines = [f"{k:<{width}}  {v:>8}" for k, v in self.report.items()]
        return "\n".join(lines)


class Pipeline:
    """Normalize (optional), then apply ``filters`` in order; a document is dropped by the first rule it fails.

    Filters with a ``fit`` method (``PerplexityFilter``) without bounds are fitted on the documents
    that reach them, so the pipeline works stage by stage over a list.
    """

    def __init__(self, filters: Sequence[Filter | Callable[[str], bool]], *, normalize: bool = True) -> None:
        self.filters: list[Filter] = []
        for f in filters:
            if isinstance(f, Filter):
                self.filters.append(f)
            elif callable(f):
                self.filters.append(FunctionFilter(getattr(f, "__name__", "function"), f))
            else:
                raise TypeError(f"pipeline step must be a Filter or a callable, got {type(f).__name__}")
        self.normalize = normalize

    def run(self, docs: Iterable[str]) -> PipelineResult:
        texts = [normalize_text(d) if self.normalize else d for d in docs]
        alive = list(range(len(texts)))
        dropped: dict[int, str] = {}
        counts: Counter = Counter()
        for f in self.filters:
            if getattr(f, "bounds", 0) is None and hasattr(f, "fit"):
                f.fit([texts[i] for i in alive])
            survivors = []
            for i in alive:
                rule = f.check(texts[i])
                if rule is None:
                    survivors.append(i)
                else:
                    dropped[i] = rule
                    counts[rule] += 1
            alive = survivors
        report = {"input": len(texts), "kept": len(alive)}
        report.update({f"dropped.{k}": v for k, v in counts.items()})
        return PipelineResult([texts[i] for i in alive], alive, dropped, report)

    def __call__(self, docs: Iterable[str]) -> list[str]:
        return self.run(docs).kept
