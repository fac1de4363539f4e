"""``intro2llm tokenizer``: train a byte-level BPE tokenizer, or encode stdin with one.

    intro2llm tokenizer train --input PATH|stdlib --vocab-size N --out FILE [--pattern gpt2|cl100k]
    echo "hello world" | intro2llm tokenizer encode --tokenizer FILE

``--input`` is a text file, a directory (every file under it, sorted; non-UTF-8 bytes replaced), or ``stdlib``
(this Python's standard library source, ``intro2llm.data.corpora.python_stdlib``). Light to import: the
tokenizer modules (and torch, for the C++ trainer) load inside the handlers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator


def _input_texts(source: str, max_bytes: int | None) -> Iterator[str]:
    if source == "stdlib":
        from intro2llm.data.corpora import python_stdlib

        yield from python_stdlib(max_bytes)
        return
    if os.path.isdir(source):
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(source) for f in files)
    elif os.path.isfile(source):
        paths = [source]
    else:
        raise FileNotFoundError(f"--input {source!r} is neither a file, a directory, nor 'stdlib'")
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes - total)
        total += len(data)
        yield data.decode("utf-8", errors="replace")
        if max_bytes is not None and total >= max_bytes:
            return


def _train(args: argparse.Namespace) -> int:
    from intro2llm.tokenizer import ByteLevelBPETokenizer

    specials = list(args.special_token or [])
    if args.eos_token and args.eos_token not in specials:
        specials.append(args.eos_token)
    try:
        tok = ByteLevelBPETokenizer(args.pattern).train(
            _input_texts(args.input, args.max_bytes),
            args.vocab_size,
            min_frequency=args.min_frequency,
            special_tokens=specials,
            eos_token=args.eos_token or None,
            show_progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"intro2llm tokenizer train: error: {exc}", file=sys.stderr)
        return 2
    tok.save(args.out)
    print(f"saved {tok.vocab_size} tokens ({len(tok.merges)} merges) to {args.out}", file=sys.stderr)
    return 0


def _encode(args: argparse.Namespace) -> int:
    from intro2llm.tokenizer import BaseTokenizer

    try:
        tok = BaseTokenizer.load(args.tokenizer)
    except (ValueError, FileNotFoundError) as exc:
        print(f"intro2llm tokenizer encode: error: {exc}", file=sys.stderr)
        return 2
    text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    allowed = "all" if args.allow_special else ()
    try:  # special-token text in the input is ordinary text unless --allow-special
        ids = tok.encode(text, allowed_special=allowed, disallowed_special=())
    except ValueError as exc:
        print(f"intro2llm tokenizer encode: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(" ".join(map(str, ids)) + "\n")
    return 0


def register(subparsers) -> None:
    """Add ``tokenizer train`` and ``tokenizer encode`` to the ``intro2llm`` command."""
    parser = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer or encode text with one")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    train = sub.add_parser("train", help="train a byte-level BPE tokenizer and save it as JSON")
    train.add_argument("--input", required=True, help="a text file, a directory, or 'stdlib' (Python's own source)")
    train.add_argument("--vocab-size", type=int, required=True, help="number of ids, special tokens included")
    train.add_argument("--out", required=True, help="output JSON file (written atomically)")
    train.add_argument("--pattern", default="gpt2", help="pre-tokenization regex: gpt2, cl100k, or a regex")
    train.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes of input")
    train.add_argument("--min-frequency", type=int, default=2, help="stop when the best pair is rarer than this")
    train.add_argument("--special-token", action="append", help="a special token (repeatable)")
    train.add_argument("--eos-token", default="<|endoftext|>", help="end-of-text special token ('' for none)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    encode = sub.add_parser("encode", help="read text on stdin, print token ids on stdout")
    encode.add_argument("--tokenizer", required=True, help="a JSON file written by 'tokenizer train' / save()")
    encode.add_argument(
        "--allow-special", action="store_true", help="turn special-token text into special ids (default: as text)"
    )
    encode.set_defaults(func=_encode)
