"""Session set-up shared by tests/ and tutorial/.

- Without CUDA, Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET=1 must be set before
  any kernel module is imported, so it is set here, first. Auto dispatch never picks Triton for CPU tensors,
  so this changes nothing for the other backends.
- Under INTRO2LLM_REQUIRE_EXT=1 (CI), a missing compiled extension fails the session instead of skipping.
- ``python -m pytest`` from the repository root puts the root first on ``sys.path``: the source tree's
  ``intro2llm`` (no compiled ``_C`` after a regular ``pip install .``) would shadow the installed package, and the
  top-level ``kernels/`` folder (installed as ``intro2llm.kernels``) the PyPI ``kernels`` package that
  ``transformers`` imports. The root is taken off ``sys.path`` here, before anything imports either, so
  ``python -m pytest`` imports what plain ``pytest`` imports (kept only when no installed ``intro2llm`` exists).
- Child Python processes (``python -c``/``-m`` from tests) get ``PYTHONSAFEPATH=1`` so they import the installed
  package, not the source tree in the working directory (which has no compiled ``_C`` after a regular install).
- Intra-op threads default to 1 (``INTRO2LLM_TEST_THREADS`` overrides): test tensors are small, and on a
  loaded 2-core machine OpenMP's spinning threads can stall a parallel region 10-100x. Tests that cover
  multi-threaded reductions set the thread count themselves.
"""

import importlib.util
import os
import sys


def _drop_source_tree_from_sys_path() -> None:
    root = os.path.dirname(os.path.abspath(__file__))
    entries = [p for p in sys.path if os.path.abspath(p or os.curdir) == root]
    if not entries:
        return
    sys.path[:] = [p for p in sys.path if p not in entries]
    importlib.invalidate_caches()
    if importlib.util.find_spec("intro2llm") is None:  # a bare checkout, not installed: keep the old behaviour
        sys.path[:0] = entries


_drop_source_tree_from_sys_path()

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["PYTHONSAFEPATH"] = "1"
torch.set_num_threads(int(os.environ.get("INTRO2LLM_TEST_THREADS", "1")))


# the pytest hooks (CI's missing-extension check, the gpu skip) are the same for the repository and a workspace
from intro2llm.testing import pytest_collection_modifyitems, pytest_sessionstart  # noqa: E402, F401
