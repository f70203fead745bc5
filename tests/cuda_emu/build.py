"""Build the CUDA kernels of csrc/cuda/*.cu as a CPU library that runs them under emulation.

Each .cu file is rewritten into C++ (launch sites become ``oni_emu::launch`` calls, CUDA
headers give way to cuda_emu.h, the ``CUDA`` dispatch key becomes ``CPU``) and compiled with
g++ against the installed torch. Loading the result after ``oni`` replaces oni's CPU kernels
with the emulated CUDA ones, so the CPU tests check the CUDA code. See README.md here.

    python tests/cuda_emu/build.py            # -> build/cuda_emu/liboni_cuda_emu.so
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + [HERE / "selftest.cu"]
# ONI_CUDA_EMU_ASAN=1: built with AddressSanitizer, so a kernel's read or write past a tensor
# is reported (run python with libasan preloaded: scripts/cuda_emu_check.sh does).
ASAN = os.environ.get("ONI_CUDA_EMU_ASAN") == "1"
BUILD_DIR = ROOT / "build" / ("cuda_emu_asan" if ASAN else "cuda_emu")
LIBRARY = BUILD_DIR / "liboni_cuda_emu.so"
# the launch limits the emulated kernels see (csrc/launch_limits.h; a GPU's: 2^31 - 1, 65535)
EMULATED_MAX_GRID = (3, 2)

_BOUNDS = re.compile(r"__launch_bounds__\(\s*([^()]+?)\s*\)\s*(\w+)\s*\(")
_LAUNCH = re.compile(r"(?P<name>[A-Za-z_]\w*)(?P<targs><[^<>;{}]*>)?\s*<<<(?P<cfg>.*?)>>>\s*\(",
                     re.S)
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
_CUDA_INCLUDE = re.compile(r'#include\s*<(c10/cuda/[^>]*|cuda_bf16\.h|cuda_runtime[^>]*)>\n')


def _breaks(match: re.Match, kept: str) -> str:
    """The line breaks of a replaced match that its replacement does not keep in ``kept``."""
    return "\n" * (match.group(0).count("\n") - kept.count("\n"))


def translate(text: str, origin: str) -> str:
    """One .cu file as C++ for cuda_emu.h; raises if a construct was left untranslated."""
    source = text
    bounds = {name: bound for bound, name in _BOUNDS.findall(text)}
    text = _BOUNDS.sub(lambda m: f"{m.group(2)}({_breaks(m, m.group(2))}", text)

    def launch(m: re.Match) -> str:
        name, targs, cfg = m.group("name"), m.group("targs") or "", m.group("cfg")
        return (f'::oni_emu::launch({_breaks(m, targs + cfg)}"{name}", '
                f'::oni_emu::LaunchConfig({cfg}), {bounds.get(name, "0")}, {name}{targs}, ')

    text = _LAUNCH.sub(launch, text)
    text = _DYNAMIC_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = "
                  f"static_cast<{m.group(1)}*>(::oni_emu::dynamic_shared());", text)
    text = _CUDA_INCLUDE.sub("\n", text)
    text = text.replace('#include "../', '#include "')  # csrc/ is on the include path
    text = re.sub(r"^[ \t]*#pragma unroll.*$", "", text, flags=re.M)
    text = text.replace(".is_cuda()", ".is_cpu()")
    text = re.sub(r"TORCH_LIBRARY_IMPL\(\s*oni\s*,\s*CUDA\s*,", "TORCH_LIBRARY_IMPL(oni, CPU,",
                  text)
    code = re.sub(r"//.*", "", text)
    for leftover in ("<<<", "__launch_bounds__", "extern __shared__",
                     "TORCH_LIBRARY_IMPL(oni, CUDA"):
        if leftover in code:
            raise RuntimeError(f"{origin}: '{leftover}' was not translated")
    # every line where it was: the emulation's messages and compiler errors name .cu lines
    if text.count("\n") != source.count("\n"):
        raise RuntimeError(f"{origin}: the translation moved lines")
    return f'#include "cuda_emu.h"\n#line 1 "{origin}"\n{text}'


def _flags():
    import torch
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{HERE}",
                                                                     f"-I{ROOT / 'csrc'}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compile_flags = ["-std=c++20", "-fPIC", "-O1", "-g0", "-ffp-contract=off", "-fno-math-errno",
                     "-U_FORTIFY_SOURCE",  # __longjmp_chk refuses jumps between fiber stacks
                     f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=oni_cuda_emu",
                     # tiny grids: every kernel's grid-stride loops run on the tests' shapes
                     f"-DONI_MAX_GRID_X={EMULATED_MAX_GRID[0]}",
                     f"-DONI_MAX_GRID_Y={EMULATED_MAX_GRID[1]}",
                     *includes]
    lib = Path(torch.__file__).parent / "lib"
    link_flags = ["-shared", f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"]
    if ASAN:
        compile_flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        link_flags += ["-fsanitize=address"]
    return compile_flags, link_flags


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def build(jobs: int | None = None, verbose: bool = False) -> Path:
    """Translate and compile (only what changed); returns the library's path. Processes
    that build at once (pytest-xdist workers) take turns."""
    import fcntl

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(jobs, verbose)


def _build_locked(jobs, verbose):
    compile_flags, link_flags = _flags()
    units = []
    for source in SOURCES:
        cpp = BUILD_DIR / (source.stem + ".cpp")
        _write_if_changed(cpp, translate(source.read_text(), str(source)))
        units.append(cpp)
    units.append(HERE / "runtime.cpp")
    # one stamp over flags and every header a unit may include: any change rebuilds all
    headers = sorted((ROOT / "csrc").glob("*.h")) + [HERE / "cuda_emu.h"]
    stamp = hashlib.sha256("\0".join(compile_flags).encode())
    for header in headers:
        stamp.update(header.read_bytes())
    stamp_file = BUILD_DIR / "headers.sha256"
    stale_all = not stamp_file.exists() or stamp_file.read_text() != stamp.hexdigest()

    def compile_unit(cpp: Path) -> Path:
        obj = BUILD_DIR / (cpp.stem + ".o")
        if stale_all or not obj.exists() or obj.stat().st_mtime < cpp.stat().st_mtime:
            cmd = ["g++", *compile_flags, "-c", str(cpp), "-o", str(obj)]
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"compiling {cpp} failed:\n{done.stderr[-6000:]}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_unit, units))
    stamp_file.write_text(stamp.hexdigest())
    if not LIBRARY.exists() or any(o.stat().st_mtime > LIBRARY.stat().st_mtime for o in objects):
        done = subprocess.run(["g++", *map(str, objects), *link_flags, "-o", str(LIBRARY)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"linking {LIBRARY} failed:\n{done.stderr[-6000:]}")
    return LIBRARY


def load() -> Path:
    """Build if needed, then register the emulated kernels over oni's CPU kernels."""
    import importlib
    import warnings

    import torch

    importlib.import_module("oni")  # the op schemas must exist first
    path = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        torch.ops.load_library(str(path))
    return path


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
