"""Backend selection: argument > use_backend() > INTRO2LLM_BACKEND > auto; clear errors; the CLI's info."""

import subprocess
import sys

import pytest
import torch

import intro2llm.ops as ops
from intro2llm.ops import _dispatch
from intro2llm.ops._dispatch import BackendUnavailableError, resolve_backend

CPU = torch.device("cpu")


def test_reference_always_available():
    assert "reference" in ops.available_backends()
    assert ops.backend_status()["reference"] is None


def test_status_gives_reasons_for_missing_backends():
    for name, why in ops.backend_status().items():
        assert name in _dispatch.BACKENDS
        assert why is None or (isinstance(why, str) and len(why) > 10)
    if not torch.version.cuda:
        assert "CPU-only" in ops.backend_status()["cuda"]


def test_priority_order(monkeypatch):
    monkeypatch.setenv("INTRO2LLM_BACKEND", "reference")
    assert resolve_backend("rms_norm", CPU) == "reference"
    with ops.use_backend("triton"):
        assert resolve_backend("rms_norm", CPU) == "triton"  # context beats env
        assert resolve_backend("rms_norm", CPU, "reference") == "reference"  # argument beats context
        with ops.use_backend("reference"):
            assert resolve_backend("rms_norm", CPU) == "reference"  # innermost context wins
        assert resolve_backend("rms_norm", CPU) == "triton"


def test_auto_prefers_cpp_on_cpu_when_built(monkeypatch):
    monkeypatch.delenv("INTRO2LLM_BACKEND", raising=False)
    want = "cpp" if _dispatch.extension_error() is None else "reference"
    assert resolve_backend("rms_norm", CPU, compiled_op="rms_norm_fwd") == want
    # an op without a cpp implementation falls back silently
    assert resolve_backend("x", CPU, implemented=("reference", "triton")) == "reference"


def test_explicit_choice_that_cannot_run_raises():
    with pytest.raises(BackendUnavailableError, match="has no 'cpp' implementation"):
        resolve_backend("x", CPU, "cpp", implemented=("reference", "triton"))
    with pytest.raises(BackendUnavailableError, match="runs on cuda tensors"):
        resolve_backend("rms_norm", CPU, "cuda")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        resolve_backend("rms_norm", CPU, "fast")
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("nope"):
            pass


def test_env_var_drives_ops(monkeypatch):
    monkeypatch.setenv("INTRO2LLM_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError):
            ops.rms_norm(torch.randn(2, 4), torch.ones(4))


def test_cli_info_lists_backends():
    out = subprocess.run(
        [sys.executable, "-m", "intro2llm", "info"], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "reference  available" in out.stdout
    assert "triton     available" in out.stdout
    if _dispatch.extension_error() is None:
        assert "cpp        available" in out.stdout
    assert "cuda" in out.stdout


def test_dtype_outside_fast_paths(monkeypatch):
    # float64 runs only on the reference: an explicit fast backend raises, context/env/auto fall back
    monkeypatch.delenv("INTRO2LLM_BACKEND", raising=False)
    assert resolve_backend("x", CPU, dtype=torch.float64) == "reference"
    assert resolve_backend("x", CPU, "reference", dtype=torch.float64) == "reference"
    with ops.use_backend("triton"):
        assert resolve_backend("x", CPU, dtype=torch.float64) == "reference"
    with pytest.raises(TypeError, match=r"'triton' supports dtypes \(float32, float16, bfloat16\), got torch.float64"):
        resolve_backend("x", CPU, "triton", dtype=torch.float64)
