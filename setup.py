"""Build script: the package plus the compiled extension ``intro2llm._C``.

``pip install .`` (build isolation: pip puts the newest torch into a temporary build environment) and
``pip install --no-build-isolation .`` (against the torch already installed: the development path) both compile
``csrc/*.cpp`` + ``csrc/cpu/**/*.cpp`` (C++17, OpenMP), and ``csrc/cuda/**`` when torch is a CUDA build and nvcc
exists. Without a visible GPU the CUDA kernels target a default architecture list (torch's own, as far as nvcc
supports it; ``TORCH_CUDA_ARCH_LIST`` overrides). If the CUDA part does not compile, the C++ kernels are built
alone (one message). If nothing compiles the package still installs and runs on the reference/Triton paths, with a
warning on stderr and the terminal; ``INTRO2LLM_REQUIRE_EXT=1`` turns a failed C++ build into an error (CI sets
it; a failed CUDA part is then an error too when a GPU is visible).

Next to ``_C`` goes ``_C.build.json`` (torch version and flavour, source hash, CUDA or not, or why the build failed):
at import ``intro2llm._ext`` compares it with the running torch and, on a mismatch, builds ``_C`` for that torch
into a per-user cache from the sources the wheel ships as ``intro2llm/_csrc``. The recipe (sources, flags, the
default architectures) lives in ``intro2llm/_ext.py``, shared with that runtime build.

Environment knobs: ``INTRO2LLM_NATIVE=1`` adds ``-march=native`` (off by default: binaries must run on other
CPUs); ``MAX_JOBS`` caps parallel compile jobs (ninja); ``INTRO2LLM_NO_EXT=1`` skips the extension;
``INTRO2LLM_NO_CUDA=1`` skips the CUDA kernels.
"""

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
REQUIRE_EXT = os.environ.get("INTRO2LLM_REQUIRE_EXT", "0") == "1"
# every package under intro2llm/ (a new subpackage ships without a change here), plus the Triton kernels that live
# at the top-level kernels/ and install as intro2llm.kernels
PACKAGES = sorted(find_packages(where=ROOT, include=["intro2llm", "intro2llm.*"])) + ["intro2llm.kernels"]


def _load_recipe():
    """``intro2llm/_ext.py`` by path (importing the package would import torch and everything else)."""
    spec = importlib.util.spec_from_file_location("_intro2llm_ext_recipe", os.path.join(ROOT, "intro2llm", "_ext.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


R = _load_recipe()
CSRC = Path(ROOT) / "csrc"


def _say(msg: str, loud: bool = False) -> None:
    """To stderr (pip shows it with -v, or when the build fails) and, for ``loud`` warnings, to the terminal:
    pip hides a successful build's output, and a missing extension must not go unnoticed."""
    line = f"WARNING: intro2llm: {msg}"
    print(line, file=sys.stderr, flush=True)
    if loud and os.environ.get("INTRO2LLM_QUIET_BUILD", "0") != "1":
        try:
            with open("/dev/tty", "w") as tty:
                tty.write("\n" + line + "\n")
        except OSError:
            pass


@contextlib.contextmanager
def _tee_fds():
    """Capture what the compilers write to fds 1 and 2 (ninja writes there directly) while still echoing it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        box = {"text": ""}
        try:
            yield box
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            data = tmp.read()
            os.write(1, data)
            box["text"] = data.decode(errors="replace")


def _torch():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing: nothing to build against
        return None, exc
    return (torch, CUDA_HOME, BuildExtension, CppExtension, CUDAExtension), None


def _cpp_extension(CppExtension):
    return CppExtension(
        name="intro2llm._C",
        sources=[os.path.relpath(p, ROOT) for p in R.sources(CSRC, with_cuda=False)],
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": R.cxx_flags()},
        extra_link_args=R.LD_FLAGS,
    )


def _extensions():
    """The ``intro2llm._C`` extension and its build command; ([], {}) with a record when there is nothing to build."""
    if os.environ.get("INTRO2LLM_NO_EXT", "0") == "1":
        _say("INTRO2LLM_NO_EXT=1: skipping the C++/CUDA extension")
        return [], {"build_py": _build_py(("skipped", "INTRO2LLM_NO_EXT=1 was set at install"))}
    mods, exc = _torch()
    if mods is None:
        if REQUIRE_EXT:
            raise RuntimeError(f"INTRO2LLM_REQUIRE_EXT=1 but torch cannot be imported: {exc}") from exc
        _say(f"torch is not importable ({exc}); installing without the compiled extension", loud=True)
        return [], {"build_py": _build_py(("failed", f"torch was not importable at install ({exc})"))}
    torch, cuda_home, BuildExtension, CppExtension, CUDAExtension = mods
    cpp = _cpp_extension(CppExtension)
    ext, cuda_note = cpp, None
    if not torch.version.cuda:
        cuda_note = "torch is a CPU build"
    elif os.environ.get("INTRO2LLM_NO_CUDA", "0") == "1":
        cuda_note = "INTRO2LLM_NO_CUDA=1"
    elif cuda_home is None:
        cuda_note = "no CUDA toolkit (nvcc) found"
    else:
        ext = CUDAExtension(
            name="intro2llm._C",
            sources=[os.path.relpath(p, ROOT) for p in R.sources(CSRC, with_cuda=True)],
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": R.cxx_flags(), "nvcc": R.NVCC_FLAGS},
            extra_link_args=R.LD_FLAGS,
        )
    cmd = _optional_build_ext(BuildExtension, torch, cuda_home, cpp, cuda_note)
    return [ext], {"build_ext": cmd, "build_py": _build_py(None)}


def _build_py(record):
    class BuildPy(build_py):
        """Ships ``csrc/`` as ``intro2llm/_csrc`` (so an installed copy can rebuild ``_C`` for another torch), and,
        when no extension is built at all, a record saying why."""

        def run(self):
            super().run()
            if getattr(self, "editable_mode", False):  # the source tree is the package: csrc/ is next to it
                return
            dest = Path(self.build_lib) / "intro2llm" / "_csrc"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(CSRC, dest, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))
            if record is not None:
                R.write_record(dest.parent / R.RECORD, {"status": record[0], "error": record[1], "kind": "setup"})

    return BuildPy


def _swap_extension(cmd, new) -> None:
    """Replace the (CUDA) extension of a finalized build_ext by ``new``, with the fields finalize_options set."""
    old = cmd.extensions[0]
    for attr in ("_full_name", "_links_to_dynamic", "_needs_stub"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    for key, value in list(getattr(cmd, "ext_map", {}).items()):
        if value is old:
            cmd.ext_map[key] = new
    cmd.extensions = cmd.distribution.ext_modules = [new]


def _optional_build_ext(base, torch, cuda_home, cpp_ext, cuda_note):
    class OptionalBuildExt(base):
        """torch's BuildExtension (ninja, parallel): falls back to the C++ kernels alone when the CUDA part fails,
        degrades to a warning unless INTRO2LLM_REQUIRE_EXT=1, and writes ``_C.build.json`` next to ``_C``."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("use_ninja", True)
            super().__init__(*args, **kwargs)

        def _record_dirs(self):
            inplace = self.inplace
            dirs = []
            for flag in (False, True) if inplace else (False,):
                self.inplace = flag
                dirs.append(Path(self.get_ext_fullpath("intro2llm._C")).parent)
            self.inplace = inplace
            return dirs

        def _attempt(self):
            with _tee_fds() as out:
                try:
                    super().run()
                    return None
                except Exception as exc:  # the compiler's own words are in the captured output
                    err = exc
            return err, R.first_error_line(out["text"] + "\n" + str(err))

        def run(self):
            t0 = time.time()
            is_cuda = any(s.endswith(".cu") for s in self.extensions[0].sources)
            notes = [cuda_note] if cuda_note else []
            if is_cuda and (problem := R.cuda_headers_problem()) is not None:  # seconds, not a failed CUDA build
                if REQUIRE_EXT and torch.cuda.is_available():
                    raise RuntimeError(f"INTRO2LLM_REQUIRE_EXT=1 and a GPU is visible, but torch's CUDA headers do "
                                       f"not compile: {problem}")
                notes.append(f"the CUDA kernels cannot compile here: torch's CUDA headers fail ({problem})")
                _say(f"{notes[-1]}; building the C++ CPU kernels alone", loud=True)
                _swap_extension(self, cpp_ext)
                is_cuda = False
            if is_cuda:
                note = R.ensure_cuda_arch_list(torch, cuda_home)
                if note:
                    notes.append(note)
                    _say(note)
            failed = self._attempt()
            if failed is not None and is_cuda:
                if REQUIRE_EXT and torch.cuda.is_available():
                    raise failed[0]
                _say(f"the CUDA kernels do not compile here ({failed[1]}); building the C++ CPU kernels alone",
                     loud=True)
                notes.append(f"the CUDA kernels did not compile: {failed[1]}")
                self.compiler = None  # run() makes a fresh compiler
                _swap_extension(self, cpp_ext)
                is_cuda = False
                failed = self._attempt()
            ident = R.identity(torch)
            rec = dict(ident, source_hash=R.source_hash(CSRC), built_by="setup.py", cuda=is_cuda,
                       cuda_note="; ".join(notes) or None, seconds=round(time.time() - t0, 1))
            if failed is not None:
                if REQUIRE_EXT:
                    raise RuntimeError(f"INTRO2LLM_REQUIRE_EXT=1 and building intro2llm._C failed: {failed[1]}") \
                        from failed[0]
                _say(f"building intro2llm._C failed ({failed[1]}); the package works on the reference and Triton "
                     "backends only (`intro2llm info` says why; `intro2llm build-ext` retries). Set "
                     "INTRO2LLM_REQUIRE_EXT=1 to make this an error.", loud=True)
                no_tools = R.toolchain_problem() is not None  # a compiler installed later: worth a build at first use
                rec.update(status="failed", kind="toolchain" if no_tools else "compile", error=failed[1])
            for i, d in enumerate(self._record_dirs()):
                so = R.package_so(d)
                old = R.read_record(d / R.RECORD)
                if failed is not None and so is not None:
                    if i == 1 and old and old.get("status") == "ok":  # in place: the older _C stays, and its record
                        old["last_failure"] = failed[1]
                        R.write_record(d / R.RECORD, old)
                        continue
                    if i == 0:  # a stale _C in build/ must not ship in the wheel as if it were this build
                        so.unlink()
                        so = None
                if failed is None and so is not None:
                    rec.update(status="ok", sha256=R.file_sha256(so), so=so.name)
                R.write_record(d / R.RECORD, rec)

    return OptionalBuildExt


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir={"intro2llm.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
