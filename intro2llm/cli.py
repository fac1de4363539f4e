"""The ``intro2llm`` command: ``intro2llm info`` plus the subcommands each feature package registers.

A feature module listed in ``_COMMAND_MODULES`` defines ``register(subparsers)``; it stays light to import
(torch is imported inside the handlers), so ``intro2llm --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

_COMMAND_MODULES = (
    "intro2llm.tokenizer.cli",
    "intro2llm.model.cli",
    "intro2llm.training.cli",
    "intro2llm.training.sft_cli",
    "intro2llm.training.dpo_cli",
    "intro2llm.training.rl_cli",
    "intro2llm.evaluation.cli",
    "intro2llm.model.chat_cli",
    "intro2llm.bench_cli",
    "intro2llm.pipeline.cli",
    "intro2llm.course.cli",
)


def _info(args: argparse.Namespace) -> int:
    import torch

    import intro2llm
    from intro2llm.ops import backend_status

    print(f"intro2llm {intro2llm.__version__}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"torch     {torch.__version__} (cuda: {torch.version.cuda or 'none'}, threads: {torch.get_num_threads()})")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except ImportError:
        print("triton    not installed")
    if torch.cuda.is_available():
        print(f"device    {torch.cuda.get_device_name()}")
    print("backends:")
    for name, why in backend_status().items():
        print(f"  {name:<10} {'available' if why is None else 'missing: ' + why}")
    _print_extension()
    return 0


def _print_extension() -> None:
    """Where ``intro2llm._C`` came from (install-time build, per-user cache, missing) and why."""
    from intro2llm import _ext

    st = _ext.state()
    rec = st.record
    print(f"extension intro2llm._C: {st.origin}")
    if st.module is None:
        print(f"  why      {st.error}")
        print(f"  fix      {st.fix}")
        return
    origin = {"package": "built when the package was installed", "cache": "built for this torch in the user cache"}
    print(f"  from     {origin.get(st.origin, st.origin)}: {st.path}")
    if rec:
        print(f"  built    for {_ext.describe(rec)} by {rec.get('built_by', '?')}, sources {rec.get('source_hash')}")
        csrc = _ext.source_dir()
        if st.origin == "package" and csrc is not None and rec.get("source_hash") not in (None, _ext.source_hash(csrc)):
            print(f"  stale    {csrc} changed since this build: rebuild it (or run intro2llm build-ext)")
    cuda = {True: "yes", False: "no", None: "unknown"}[st.cuda]
    print(f"  cuda     {cuda}" + (f" ({rec['cuda_note']})" if rec.get("cuda_note") else ""))
    if st.why:
        print(f"  why      {st.why}")
    if rec.get("last_failure"):
        print(f"  note     the last rebuild failed ({rec['last_failure']}); this is the build before it")


def _build_ext(args: argparse.Namespace) -> int:
    from intro2llm import _ext

    st = _ext.state(build="force")
    if st.module is None:
        if st.log:
            try:
                lines = open(st.log).read().splitlines()
                errors = [ln for ln in lines if "error" in ln.lower()] or lines[-30:]
                print("\n".join(errors[:30]), file=sys.stderr)
            except OSError:
                pass
        print(f"intro2llm build-ext: {st.error}" + (f"; fix: {st.fix}" if st.fix else ""), file=sys.stderr)
        return 2
    print(f"intro2llm._C built for torch {st.record.get('torch')} ({st.record.get('flavour')}), "
          f"CUDA kernels: {'yes' if st.cuda else 'no'}: {st.path}")
    if st.why:
        print(st.why)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intro2llm", description="intro2llm: an LLM stack built from scratch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions and the op backends available on this machine")
    info.set_defaults(func=_info)
    build_ext = sub.add_parser("build-ext", help="compile intro2llm._C for the running torch into the user cache")
    build_ext.set_defaults(func=_build_ext)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
