"""Builds the compiled extensions with torch.utils.cpp_extension and ninja.

ntk_kernels._C       csrc/cpu/*.cpp (C++/ATen CPU kernels): always attempted.
ntk_kernels._C_cuda  csrc/cuda/*.cu (torch-free launchers) + csrc/cuda/*_binding.cpp (thin torch binding):
                     when a CUDA toolkit is found (CUDA_HOME) and torch is a CUDA build, whether or not a GPU
                     is visible.  The launchers alone compile anywhere nvcc exists (tests/test_cuda_compile.py).
Environment: NTK_KERNELS_SKIP_CUDA_BUILD=1, NTK_KERNELS_SKIP_CPU_BUILD=1, NTK_KERNELS_CUDA_ARCH (default
"9.0", as TORCH_CUDA_ARCH_LIST), MAX_JOBS (ninja's parallelism).
A compile failure is not fatal: the package installs pure-Python and build_info() says what is missing.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    exts = []
    common = [os.path.join(ROOT, "csrc", "common")]
    if os.environ.get("NTK_KERNELS_SKIP_CPU_BUILD") != "1":
        cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
        # -fopenmp: at::parallel_for in the extension's own code runs on torch's OpenMP threads (without it,
        # single-threaded); torch's CPU wheels link libgomp.
        omp = [] if sys.platform == "darwin" else ["-fopenmp"]
        exts.append(CppExtension("ntk_kernels._C", ["csrc/ops.cpp"] + cpu_sources, include_dirs=common,
                                 extra_compile_args={"cxx": ["-O3", "-std=c++17"] + omp}, extra_link_args=omp))
    want_cuda = os.environ.get("NTK_KERNELS_SKIP_CUDA_BUILD") != "1"
    if want_cuda and CUDA_HOME is not None and torch.version.cuda is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("NTK_KERNELS_CUDA_ARCH", "9.0"))
        sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_binding.cpp"))
        exts.append(CUDAExtension("ntk_kernels._C_cuda", sources, include_dirs=common + ["csrc/cuda"],
                                  extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                                      "nvcc": ["-O3", "-std=c++17", "--use_fast_math",
                                                               "-lineinfo"]}))
    elif want_cuda:
        why = f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME)"
        print(f"ntk_kernels: not building the CUDA extension: {why}", file=sys.stderr)
    return exts


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class OptionalBuildExtension(BuildExtension):
        """Builds each extension; one that fails to compile is skipped with a message, not a failed install."""

        failed = set()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # compiler missing or failing: keep the pure-Python install working
                self.failed.add(ext.name)
                print(f"ntk_kernels: WARNING: building {ext.name} failed ({e}); the package falls back to "
                      f"other backends and build_info() reports it", file=sys.stderr)

        def _built(self):
            return [e for e in self.extensions if e.name not in self.failed]

        def get_outputs(self):
            return [self.get_ext_fullpath(e.name) for e in self._built()]

        def get_output_mapping(self):  # what an editable install copies: only what was built
            mapping = super().get_output_mapping()
            skip = {self.get_ext_fullpath(n) for n in self.failed}
            return {k: v for k, v in mapping.items() if v not in skip}

        def copy_extensions_to_source(self):
            all_exts, self.extensions = self.extensions, self._built()
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = all_exts

    return OptionalBuildExtension.with_options(use_ninja=True)


try:
    ext_modules, cmdclass = _extensions(), {"build_ext": _build_ext_class()}
except ImportError as e:  # torch missing in the build environment
    print(f"ntk_kernels: torch not importable at build time ({e}); installing without extensions", file=sys.stderr)
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
