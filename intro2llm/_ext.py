"""Where ``intro2llm._C`` comes from: the build ``pip install`` made, or a build for the running torch.

A compiled torch extension only works with the torch it was compiled against. ``setup.py`` writes, next to the
``_C`` it builds, ``_C.build.json``: torch version, flavour (``cpu``, ``cu130``, ``rocm6.2``), Python tag, a hash
of every file under ``csrc/``, whether the CUDA kernels are in, or why the build failed. ``state()`` (called once,
by ``intro2llm.ops._dispatch._extension``) reads that record *before* importing anything:

1. the package's ``_C`` when its record matches the running torch (or, for builds older than the record, when
   it imports);
2. otherwise a build for the running torch in the per-user cache,
   ``~/.cache/intro2llm/ext/<torch>-<flavour>-<python>-<source hash>/`` (``INTRO2LLM_EXT_CACHE`` moves it),
   checked against its own record (SHA-256 of the ``.so``; a corrupt one is rebuilt);
3. otherwise it builds one there with ``torch.utils.cpp_extension.load`` (ninja), printing one line and a
   progress bar, from the sources shipped in the wheel (``intro2llm/_csrc``) or the source tree's ``csrc/``; the
   result registers the same ``torch.ops.intro2llm.*`` ops and is installed as ``sys.modules["intro2llm._C"]``;
4. when that cannot work (no compiler, no ninja, no sources, an earlier failed build) the extension is missing:
   one warning says why and the exact command that fixes it, and the ops run on the reference/Triton paths.

``intro2llm build-ext`` runs step 3 on demand; ``intro2llm info`` prints ``state()``. Environment:
``INTRO2LLM_NO_EXT=1`` (never load it), ``INTRO2LLM_NO_JIT=1`` (never compile at import: say what to run instead),
``INTRO2LLM_NO_CUDA=1``, ``INTRO2LLM_EXT_CACHE`` (the cache directory).

This module imports neither torch nor the rest of intro2llm at import time: ``setup.py`` loads it by path to share
the build recipe (sources, flags, CUDA architectures, the record's format).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

RECORD = "_C.build.json"  # next to the package's _C, and in every cache directory
RECIPE_VERSION = 1  # bump when the flags below change: it is part of the source hash, so caches rebuild
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
NVCC_FLAGS = ["-O3", "--use_fast_math"]
LD_FLAGS = ["-fopenmp"]
PKG_DIR = Path(__file__).resolve().parent
BUILD_EXT_CMD = "intro2llm build-ext"
RETRY = f"{BUILD_EXT_CMD}  (retries, and shows the compiler's errors)"


# ---- the build recipe (shared with setup.py) ------------------------------------------------------------------
def cxx_flags() -> list[str]:
    return CXX_FLAGS + (["-march=native"] if os.environ.get("INTRO2LLM_NATIVE", "0") == "1" else [])


def source_dir(pkg_dir: Path = PKG_DIR) -> Path | None:
    """The C++ sources: shipped in the wheel (``intro2llm/_csrc``) or the source tree's ``csrc/``; None if neither."""
    for cand in (pkg_dir / "_csrc", pkg_dir.parent / "csrc"):
        if (cand / "cpu").is_dir():
            return cand
    return None


def sources(csrc: Path, with_cuda: bool) -> list[str]:
    """Every translation unit, globbed: ``csrc/*.cpp``, ``csrc/cpu/**/*.cpp``, with CUDA ``csrc/cuda/**/*.{cu,cpp}``."""
    found = sorted(glob.glob(str(csrc / "*.cpp")))
    found += sorted(glob.glob(str(csrc / "cpu" / "**" / "*.cpp"), recursive=True))
    if with_cuda:
        for pattern in ("*.cu", "*.cpp"):
            found += sorted(glob.glob(str(csrc / "cuda" / "**" / pattern), recursive=True))
    return found


def source_hash(csrc: Path) -> str:
    """16 hex digits over every file under ``csrc`` (path and bytes) and the recipe: any edit changes it."""
    h = hashlib.sha256(f"recipe {RECIPE_VERSION} {CXX_FLAGS} {NVCC_FLAGS} {LD_FLAGS}\n".encode())
    for path in sorted(p for p in csrc.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        if path.suffix in (".o", ".so", ".pyc"):
            continue
        h.update(path.relative_to(csrc).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def torch_flavour(torch) -> str:
    """``cpu``, ``cu130`` (CUDA 13.0) or ``rocm6.2``: what the torch build links against."""
    if getattr(torch.version, "hip", None):
        return "rocm" + ".".join(str(torch.version.hip).split(".")[:2])
    if torch.version.cuda:
        return "cu" + str(torch.version.cuda).replace(".", "")
    return "cpu"


def identity(torch) -> dict:
    """What a build must match to be loaded: torch version, flavour, Python ABI."""
    return {"torch": torch.__version__, "flavour": torch_flavour(torch), "python": sys.implementation.cache_tag}


def default_cuda_arch_list(torch_arches: list[str], nvcc_arches: list[str] | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST for a machine without a GPU: the architectures torch itself ships (``sm_XY``) that nvcc
    can target, newest + PTX (so newer GPUs JIT it). ``nvcc_arches``: ``nvcc --list-gpu-arch`` (``compute_XY``),
    None when unknown. None when nothing is left."""
    caps = sorted({int(a.split("_")[1]) for a in torch_arches if a.startswith("sm_") and a.split("_")[1].isdigit()})
    if nvcc_arches is not None:
        ok = {int(a.split("_")[1]) for a in nvcc_arches if a.startswith("compute_") and a.split("_")[1].isdigit()}
        caps = [c for c in caps if c in ok]
    if not caps:
        return None
    names = [f"{c // 10}.{c % 10}" for c in caps]
    names[-1] += "+PTX"
    return ";".join(names)


def nvcc_arches(cuda_home: str | None) -> list[str] | None:
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError, TypeError):
        return None
    return out.stdout.split()


def ensure_cuda_arch_list(torch, cuda_home: str | None) -> str | None:
    """Without a visible GPU torch cannot guess the architectures (it fails with IndexError): set a default.
    Returns a note saying what was chosen, or None when nothing was changed."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return None
    arches = default_cuda_arch_list(torch.cuda.get_arch_list(), nvcc_arches(cuda_home))
    if arches is None:
        return None
    os.environ["TORCH_CUDA_ARCH_LIST"] = arches
    return f"no GPU visible: CUDA kernels built for TORCH_CUDA_ARCH_LIST={arches}"


def cuda_headers_problem() -> str | None:
    """None when torch's CUDA headers (``ATen/cuda/CUDAContext.h``, which the CUDA bindings include) compile here,
    else the compiler's first error (a toolkit without cuBLAS headers, say). Seconds, instead of a failed CUDA build
    that would first spend minutes on every ``.cu`` file."""
    import tempfile

    from torch.utils import cpp_extension

    try:
        incs = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        incs = cpp_extension.include_paths(cuda=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("#include <ATen/cuda/CUDAContext.h>\nint main() { return 0; }\n")
        cmd = [os.environ.get("CXX", "c++"), "-std=c++17", "-fsyntax-only", *[f"-I{p}" for p in incs], str(src)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot run the C++ compiler ({exc})"
    return None if out.returncode == 0 else first_error_line(out.stderr + out.stdout)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_record(path: Path, record: dict) -> None:
    """Atomically write a build record (JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_record(path: Path) -> dict | None:
    """The record, None when absent, ``{"status": "corrupt", "error": ...}`` when unreadable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"status": "corrupt", "error": f"{path} cannot be read ({exc})"}
    try:
        rec = json.loads(text)
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        return rec
    except ValueError as exc:
        return {"status": "corrupt", "error": f"{path} is not valid JSON ({exc})"}


def first_error_line(output: str) -> str:
    """The line a human wants from a compiler log: the first ``error``, else the last non-empty line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if "error:" in low or "fatal error" in low or "no such file" in low or "not found" in low:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def describe(rec: dict) -> str:
    return f"torch {rec.get('torch', '?')} ({rec.get('flavour', '?')}, {rec.get('python', '?')})"


# ---- runtime: which _C to load ---------------------------------------------------------------------------------
@dataclass
class ExtState:
    """What ``state()`` found. ``origin``: ``package`` (built by pip/setup.py), ``cache`` (built for this torch in
    the per-user cache) or ``missing``; ``why``: how it came to be that one; ``fix``: the command that helps."""

    module: object | None
    origin: str
    path: str | None = None
    why: str = ""
    error: str | None = None  # why the extension is missing (None when loaded)
    fix: str | None = None
    cuda: bool | None = None  # whether the loaded build has the CUDA kernels (None: unknown)
    log: str | None = None  # the compiler's log of a failed build
    record: dict = field(default_factory=dict)

    def summary(self) -> str:
        if self.module is None:
            return f"missing: {self.error}" + (f"; fix: {self.fix}" if self.fix else "")
        where = {"package": "built at install", "cache": "built for this torch in the cache"}.get(self.origin, "")
        cuda = {True: "with CUDA kernels", False: "C++ kernels only", None: "CUDA kernels unknown"}[self.cuda]
        return f"{self.origin} ({where}, {cuda}): {self.path}" + (f"; {self.why}" if self.why else "")


def cache_root() -> Path:
    env = os.environ.get("INTRO2LLM_EXT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "intro2llm" / "ext"


def package_so(pkg_dir: Path) -> Path | None:
    from importlib.machinery import EXTENSION_SUFFIXES

    for suffix in EXTENSION_SUFFIXES:
        if (pkg_dir / f"_C{suffix}").is_file():
            return pkg_dir / f"_C{suffix}"
    return None


def import_so(path: Path) -> object:
    """Import ``path`` as ``intro2llm._C`` (loading it registers ``torch.ops.intro2llm.*``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("intro2llm._C", str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["intro2llm._C"] = module
    pkg = sys.modules.get("intro2llm")
    if pkg is not None:
        pkg._C = module
    return module


def toolchain_problem(with_cuda: bool = False) -> tuple[str, str] | None:
    """(what is missing, the command that fixes it) when ``torch.utils.cpp_extension.load`` cannot work here."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH)", (
            f"install one (Debian/Ubuntu: apt install g++), then run: {BUILD_EXT_CMD}"
        )
    try:
        from torch.utils.cpp_extension import is_ninja_available

        ninja_ok = is_ninja_available()
    except ImportError:
        ninja_ok = shutil.which("ninja") is not None
    if not ninja_ok:
        return "ninja is not installed", f"pip install ninja && {BUILD_EXT_CMD}"
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return f"the Python headers are missing ({include}/Python.h)", (
            f"install them (Debian/Ubuntu: apt install python3-dev), then run: {BUILD_EXT_CMD}"
        )
    return None


class BuildFailed(RuntimeError):
    """``torch.utils.cpp_extension.load`` failed; ``output`` holds the compiler's log."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


def _progress(build_dir: Path, total: int, stop: threading.Event, t0: float) -> None:
    """A tqdm bar counting object files ninja has written (the build's progress)."""
    from tqdm import tqdm

    with tqdm(total=total, desc="intro2llm: compiling", unit="file", file=sys.stderr, leave=True) as bar:
        while True:
            done = min(total, sum(1 for p in build_dir.glob("*.o") if p.stat().st_mtime >= t0))
            if done > bar.n:
                bar.update(done - bar.n)
            if stop.wait(0.5):
                break


def jit_build(build_dir: Path, csrc: Path, with_cuda: bool, show_progress: bool = True) -> Path:
    """Compile ``_C`` for the running torch into ``build_dir`` with ``torch.utils.cpp_extension.load`` (ninja).
    Returns the ``.so`` path; raises ``BuildFailed`` with the compiler's output."""
    from torch.utils import cpp_extension

    srcs = sources(csrc, with_cuda)
    objects = [os.path.splitext(os.path.basename(s))[0] + (".cuda" if s.endswith(".cu") else "") for s in srcs]
    clash = sorted({o for o in objects if objects.count(o) > 1})
    if clash:
        raise BuildFailed(f"source files share a base name ({', '.join(clash)}): ninja's object files would collide")
    build_dir.mkdir(parents=True, exist_ok=True)
    stop, t0 = threading.Event(), time.time() - 1
    bar = threading.Thread(target=_progress, args=(build_dir, len(srcs), stop, t0), daemon=True)
    if show_progress:
        bar.start()
    try:
        cpp_extension.load(
            name="_C",
            sources=srcs,
            extra_cflags=cxx_flags(),
            extra_cuda_cflags=NVCC_FLAGS if with_cuda else None,
            extra_ldflags=LD_FLAGS,
            extra_include_paths=[str(csrc)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # torch raises RuntimeError("Error building extension '_C': <compiler output>")
        text = str(exc)
        raise BuildFailed(first_error_line(text), text) from exc
    finally:
        stop.set()
        if show_progress:
            bar.join()
    return build_dir / "_C.so"


def _check_cache(cdir: Path, ident: dict, src_hash: str) -> tuple[str, str | None]:
    """("ok", so path) / ("failed", error) / ("corrupt", why) / ("absent", None) for one cache directory."""
    rec = read_record(cdir / RECORD)
    if rec is None:
        return ("corrupt", "a build directory without a record (interrupted build)") if (cdir / "_C.so").exists() else (
            "absent",
            None,
        )
    if rec.get("status") == "corrupt":
        return "corrupt", rec["error"]
    if rec.get("status") == "failed":
        return "failed", rec.get("error", "unknown error")
    if any(rec.get(k) != v for k, v in ident.items()) or rec.get("source_hash") != src_hash:
        return "corrupt", f"its record describes another build ({describe(rec)}, sources {rec.get('source_hash')})"
    so = cdir / rec.get("so", "_C.so")
    if not so.is_file():
        return "corrupt", f"{so} is missing"
    digest = file_sha256(so)
    if digest != rec.get("sha256"):
        return "corrupt", f"{so.name} does not match its recorded SHA-256 (truncated or overwritten)"
    return "ok", str(so)


def resolve(
    *,
    build: str = "auto",
    pkg_dir: Path = PKG_DIR,
    cache: Path | None = None,
    torch_mod=None,
    importer=import_so,
    builder=jit_build,
    toolchain=toolchain_problem,
    log=None,
) -> ExtState:
    """Find, check, and if needed build ``_C`` (see the module docstring). ``build``: ``auto`` (compile when that can
    help), ``never`` (only say what to run) or ``force`` (rebuild into the cache now, ``intro2llm build-ext``).
    The keyword arguments after ``build`` exist for tests."""
    if torch_mod is None:
        import torch as torch_mod
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if os.environ.get("INTRO2LLM_NO_EXT", "0") == "1" and build != "force":
        return ExtState(None, "missing", error="INTRO2LLM_NO_EXT=1 is set", fix="unset INTRO2LLM_NO_EXT")
    if "intro2llm._C" in sys.modules and importer is import_so and build != "force":  # imported before: it runs
        mod = sys.modules["intro2llm._C"]
        return ExtState(mod, "package", getattr(mod, "__file__", None), why="imported directly before the loader ran")
    ident = identity(torch_mod)
    here = describe(ident)
    so, rec = package_so(pkg_dir), read_record(pkg_dir / RECORD)
    why = ""
    install_failed_same = False
    if build != "force":
        if so is not None and (rec is None or rec.get("status") == "ok"):
            mismatch = rec is not None and any(rec.get(k) != v for k, v in ident.items())
            if mismatch:
                why = f"the installed _C was built for {describe(rec)}, this is {here}"
            else:
                try:
                    mod = importer(so)
                    note = "" if rec is not None else "no build record (built before records existed)"
                    return ExtState(mod, "package", str(so), why=note, cuda=(rec or {}).get("cuda"), record=rec or {})
                except (ImportError, OSError) as exc:
                    why = f"the installed _C ({so}) does not load: {exc}"
        elif rec is not None and rec.get("status") == "failed":
            why = f"building _C at install failed: {rec.get('error', 'unknown error')}"
            install_failed_same = rec.get("kind") == "compile" and all(rec.get(k) == v for k, v in ident.items())
        elif rec is not None and rec.get("status") == "corrupt":
            why = rec["error"]
        elif rec is not None and rec.get("status") == "skipped":
            why = f"the install skipped the extension ({rec.get('error', '')})"
        else:
            why = f"no compiled _C next to the package in {pkg_dir}"
    else:
        why = "rebuild requested"
    csrc = source_dir(pkg_dir)
    if csrc is None:
        return ExtState(None, "missing", error=f"{why}; the C++ sources are not shipped with this copy",
                        fix="reinstall from the repository: pip install --force-reinstall --no-deps .")
    src_hash = source_hash(csrc)
    cdir = (cache or cache_root()) / f"{ident['torch']}-{ident['flavour']}-{ident['python']}-{src_hash}"
    status, detail = _check_cache(cdir, ident, src_hash)
    if status == "ok" and build != "force":
        try:
            rec_c = read_record(cdir / RECORD) or {}
            mod = importer(Path(detail))
            return ExtState(mod, "cache", detail, why=why, cuda=rec_c.get("cuda"), record=rec_c)
        except (ImportError, OSError) as exc:
            status, detail = "corrupt", f"it does not load ({exc})"
    if status == "corrupt":
        log(f"intro2llm: the cached build in {cdir} is unusable ({detail}); removed it")
        shutil.rmtree(cdir, ignore_errors=True)
        status = "absent"
    if status == "failed" and build != "force":
        return ExtState(None, "missing", error=f"{why}; building it for {here} failed earlier: {detail} "
                        f"(log: {cdir / 'build.log'})", fix=RETRY, log=str(cdir / "build.log"))
    if build == "never" or (build == "auto" and os.environ.get("INTRO2LLM_NO_JIT", "0") == "1"):
        return ExtState(None, "missing", error=why, fix=BUILD_EXT_CMD)
    if build == "auto" and install_failed_same:
        return ExtState(None, "missing", error=f"{why} (the same torch and sources: a rebuild would fail the same way)",
                        fix=RETRY)
    problem = toolchain()
    if problem is not None:
        return ExtState(None, "missing", error=f"{why}; it cannot be compiled here: {problem[0]}", fix=problem[1])
    return _build_into(cdir, csrc, ident, src_hash, why, torch_mod, importer, builder, log)


def _want_cuda(torch_mod) -> tuple[bool, str | None]:
    """Build the CUDA kernels too? Only for a CUDA torch with a toolkit, and (at first use) a visible GPU or an
    explicit TORCH_CUDA_ARCH_LIST: without a GPU they would cost minutes and could not run."""
    if not torch_mod.version.cuda:
        return False, "torch is a CPU build"
    if os.environ.get("INTRO2LLM_NO_CUDA", "0") == "1":
        return False, "INTRO2LLM_NO_CUDA=1"
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        CUDA_HOME = None
    if CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found"
    if not torch_mod.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return False, "no GPU visible (set TORCH_CUDA_ARCH_LIST to build the CUDA kernels anyway)"
    return True, None


def _build_into(cdir, csrc, ident, src_hash, why, torch_mod, importer, builder, log) -> ExtState:
    with_cuda, cuda_note = _want_cuda(torch_mod)
    log(f"intro2llm: compiling the C++ kernels for {describe(ident)} into {cdir} ({why}); once per torch version, "
        "a few minutes")
    cdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if with_cuda and builder is jit_build:
        problem = cuda_headers_problem()
        if problem is not None:
            with_cuda, cuda_note = False, f"torch's CUDA headers do not compile here ({problem})"
            log(f"intro2llm: {cuda_note}; compiling the C++ kernels alone")
    rec = dict(ident, source_hash=src_hash, so="_C.so", built_by="intro2llm._ext (torch.utils.cpp_extension.load)")
    try:
        try:
            so = builder(cdir, csrc, with_cuda)
        except BuildFailed as exc:
            if not with_cuda:
                raise
            cuda_note = f"the CUDA kernels do not compile here ({exc})"
            log(f"intro2llm: {cuda_note}; compiling the C++ kernels alone")
            with_cuda = False
            so = builder(cdir, csrc, False)
    except BuildFailed as exc:
        (cdir / "build.log").write_text(exc.output or str(exc))
        write_record(cdir / RECORD, dict(rec, status="failed", error=str(exc)))
        log(f"intro2llm: compiling _C failed: {exc} (full log: {cdir / 'build.log'})")
        return ExtState(None, "missing", error=f"{why}; compiling it for {describe(ident)} failed: {exc} "
                        f"(log: {cdir / 'build.log'})", fix=RETRY, log=str(cdir / "build.log"))
    rec.update(status="ok", cuda=with_cuda, cuda_note=cuda_note, seconds=round(time.time() - t0, 1),
               sha256=file_sha256(Path(so)), so=Path(so).name)
    write_record(cdir / RECORD, rec)
    log(f"intro2llm: compiled in {rec['seconds']:.0f} s")
    if importer is import_so and "intro2llm._C" in sys.modules:  # one copy per process (ops register once)
        return ExtState(sys.modules["intro2llm._C"], "cache", str(so), cuda=with_cuda, record=rec,
                        why="built; this process keeps the _C it loaded before, new processes load this one")
    try:
        mod = importer(Path(so))
    except (ImportError, OSError) as exc:
        return ExtState(None, "missing", error=f"{why}; the fresh build in {cdir} does not load: {exc}",
                        fix=f"rm -rf {cdir} && {BUILD_EXT_CMD}")
    return ExtState(mod, "cache", str(so), why=why, cuda=with_cuda, record=rec)


_STATE: ExtState | None = None
_LOCK = threading.Lock()


def state(build: str = "auto") -> ExtState:
    """The extension for this process, resolved once (``build="force"`` rebuilds into the cache). When it is missing,
    one ``RuntimeWarning`` says why and what fixes it."""
    global _STATE
    with _LOCK:
        if _STATE is not None and build != "force":
            return _STATE
        st = resolve(build=build)
        if st.module is None and build == "auto" and os.environ.get("INTRO2LLM_NO_EXT", "0") != "1":
            import warnings

            warnings.warn(f"intro2llm: the C++/CUDA fast paths are missing ({st.error}); ops run on the reference/"
                          f"Triton paths. Fix: {st.fix}", RuntimeWarning, stacklevel=4)
        if _STATE is None or _STATE.module is None:
            _STATE = st
        return st
