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
    "intro2llm.evaluation.cli",
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intro2llm", description="intro2llm: an LLM stack built from scratch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions and the op backends available on this machine")
    info.set_defaults(func=_info)
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
