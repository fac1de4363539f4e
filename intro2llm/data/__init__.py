"""intro2llm.data: filtering, deduplication, synthetic tasks and pretraining datasets.

Submodules are imported lazily by their users; this package re-exports the main public names of
filtering, dedup, synthetic and pretrain_dataset (numpy only, no torch at import time).
"""

from .dedup import (
    DedupFilter,
    DedupResult,
    ExactDeduplicator,
    MinHash,
    MinHashLSH,
    NearDuplicateDeduplicator,
    candidate_probability,
    exact_dedup,
    jaccard,
    near_dedup,
    optimal_bands,
    shingles,
)
from .filtering import (
    CharNGramScorer,
    LanguageFilter,
    LengthFilter,
    PerplexityFilter,
    Pipeline,
    QualityFilter,
    count_words,
    detect_language,
    normalize_text,
)
from .pretrain_dataset import DataPathError, PretrainDataset, PretrainLoader, ShardWriter, write_shards
from .synthetic import SyntheticConfig, dpo_triples, pretrain_documents, reward, sft_pairs, solve

__all__ = [
    "CharNGramScorer",
    "DataPathError",
    "DedupFilter",
    "DedupResult",
    "ExactDeduplicator",
    "LanguageFilter",
    "LengthFilter",
    "MinHash",
    "MinHashLSH",
    "NearDuplicateDeduplicator",
    "PerplexityFilter",
    "Pipeline",
    "PretrainDataset",
    "PretrainLoader",
    "QualityFilter",
    "ShardWriter",
    "SyntheticConfig",
    "candidate_probability",
    "count_words",
    "detect_language",
    "dpo_triples",
    "exact_dedup",
    "jaccard",
    "near_dedup",
    "normalize_text",
    "optimal_bands",
    "pretrain_documents",
    "reward",
    "sft_pairs",
    "shingles",
    "solve",
    "write_shards",
]
