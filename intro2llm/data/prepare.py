"""Data preparation for the ``train`` command: text → tokenizer → token shards in ``data_dir/{train,val}``.

``prepare_synthetic`` (the arithmetic task of ``data.synthetic`` with a character-level tokenizer) and
``prepare_text`` (any documents, byte-level BPE) both return the tokenizer they trained; a run directory keeps
it as ``intro2llm_tokenizer.json`` (``TOKENIZER_FILE``; checkpoint directories also get the Hugging Face
``tokenizer.json``: ``BaseTokenizer.save_pretrained``), read back by ``load_tokenizer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from intro2llm.tokenizer.base_tokenizer import HF_TOKENIZER_FILE, TOKENIZER_FILE, tokenizer_file

__all__ = ["EOS_TOKEN", "HF_TOKENIZER_FILE", "TOKENIZER_FILE", "load_tokenizer", "prepare_synthetic", "prepare_text",
           "synthetic_tokenizer", "tokenizer_file"]
EOS_TOKEN = "<|endoftext|>"


def load_tokenizer(path: Any) -> Any:
    """The tokenizer of a run/checkpoint directory or of a file (``BaseTokenizer.from_pretrained``: ours under
    ``intro2llm_tokenizer.json``, or ``tokenizer.json`` in our older format or Hugging Face's)."""
    from intro2llm.tokenizer import BaseTokenizer

    return BaseTokenizer.from_pretrained(Path(path))


def synthetic_tokenizer(docs: list[str]) -> Any:
    """A character-level tokenizer for the synthetic tasks: one id per character seen, plus ``<unk>`` and EOS.

    No merges on purpose: each digit stays its own token, so the model learns arithmetic digit by digit and the
    vocabulary (~25 ids) keeps the embedding and the output layer negligible.
    """
    from intro2llm.tokenizer import BPETokenizer

    alphabet = set().union(*map(set, docs))
    tok = BPETokenizer()
    return tok.train(docs, vocab_size=len(alphabet) + 2, special_tokens=[EOS_TOKEN], eos_token=EOS_TOKEN,
                     min_frequency=1)


def prepare_synthetic(data_dir: Any, num_train: int = 50_000, num_val: int = 1_000, seed: int = 0,
                      config: Any = None) -> Any:
    """Arithmetic documents (``intro2llm.data.synthetic``) → tokenizer + ``train``/``val`` shards. Returns the
    tokenizer. Validation problems come from another seed (a few may coincide with training ones: with 1-2 digit
    operands there are only ~30k distinct problems). ``config``: a ``synthetic.SyntheticConfig`` (the mix: e.g.
    ``ops=("+", "+", "-", "*")`` draws half additions); None = its defaults."""
    from intro2llm.data import synthetic
    from intro2llm.data.pretrain_dataset import write_shards

    data_dir = Path(data_dir)
    train_docs = list(synthetic.pretrain_documents(num_train, seed=seed, config=config))
    val_docs = list(synthetic.pretrain_documents(num_val, seed=seed + 1_000_000, config=config))
    tok = synthetic_tokenizer(train_docs + val_docs)
    write_shards(train_docs, tok, data_dir / "train")
    write_shards(val_docs, tok, data_dir / "val")
    return tok


def prepare_text(docs: Any, data_dir: Any, vocab_size: int = 4096, tokenizer_bytes: int = 2_000_000,
                 val_every: int = 20) -> Any:
    """Text documents → a byte-level BPE tokenizer (trained on the first ``tokenizer_bytes`` of text) and
    ``train``/``val`` shards (every ``val_every``-th document is held out). Returns the tokenizer."""
    from intro2llm.data.pretrain_dataset import DataPathError, write_shards
    from intro2llm.tokenizer import ByteLevelBPETokenizer

    data_dir = Path(data_dir)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataPathError("the text data holds no non-empty documents")
    sample, size = [], 0
    for d in docs:
        sample.append(d)
        size += len(d)
        if size >= tokenizer_bytes:
            break
    tok = ByteLevelBPETokenizer().train(sample, vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                        eos_token=EOS_TOKEN)
    val = docs[::val_every] if len(docs) >= 2 * val_every else []
    train = [d for i, d in enumerate(docs) if not (val and i % val_every == 0)]
    write_shards(train, tok, data_dir / "train")
    if val:
        write_shards(val, tok, data_dir / "val")
    return tok


