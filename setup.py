"""Build oni._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

Decisions (each printed at build time):
  ONI_FORCE_CPU=1   never build CUDA sources.
  ONI_FORCE_CUDA=1  build CUDA sources even without a GPU (compile-and-link check).
  otherwise         build CUDA sources when torch is a CUDA build and nvcc matches its CUDA.
TORCH_CUDA_ARCH_LIST is respected when set; without it and without a visible GPU, CUDA
builds target Hopper (9.0) so a GPU-less compile check stays fast.
"""
import glob
import os
import re
import subprocess
import sys

# torch's cpp_extension reads CUDA_HOME at import: point it at the standard toolkit
# location when the user has not chosen one and nvcc is not on PATH.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"[oni setup] {msg}", file=sys.stderr, flush=True)


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def nvcc_version():
    if CUDA_HOME is None:
        return None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def decide_cuda():
    """Returns (build_cuda, reason)."""
    if flag("ONI_FORCE_CPU"):
        return False, "ONI_FORCE_CPU=1"
    nvcc = nvcc_version()
    if flag("ONI_FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError("ONI_FORCE_CUDA=1 but torch is a CPU-only build "
                               f"({torch.__version__}); install a CUDA build of torch")
        if nvcc is None:
            raise RuntimeError(f"ONI_FORCE_CUDA=1 but no nvcc found under CUDA_HOME={CUDA_HOME!r}")
        return True, f"ONI_FORCE_CUDA=1 (nvcc {nvcc[0]}.{nvcc[1]}, torch CUDA {torch.version.cuda})"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if nvcc is None:
        return False, f"no nvcc found (CUDA_HOME={CUDA_HOME!r})"
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc[0] != torch_major:
        return False, (f"nvcc {nvcc[0]}.{nvcc[1]} does not match torch's CUDA {torch.version.cuda}")
    return True, f"torch CUDA {torch.version.cuda} and nvcc {nvcc[0]}.{nvcc[1]} found"


def extra_cuda_includes():
    """CUDA-13 wheels keep cusparse.h and friends under site-packages/nvidia/cu13/include."""
    dirs = []
    for base in sys.path:
        cand = os.path.join(base, "nvidia", "cu13", "include")
        if os.path.isdir(cand) and cand not in dirs:
            dirs.append(cand)
    return dirs


def build_extensions():
    build_cuda, reason = decide_cuda()
    log(f"CPU kernels: yes (always); CUDA kernels: {'yes' if build_cuda else 'no'} ({reason})")

    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # the C++ standard is left to torch (C++20 from torch 2.14). -fno-math-errno: sqrt (always
    # correctly rounded) may then be vectorised; no oni code reads errno. -ffp-contract=off:
    # gcc fuses a * b + c into an FMA only in the clones whose ISA has one (AVX-512 here, not
    # the AVX2 or baseline clones), so float64 walks and the float32 sparse layers and Adam
    # gave different bits on different machines; unfused, every clone computes the same
    cxx_flags = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
    if not build_cuda:
        log(f"sources: {cpu_sources}")
        return [CppExtension(
            "oni._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DONI_CUDA_VERSION=0"]},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
            py_limited_api=True,
        )]

    if "TORCH_CUDA_ARCH_LIST" in os.environ:
        log(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (from the environment)")
    elif torch.cuda.is_available():
        log("TORCH_CUDA_ARCH_LIST unset: torch targets the GPU(s) present")
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        log("TORCH_CUDA_ARCH_LIST unset and no GPU visible: targeting 9.0 (Hopper)")
    major, minor = (int(v) for v in torch.version.cuda.split(".")[:2])
    cuda_version = major * 1000 + minor * 10
    sources = cpu_sources + sorted(glob.glob("csrc/cuda/*.cu"))
    includes = extra_cuda_includes()
    log(f"sources: {sources}")
    log(f"extra CUDA include dirs: {includes or 'none'}")
    return [CUDAExtension(
        "oni._C",
        sources,
        include_dirs=includes,
        extra_compile_args={
            "cxx": cxx_flags + [f"-DONI_CUDA_VERSION={cuda_version}"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )]


setup(
    name="oni",
    packages=find_packages(include=["oni", "oni.*"]),
    ext_modules=build_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
