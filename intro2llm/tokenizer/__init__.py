"""intro2llm.tokenizer: BPE tokenizers built step by step (minbpe style).

``BaseTokenizer`` (special tokens, batching, save/load) -> ``BPETokenizer`` (character-level BPE, Sennrich et al.)
-> ``ByteLevelBPETokenizer`` (GPT-2 byte-level BPE, tiktoken / Hugging Face compatible).
"""

from intro2llm.tokenizer.base_tokenizer import BaseTokenizer
from intro2llm.tokenizer.bpe_tokenizer import CL100K_PATTERN, GPT2_PATTERN, BPETokenizer
from intro2llm.tokenizer.byte_level_tokenizer import ByteLevelBPETokenizer, bytes_to_unicode

__all__ = [
    "BaseTokenizer",
    "BPETokenizer",
    "ByteLevelBPETokenizer",
    "GPT2_PATTERN",
    "CL100K_PATTERN",
    "bytes_to_unicode",
]
