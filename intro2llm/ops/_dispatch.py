"""Backend resolution for ``intro2llm.ops``: which implementation of an op runs for a given call.

Backends: ``"reference"`` (PyTorch eager, always there), ``"triton"`` (``intro2llm.kernels``), ``"cpp"``
(``intro2llm._C`` on CPU tensors), ``"cuda"`` (``intro2llm._C`` on CUDA tensors).

First match wins: the call's ``backend=`` argument > ``with use_backend(name):`` > env ``INTRO2LLM_BACKEND`` >
auto. Auto picks, for CUDA tensors, triton, else cuda, else reference; for CPU tensors, cpp if built, else
reference. Auto never raises; an explicit choice that cannot run raises ``BackendUnavailableError`` naming what
is missing. Resolution happens in Python before autograd records anything, so each backend's autograd formula
is the one that runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator, Sequence

import torch

BACKENDS = ("reference", "triton", "cpp", "cuda")
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every fast backend computes in
_ENV_VAR = "INTRO2LLM_BACKEND"
_stack: list[str] = []  # use_backend() nesting


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call (not built, not installed, wrong device)."""


@functools.cache
def _extension() -> tuple[object | None, str | None]:
    """Import ``intro2llm._C`` once: (module, None) or (None, why it is missing)."""
    try:
        from intro2llm import _C  # noqa: F401  (importing registers torch.ops.intro2llm.*)

        return _C, None
    except ImportError as exc:
        return None, f"the compiled extension intro2llm._C is not built ({exc}); reinstall with a C++ compiler"


@torch._dynamo.assume_constant_result  # probes run eagerly: torch.compile(fullgraph=True) sees a constant
def extension_error() -> str | None:
    """Why ``intro2llm._C`` is unavailable, or None when it loaded."""
    return _extension()[1]


def triton_interpret() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch._dynamo.assume_constant_result
def _triton_installed() -> str | None:
    return _triton_missing()


@functools.cache
def _triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def backend_status() -> dict[str, str | None]:
    """For each backend: None when it can run on this machine, else the reason it cannot."""
    ext_err = extension_error()
    cuda_ok = torch.cuda.is_available()
    status: dict[str, str | None] = {"reference": None}
    triton_err = _triton_installed()
    if triton_err is None and not cuda_ok and not triton_interpret():
        triton_err = "no CUDA device, and TRITON_INTERPRET=1 is not set (the interpreter runs Triton on CPU)"
    status["triton"] = triton_err
    status["cpp"] = ext_err
    if not torch.version.cuda:
        status["cuda"] = f"torch {torch.__version__} is a CPU-only build"
    elif not cuda_ok:
        status["cuda"] = "no CUDA device is visible"
    elif ext_err is not None:
        status["cuda"] = ext_err
    elif not torch._C._dispatch_has_kernel_for_dispatch_key("intro2llm::rms_norm_fwd", "CUDA"):
        status["cuda"] = "intro2llm._C was built without CUDA sources (torch had no CUDA at build time)"
    else:
        status["cuda"] = None
    return status


def available_backends() -> list[str]:
    """The backends that can run on this machine, in ``BACKENDS`` order."""
    return [name for name, err in backend_status().items() if err is None]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every ``intro2llm.ops`` call inside the block on backend ``name`` (unless a call passes ``backend=``)."""
    _check_name(name)
    _stack.append(name)
    try:
        yield
    finally:
        _stack.pop()


def _check_name(name: str) -> None:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")


@torch._dynamo.assume_constant_result
def has_compiled_kernel(op: str, device_type: str) -> bool:
    """True when ``intro2llm._C`` registered ``intro2llm::<op>`` for ``device_type`` ("cpu" or "cuda")."""
    if extension_error() is not None:
        return False
    key = "CUDA" if device_type == "cuda" else "CPU"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"intro2llm::{op}", key)
    except RuntimeError:  # the schema itself is missing: an _C built from older sources
        return False


def _why_not(
    op: str, backend: str, device: torch.device, implemented: Sequence[str], compiled_op: str | None
) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``, else the reason."""
    if backend not in implemented:
        return f"{op} has no {backend!r} implementation (it has: {', '.join(implemented)})"
    if backend == "reference":
        return None
    if backend == "triton":
        err = _triton_installed()
        if err:
            return err
        if device.type == "cpu" and not triton_interpret():
            return "Triton needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is imported for CPU tensors"
        if device.type not in ("cpu", "cuda"):
            return f"Triton cannot run on device {device}"
        return None
    if backend in ("cpp", "cuda"):
        want = "cpu" if backend == "cpp" else "cuda"
        if device.type != want:
            return f"backend {backend!r} runs on {want} tensors, got tensors on {device}"
        err = extension_error()
        if err:
            return err
        if compiled_op is not None and not has_compiled_kernel(compiled_op, want):
            return f"intro2llm._C has no {want.upper()} kernel for intro2llm::{compiled_op} (rebuild the extension)"
        return None
    return f"unknown backend {backend!r}"


def resolve_backend(
    op: str,
    device: torch.device,
    backend: str | None = None,
    *,
    implemented: Sequence[str] = BACKENDS,
    compiled_op: str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """The backend that runs this call of ``op`` on tensors on ``device``.

    ``implemented`` lists the backends the op has; ``compiled_op`` names the ``intro2llm::`` op whose
    registration proves the cpp/cuda kernel was built. Raises ``BackendUnavailableError`` for an explicit choice
    that cannot run; auto falls back silently. ``dtype`` (the input's): outside ``FAST_DTYPES`` (float64, say)
    only the reference runs — a fast backend named by the ``backend`` argument raises ``TypeError``, one chosen
    by context, environment or auto falls back to the reference.
    """
    requested = backend or (_stack[-1] if _stack else None) or os.environ.get(_ENV_VAR) or "auto"
    _check_name(requested)
    if requested != "auto":
        why = _why_not(op, requested, device, implemented, compiled_op)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend {requested!r} cannot run: {why}")
        if requested != "reference" and dtype is not None and dtype not in FAST_DTYPES:
            if backend is not None:
                allowed = ", ".join(str(d).replace("torch.", "") for d in FAST_DTYPES)
                raise TypeError(f"{op}: backend {requested!r} supports dtypes ({allowed}), got {dtype}")
            return "reference"
        return requested
    if dtype is not None and dtype not in FAST_DTYPES:
        return "reference"
    order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpp", "reference")
    for name in order:
        if _why_not(op, name, device, implemented, compiled_op) is None:
            return name
    return "reference"
