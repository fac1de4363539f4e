"""Build script: the package plus the optional compiled extension ``intro2llm._C``.

``pip install --no-build-isolation .`` (torch installed first) compiles ``csrc/ops.cpp`` and ``csrc/cpu/*.cpp``
(C++17, OpenMP) always, and ``csrc/cuda/*`` only when the installed torch is a CUDA build. When the build
fails (no compiler, say), the package still installs and runs on the reference/Triton paths, with one
warning; ``INTRO2LLM_REQUIRE_EXT=1`` turns that into an error (CI sets it).

Environment knobs: ``INTRO2LLM_NATIVE=1`` adds ``-march=native`` (off by default: binaries must run on other
CPUs); ``MAX_JOBS`` caps parallel compile jobs (ninja); ``INTRO2LLM_NO_EXT=1`` skips the extension.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
REQUIRE_EXT = os.environ.get("INTRO2LLM_REQUIRE_EXT", "0") == "1"
PACKAGES = [
    "intro2llm",
    "intro2llm.ops",
    "intro2llm.tokenizer",
    "intro2llm.model",
    "intro2llm.configs",
    "intro2llm.data",
    "intro2llm.loss",
    "intro2llm.optimizer",
    "intro2llm.training",
    "intro2llm.evaluation",
    "intro2llm.interop",
    "intro2llm.kernels",
]


def _warn(msg: str) -> None:
    print(f"WARNING: intro2llm: {msg}", file=sys.stderr)


def _rel(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def _extensions():
    """The ``intro2llm._C`` extension, or [] (with a warning) when torch's build tools are missing."""
    if os.environ.get("INTRO2LLM_NO_EXT", "0") == "1":
        _warn("INTRO2LLM_NO_EXT=1: skipping the C++/CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing: nothing to build against
        if REQUIRE_EXT:
            raise RuntimeError(f"INTRO2LLM_REQUIRE_EXT=1 but torch cannot be imported: {exc}") from exc
        _warn(f"torch is not importable ({exc}); installing without the compiled extension")
        return [], {}

    cpu_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")] + cpu_sources)
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
    if os.environ.get("INTRO2LLM_NATIVE", "0") == "1":
        cxx.append("-march=native")
    kwargs = dict(
        name="intro2llm._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if torch.version.cuda and CUDA_HOME is not None and os.environ.get("INTRO2LLM_NO_CUDA", "0") != "1":
        cuda_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        cuda_sources += sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        ext = CUDAExtension(
            sources=sources + _rel(cuda_sources),
            extra_compile_args={"cxx": cxx + ["-DINTRO2LLM_WITH_CUDA"], "nvcc": ["-O3", "--use_fast_math"]},
            **kwargs,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": _optional_build_ext(BuildExtension)}


def _optional_build_ext(base):
    class OptionalBuildExt(base):
        """torch's BuildExtension (ninja, parallel) that degrades to a warning unless INTRO2LLM_REQUIRE_EXT=1."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("use_ninja", True)
            super().__init__(*args, **kwargs)

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if REQUIRE_EXT:
                    raise
                _warn(
                    f"building intro2llm._C failed ({type(exc).__name__}: {exc}); the package works on the "
                    "reference and Triton backends only. Set INTRO2LLM_REQUIRE_EXT=1 to make this an error."
                )

    return OptionalBuildExt


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir={"intro2llm.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
