"""``intro2llm._ext``: which ``_C`` a process loads, and when it compiles one for the running torch.

Fast: a fake torch, a fake package directory, a fake compiler (writes a file) and a fake importer stand in for the
real ones, so these tests check the decisions (provenance, torch mismatch, corrupt cache, remembered failures,
missing toolchain, one warning) in milliseconds. The real end-to-end path (a fresh venv, plain ``pip install .``,
the C++ backend in use) runs in ``.ci/run``.
"""

import json
import warnings
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import SimpleNamespace

import pytest

from intro2llm import _ext


def fake_torch(version="2.13.0+cpu", cuda=None, gpu=False):
    version_info = SimpleNamespace(cuda=cuda, hip=None)
    return SimpleNamespace(__version__=version, version=version_info, cuda=SimpleNamespace(is_available=lambda: gpu))


class Harness:
    """A package dir with csrc/ beside it, a cache, a compiler that writes ``_C.so`` and an importer that records."""

    def __init__(self, tmp_path: Path, torch=None):
        self.pkg = tmp_path / "intro2llm"
        self.pkg.mkdir()
        (tmp_path / "csrc" / "cpu").mkdir(parents=True)
        (tmp_path / "csrc" / "ops.cpp").write_text("// schemas\n")
        (tmp_path / "csrc" / "cpu" / "rms_norm.cpp").write_text("// kernel\n")
        self.csrc = tmp_path / "csrc"
        self.cache = tmp_path / "cache"
        self.torch = torch or fake_torch()
        self.builds: list[tuple[Path, bool]] = []
        self.imports: list[Path] = []
        self.bad_imports: set[Path] = set()
        self.fail_build: str | None = None
        self.logs: list[str] = []
        self.toolchain_problem = None

    def builder(self, cdir, csrc, with_cuda):
        self.builds.append((cdir, with_cuda))
        if self.fail_build and (with_cuda or self.fail_build != "cuda-only"):
            raise _ext.BuildFailed("rms_norm.cpp:1:1: error: boom", "compiler log\nrms_norm.cpp:1:1: error: boom\n")
        so = cdir / "_C.so"
        so.write_bytes(b"\x7fELF fake build %d" % len(self.builds))
        return so

    def importer(self, path):
        self.imports.append(Path(path))
        if Path(path) in self.bad_imports:
            raise ImportError(f"{path}: invalid ELF header")
        return SimpleNamespace(__file__=str(path))

    def resolve(self, build="auto"):
        return _ext.resolve(build=build, pkg_dir=self.pkg, cache=self.cache, torch_mod=self.torch,
                            importer=self.importer, builder=self.builder, toolchain=lambda: self.toolchain_problem,
                            log=self.logs.append)

    def install(self, **record):
        """A package build (``_C.so`` + its record), as setup.py leaves it."""
        so = self.pkg / f"_C{EXTENSION_SUFFIXES[0]}"
        so.write_bytes(b"\x7fELF package build")
        rec = dict(_ext.identity(self.torch), status="ok", source_hash=_ext.source_hash(self.csrc), cuda=False)
        rec.update(record)
        _ext.write_record(self.pkg / _ext.RECORD, rec)
        return so


@pytest.fixture
def h(tmp_path, monkeypatch):
    for var in ("INTRO2LLM_NO_EXT", "INTRO2LLM_NO_JIT", "INTRO2LLM_NO_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    return Harness(tmp_path)


def test_matching_record_loads_the_package_build(h):
    so = h.install()
    st = h.resolve()
    assert st.module is not None and st.origin == "package" and st.path == str(so)
    assert h.imports == [so] and h.builds == []


def test_torch_mismatch_builds_for_the_running_torch_into_the_cache(h):
    so = h.install(torch="2.15.0", flavour="cu130")
    st = h.resolve()
    assert st.origin == "cache" and st.module is not None
    assert "2.15.0 (cu130" in st.why and "2.13.0+cpu (cpu" in st.why
    assert so not in h.imports, "a _C built for another torch must never be imported"
    (cdir, with_cuda), = h.builds
    assert cdir.parent == h.cache and not with_cuda
    assert cdir.name.startswith("2.13.0+cpu-cpu-") and cdir.name.endswith(_ext.source_hash(h.csrc))
    rec = json.loads((cdir / _ext.RECORD).read_text())
    assert rec["status"] == "ok" and rec["torch"] == "2.13.0+cpu" and rec["sha256"] == _ext.file_sha256(cdir / "_C.so")
    assert any("compiling the C++ kernels for torch 2.13.0+cpu" in line for line in h.logs)
    # the next process finds the cached build and compiles nothing
    st2 = h.resolve()
    assert st2.origin == "cache" and len(h.builds) == 1 and h.imports[-1] == cdir / "_C.so"


def test_missing_or_unloadable_package_build_falls_back_to_the_cache(h):
    st = h.resolve()  # nothing installed (the source tree after a non-editable install, say)
    assert st.origin == "cache" and "no compiled _C next to the package" in st.why and len(h.builds) == 1
    so = h.install()
    h.bad_imports.add(so)
    st = h.resolve()
    assert st.origin == "cache" and "does not load" in st.why and "invalid ELF header" in st.why


@pytest.mark.parametrize("damage", ["truncate", "garbage_record", "unloadable", "no_record"])
def test_corrupt_cached_build_is_detected_and_rebuilt(h, damage):
    h.install(torch="2.15.0")
    first = h.resolve()
    cdir = Path(first.path).parent
    so = cdir / "_C.so"
    if damage == "truncate":
        so.write_bytes(so.read_bytes()[:5])
    elif damage == "garbage_record":
        (cdir / _ext.RECORD).write_text("{not json")
    elif damage == "unloadable":  # intact bytes, but it does not load: the first import fails, the rebuilt one loads
        h.bad_imports.add(so)
        build = h.builder
        h.builder = lambda *args: (h.bad_imports.clear(), build(*args))[1]
    else:
        (cdir / _ext.RECORD).unlink()  # killed between linking and recording
    st = h.resolve()
    assert len(h.builds) == 2, f"{damage}: the damaged cache must be rebuilt"
    assert st.origin == "cache" and st.module is not None
    assert any("unusable" in line and "removed" in line for line in h.logs), h.logs
    rec = json.loads((cdir / _ext.RECORD).read_text())
    assert rec["status"] == "ok" and rec["sha256"] == _ext.file_sha256(so)


def test_failed_build_is_reported_once_and_not_retried_until_asked(h):
    h.fail_build = "all"
    st = h.resolve()
    assert st.module is None and "error: boom" in st.error and "intro2llm build-ext" in st.fix
    assert Path(st.log).read_text().startswith("compiler log")
    st2 = h.resolve()  # the next process: remembers, does not spend minutes failing again
    assert st2.module is None and "failed earlier" in st2.error and len(h.builds) == 1
    h.fail_build = None
    st3 = h.resolve(build="force")  # intro2llm build-ext
    assert st3.module is not None and st3.origin == "cache" and len(h.builds) == 2


def test_cuda_part_failing_falls_back_to_the_cpp_kernels(h, monkeypatch):
    monkeypatch.setattr(_ext, "_want_cuda", lambda torch: (True, None))
    h.fail_build = "cuda-only"
    st = h.resolve()
    assert st.module is not None and st.cuda is False
    assert [w for _, w in h.builds] == [True, False]
    assert "CUDA kernels do not compile" in st.record["cuda_note"]


def test_missing_toolchain_names_the_fixing_command(h):
    h.toolchain_problem = ("no C++ compiler ('c++' is not on PATH)", "install one (apt install g++), then run: x")
    st = h.resolve()
    assert st.module is None and "no C++ compiler" in st.error and st.fix.endswith("then run: x")
    assert h.builds == []


def test_install_failure_with_the_same_torch_is_not_recompiled_automatically(h):
    rec = dict(_ext.identity(h.torch), status="failed", kind="compile", error="x.cpp:3: error: nope")
    _ext.write_record(h.pkg / _ext.RECORD, rec)
    st = h.resolve()
    assert st.module is None and "building _C at install failed: x.cpp:3: error: nope" in st.error
    assert h.builds == [] and "build-ext" in st.fix
    # a failure for lack of a compiler (kind "setup"), or under another torch, is worth one compile at first use
    _ext.write_record(h.pkg / _ext.RECORD, dict(rec, torch="2.15.0"))
    assert h.resolve().origin == "cache" and len(h.builds) == 1


def test_no_jit_and_no_ext_switches(h, monkeypatch):
    monkeypatch.setenv("INTRO2LLM_NO_JIT", "1")
    st = h.resolve()
    assert st.module is None and st.fix == "intro2llm build-ext" and h.builds == []
    monkeypatch.setenv("INTRO2LLM_NO_EXT", "1")
    h.install()
    st = h.resolve()
    assert st.module is None and "INTRO2LLM_NO_EXT=1" in st.error and h.imports == []


def test_sources_are_globbed_and_the_hash_covers_all_of_csrc(h):
    before = _ext.source_hash(h.csrc)
    (h.csrc / "cpu" / "new_op").mkdir()
    (h.csrc / "cpu" / "new_op" / "k.cpp").write_text("//")
    (h.csrc / "cuda").mkdir()
    (h.csrc / "cuda" / "k.cu").write_text("//")
    (h.csrc / "cuda" / "k_binding.cpp").write_text("//")
    names = [Path(p).relative_to(h.csrc).as_posix() for p in _ext.sources(h.csrc, with_cuda=False)]
    assert names == ["ops.cpp", "cpu/new_op/k.cpp", "cpu/rms_norm.cpp"]
    assert len(_ext.sources(h.csrc, with_cuda=True)) == 5
    after = _ext.source_hash(h.csrc)
    (h.csrc / "cuda" / "common.cuh").write_text("// a header only")
    assert len({before, after, _ext.source_hash(h.csrc)}) == 3


def test_default_cuda_arch_list_without_a_gpu():
    torch_arches = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    nvcc = ["compute_75", "compute_80", "compute_86", "compute_90", "compute_100"]
    assert _ext.default_cuda_arch_list(torch_arches, nvcc) == "7.5;8.0;8.6;9.0;10.0+PTX"
    assert _ext.default_cuda_arch_list(torch_arches, None).endswith("12.0+PTX")
    assert _ext.default_cuda_arch_list(["sm_50"], ["compute_75"]) is None


def test_torch_flavour():
    assert _ext.torch_flavour(fake_torch()) == "cpu"
    assert _ext.torch_flavour(fake_torch("2.15.0", cuda="13.0")) == "cu130"


def test_a_missing_extension_warns_once_per_process(monkeypatch):
    missing = _ext.ExtState(None, "missing", error="no C++ compiler", fix="apt install g++")
    calls = []
    monkeypatch.setattr(_ext, "resolve", lambda build="auto": calls.append(build) or missing)
    monkeypatch.setattr(_ext, "_STATE", None)
    monkeypatch.delenv("INTRO2LLM_NO_EXT", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            assert _ext.state() is missing
    msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0] and "apt install g++" in msgs[0]
    assert calls == ["auto"]


def test_info_reports_where_the_extension_came_from(capsys):
    from intro2llm.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    st = _ext.state()
    assert f"extension intro2llm._C: {st.origin}" in out
    assert (st.path in out) if st.module is not None else (st.fix in out)
