"""Set-up of a learner workspace (copied here by ``intro2llm course init``; the repository's conftest.py does the same
without the first point).

- This folder's ``intro2llm`` (the copy with your lesson's tasks to implement) comes first on ``sys.path``, for
  this pytest and for the Python processes tests start (``PYTHONPATH``), so the tests grade your code.
- Without CUDA, Triton kernels run in the interpreter on CPU tensors (TRITON_INTERPRET=1, set before any kernel
  module is imported); intra-op threads default to 1 (``INTRO2LLM_TEST_THREADS``); ``gpu`` tests skip without CUDA.
"""

import os
import sys

HERE = os.path.dirname(os.path.realpath(__file__))
_loaded = sys.modules.get("intro2llm")
if _loaded is not None and not os.path.realpath(_loaded.__file__).startswith(HERE + os.sep):
    raise RuntimeError(f"intro2llm was imported from {_loaded.__file__} before the workspace {HERE}: run pytest "
                       "from the workspace (or `intro2llm course test N --dir DIR`)")
sys.path[:] = [HERE] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]
os.environ["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                      if p and os.path.realpath(p) != HERE])
os.environ["PYTHONSAFEPATH"] = "1"  # a child's working directory never shadows PYTHONPATH

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(int(os.environ.get("INTRO2LLM_TEST_THREADS", "1")))


# the pytest hooks (CI's missing-extension check, the gpu skip) are the same for the repository and a workspace
from intro2llm.testing import pytest_collection_modifyitems, pytest_sessionstart  # noqa: E402, F401
