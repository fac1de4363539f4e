"""Backend resolution and kernel registration for ``intro2llm.ops``: the one template every op follows.

Backends: ``"reference"`` (PyTorch eager, always there), ``"triton"`` (``kernels/``), ``"cpp"``
(``intro2llm._C`` on CPU tensors), ``"cuda"`` (``intro2llm._C`` on CUDA tensors).

First match wins: the call's ``backend=`` argument > ``with use_backend(name):`` > env ``INTRO2LLM_BACKEND`` >
auto. Auto picks, for CUDA tensors, triton, else cuda, else reference; for CPU tensors, cpp if built, else
reference. Auto never raises; an explicit choice that cannot run raises ``BackendUnavailableError`` naming what
is missing. Resolution happens in Python before autograd records anything, so each backend's autograd formula
is the one that runs.

How to add an op (worked example: ``rms_norm.py``, read it alongside)
-------------------------------------------------------------------
One module ``intro2llm/ops/<op>.py``, in this order:

1. ``<op>_reference(...)``: the lesson's math in eager PyTorch (fp32 statistics, float64 accepted). It is the
   test oracle and the fallback, so it handles every input the public op accepts.
2. ``_validate(...)``: shapes, dtypes (``_checks.check_float``, which allows ``REFERENCE_DTYPES``) and devices,
   raising ``TypeError``/``ValueError`` that name the argument and its shape before any kernel runs.
3. ``OP = _dispatch.Op("<op>", backends=(...), compiled="<op>_fwd")``: the backends the op has, the
   ``intro2llm::`` forward whose registration proves the C++/CUDA kernels are built, and (``dtypes=``) what
   the fast backends compute in (default ``FAST_DTYPES``; anything else runs on the reference).
4. The kernels as differentiable torch ops, with one fake (shape) function per kernel and one ``backward`` /
   ``setup_context`` shared by every backend: ``register_kernels("<op>_fwd", "<op>_bwd", ...)`` for the C++/CUDA
   pair of ``intro2llm._C`` (declared by one schema line in ``csrc/ops.cpp``; a stale or missing extension
   registers nothing, and ``OP.resolve`` then says "rebuild"), and the same call with the two
   ``torch.library.custom_op`` wrappers of the Triton kernels (imported lazily: triton is optional).
5. The public ``<op>(..., *, backend=None)``: validate, ``name = OP.resolve(x.device, backend, dtype=x.dtype)``,
   call the reference or the chosen backend's forward. Shape limits of the fast kernels (flash attention's head
   dims) go in ``problem=``: auto then falls back to the reference, an explicit backend raises ``ValueError``.

Then: export it in ``ops/__init__.py``, a test ``tests/test_<op>.py`` (reference vs PyTorch/the well-known
implementation, every available backend vs the reference incl. gradients, ``torch.library.opcheck``, error
messages) and a benchmark ``benchmarks/bench_<op>.py``. Nothing else changes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "triton", "cpp", "cuda")
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the fast backends compute in (default)
REFERENCE_DTYPES = FAST_DTYPES + (torch.float64,)  # what the references (and so every public op) accept
_ENV_VAR = "INTRO2LLM_BACKEND"
_stack: list[str] = []  # use_backend() nesting


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call (not built, not installed, wrong device)."""


@functools.cache
def _extension() -> tuple[object | None, str | None]:
    """Load ``intro2llm._C`` once: (module, None) or (None, why it is missing and what fixes it).

    ``intro2llm._ext.state()`` picks the build made for the running torch: the installed one, or one it compiles
    into the per-user cache on first use (loading either registers ``torch.ops.intro2llm.*``)."""
    from intro2llm import _ext

    st = _ext.state()
    if st.module is not None:
        return st.module, None
    return None, f"the compiled extension intro2llm._C is missing: {st.error}" + (f" (fix: {st.fix})" if st.fix else "")


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
    dtypes: Sequence[torch.dtype] = FAST_DTYPES,
    problem: str | None = None,
) -> str:
    """The backend that runs this call of ``op`` on tensors on ``device`` (ops call it through ``Op.resolve``).

    ``implemented`` lists the backends the op has; ``compiled_op`` names the ``intro2llm::`` op whose
    registration proves the cpp/cuda kernel was built. Raises ``BackendUnavailableError`` for an explicit choice
    that cannot run; auto falls back silently. ``dtype`` (the input's): outside ``dtypes`` (float64, say) only
    the reference runs, and ``problem`` (why the fast kernels cannot take this call's shapes) does the same — a
    fast backend named by the ``backend`` argument raises ``TypeError`` (dtype) or ``ValueError`` (problem), one
    chosen by context, environment or auto falls back to the reference.
    """
    requested = backend or (_stack[-1] if _stack else None) or os.environ.get(_ENV_VAR) or "auto"
    _check_name(requested)
    if dtype is not None and dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        problem, error = f"supports dtypes ({allowed}), got {dtype}", TypeError
    else:
        error = ValueError
    if requested != "auto":
        why = _why_not(op, requested, device, implemented, compiled_op)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend {requested!r} cannot run: {why}")
        if requested != "reference" and problem is not None:
            if backend is not None:
                raise error(f"{op}: backend {requested!r} {problem}")
            return "reference"
        return requested
    if problem is not None:
        return "reference"
    order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpp", "reference")
    for name in order:
        if _why_not(op, name, device, implemented, compiled_op) is None:
            return name
    return "reference"


@dataclass(frozen=True)
class Op:
    """What an op declares once: its name (in messages), the backends it has, the ``intro2llm::`` forward that
    proves its C++/CUDA kernels are built, and the dtypes its fast backends compute in."""

    name: str
    backends: tuple[str, ...] = BACKENDS
    compiled: str | None = None
    dtypes: tuple[torch.dtype, ...] = FAST_DTYPES

    def __str__(self) -> str:  # f"{OP}: ..." in error messages
        return self.name

    def resolve(
        self, device: torch.device, backend: str | None = None, *, dtype: torch.dtype | None = None,
        problem: str | None = None,
    ) -> str:
        """The backend for this call (see ``resolve_backend``); ``problem``: why the fast kernels cannot take it."""
        return resolve_backend(
            self.name, device, backend, implemented=self.backends, compiled_op=self.compiled, dtype=dtype,
            dtypes=self.dtypes, problem=problem,
        )  # fmt: skip


def extension_op(name: str) -> Callable:
    """``torch.ops.intro2llm.<name>``, looked up at call time (importing an op never needs the extension)."""
    return lambda *args: getattr(torch.ops.intro2llm, name)(*args)


def register_kernels(
    fwd: str | Callable,
    bwd: str | Callable | None,
    *,
    fake_fwd: Callable,
    fake_bwd: Callable | None,
    backward: Callable,
    setup_context: Callable,
    extra_fakes: dict[str, Callable] | None = None,
) -> bool:
    """Make one backend's forward/backward kernel pair a differentiable torch op (``torch.compile`` and
    ``torch.library.opcheck`` see a real op): the fake (shape) function of each, and the autograd formula of
    ``fwd``, ``backward(bwd, ctx, *grads)``, which gets the backend's backward kernel first so that one function
    serves every backend (``setup_context(ctx, inputs, output)`` saves what it needs).

    ``fwd``/``bwd``: the names of two ``intro2llm._C`` ops ("rms_norm_fwd"; C++ and CUDA share them) or two
    ``torch.library.custom_op`` functions (Triton); ``bwd=None`` (with ``fake_bwd=None``) for a forward whose
    backward needs no kernel of its own (``backward`` then gets None first). ``extra_fakes``: fakes of further
    ``_C`` ops of the op (name -> fake). Returns False, registering nothing, when the loaded extension lacks a
    named op (not built, or built from older sources: ``resolve`` then reports "rebuild" for cpp/cuda and auto
    uses the reference).
    """
    if isinstance(fwd, str):
        names = [fwd, bwd, *(extra_fakes or {})]
        if not all(has_compiled_kernel(n, "cpu") for n in names):
            return False
        for name, fake in (extra_fakes or {}).items():
            torch.library.register_fake(f"intro2llm::{name}")(fake)
        fwd, bwd_kernel, bwd = f"intro2llm::{fwd}", extension_op(bwd), f"intro2llm::{bwd}"
    else:
        bwd_kernel = bwd
    torch.library.register_fake(fwd)(fake_fwd)
    if bwd is not None:
        torch.library.register_fake(bwd)(fake_bwd)
    torch.library.register_autograd(fwd, functools.partial(backward, bwd_kernel), setup_context=setup_context)
    return True
