"""Triton kernels of intro2llm, installed as ``intro2llm.kernels`` (one file per op).

Each file holds private ``@triton.jit`` kernels and host launchers (``tiles.py``: the small jit helpers several
of them share); the registered ops and autograd glue live in ``intro2llm/ops/<op>.py``. Importing this package
needs ``triton``; on a machine without a GPU set ``TRITON_INTERPRET=1`` before triton is imported to run the
kernels on CPU tensors.
"""
