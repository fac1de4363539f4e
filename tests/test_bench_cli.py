"""``intro2llm bench --quick``: times every runnable backend against eager, prints ratios, writes JSON + a PNG."""

from __future__ import annotations

import json
import sys

import pytest

from intro2llm.bench_cli import OPS, _case
from intro2llm.cli import main


def test_quick_bench_writes_ratios_json_and_chart(tmp_path, capsys):
    from intro2llm.ops import available_backends

    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--repeats", "1", "--ops", "rms_norm,swiglu,cross_entropy",
                 "--device", "cpu", "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    data = json.loads((out / "bench.json").read_text())
    runnable = [b for b in ("cpp",) if b in available_backends()]  # on CPU tensors only C++ runs without flags
    assert {r["backend"] for r in data["rows"]} == set(runnable)
    assert len(data["rows"]) == 3 * 2 * len(runnable)  # 3 ops x (fwd, full) x backends
    for r in data["rows"]:
        assert r["speedup"] == pytest.approx(r["eager_ms"] / r["backend_ms"])
        assert r["eager_ms"] > 0 and r["backend_ms"] > 0
        assert f"{r['speedup']:.2f}x" in stdout
    assert "triton skipped" in stderr  # what cannot run here is said, not silently left out
    if runnable:
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "only the reference is available" in stderr
    assert data["meta"]["device"].startswith("CPU") and data["meta"]["dtype"] == "float32"


@pytest.mark.parametrize("name", OPS)
def test_every_case_backend_matches_eager(name):
    """The benchmark compares like with like: each backend's output equals the eager reference's on its inputs."""
    import torch

    from intro2llm.ops import available_backends

    case = _case(name, torch.device("cpu"), torch.float32, quick=True)
    want = case["eager"](*case["inputs"])
    for b in [b for b in case["op"].backends if b in available_backends() and b in ("cpp", "reference")]:
        got = case["fast"](*case["inputs"], b)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-4)


def test_bad_input_and_missing_matplotlib(tmp_path, capsys, monkeypatch):
    assert main(["bench", "--ops", "rms_norm,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "rms_norm" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["bench", "--quick", "--ops", "rms_norm", "--out", str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert main(["bench", "--quick", "--repeats", "1", "--ops", "rms_norm", "--device", "cpu", "--no-plot",
                 "--out", str(tmp_path / "np")]) == 0
    assert (tmp_path / "np" / "bench.json").exists() and not (tmp_path / "np" / "bench.png").exists()
