"""The fused CPU kernels and their one multi-tensor launcher.

The C sources in ``csrc/`` (one file per algorithm family, sharing ``csrc/common.h``) are compiled
once per machine, each into its own shared library, with the system C compiler (``$CC``, else ``cc`` or
``gcc``; ``-O3 -march=native``, OpenMP when the compiler has it), cached under
``$LIGHTNING_OPT_CACHE`` (default ``~/.cache/lightning_opt``) by a hash of the sources, the
compiler and the CPU, and loaded with :mod:`ctypes`. Building takes about a second; it happens at
the first fused step, never at import.

:func:`launch` makes one call per bucket: pointer tables of every tensor of every list, the sizes,
the hyperparameters as runtime values (a schedule never rebuilds anything) and torch's thread
count. Tensors that are not contiguous are stepped through contiguous copies that are written back.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DTYPES", "available", "build_error", "launch", "library_path", "require"]

_CSRC = Path(__file__).with_name("csrc")
_TAGS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
#: the dtypes the kernels take (each has a suffix)
DTYPES = tuple(_TAGS)
_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}
_errors: dict[str, str] = {}
_functions: dict[str, ctypes._CFuncPtr] = {}


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("LIGHTNING_OPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightning_opt")
    return Path(root)


def library_path(family: str, cc: str) -> Path:
    """Where the library of ``csrc/<family>.c`` built by ``cc`` is cached (keyed by source, compiler, CPU)."""
    h = hashlib.sha256()
    for src in (_CSRC / f"{family}.c", _CSRC / "common.h"):
        h.update(src.read_bytes())
    h.update(cc.encode())
    h.update(_cpu_id().encode())
    return _cache_dir() / f"lightning_opt_{family}_{h.hexdigest()[:16]}.so"


def _compile(cc: str, src: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    base = [cc, "-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11", "-I", str(_CSRC)]
    # build into a temporary file and rename: concurrent processes (DDP ranks) never see half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        errors = []
        for extra in (["-fopenmp"], []):
            proc = subprocess.run([*base, *extra, str(src), "-o", tmp, "-lm"], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, out)
                return
            errors.append(proc.stderr.strip()[:1500])
        raise RuntimeError("\n".join(errors))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(family: str) -> ctypes.CDLL | None:
    if family in _libs or family in _errors:
        return _libs.get(family)
    with _lock:
        if family in _libs or family in _errors:
            return _libs.get(family)
        src = _CSRC / f"{family}.c"
        cc = _compiler()
        if not src.exists():
            _errors[family] = f"there is no fused CPU kernel {family!r} ({src} is missing)"
        elif cc is None:
            _errors[family] = "no C compiler found ($CC, cc, gcc or clang)"
        else:
            path = library_path(family, cc)
            try:
                if not path.exists():
                    _compile(cc, src, path)
                _libs[family] = ctypes.CDLL(str(path))
            except (OSError, RuntimeError) as err:
                _errors[family] = f"building {src.name} with {cc} failed: {err}"
    return _libs.get(family)


def available(family: str = "lion") -> bool:
    """The kernel library of ``family`` is built (or builds now) and loads."""
    return _load(family) is not None


def build_error(family: str = "lion") -> str | None:
    """Why the library of ``family`` is not available, or ``None``."""
    _load(family)
    return _errors.get(family)


def require(family: str = "lion") -> None:
    """Raise ``RuntimeError`` (why, and what to use instead) unless ``family``'s kernels are available."""
    if not available(family):
        raise RuntimeError(
            f"impl='fused' needs the fused CPU kernels, which are not available: {_errors[family]}. Install a C "
            "compiler (gcc) or use impl='for_loop'"
        )


def _function(family: str, name: str) -> ctypes._CFuncPtr:
    fn = _functions.get(name)
    if fn is None:
        require(family)
        fn = getattr(_libs[family], name)
        fn.argtypes = [
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        fn.restype = None
        _functions[name] = fn
    return fn


def suffix(param_dtype: torch.dtype, state_dtype: torch.dtype | None = None) -> str:
    """The kernel name suffix for parameters of ``param_dtype`` and state of ``state_dtype``."""
    tag = _TAGS[param_dtype]
    if state_dtype is None or state_dtype == param_dtype:
        return tag
    if state_dtype != torch.float32 or param_dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"no fused kernel for {param_dtype} parameters with {state_dtype} state")
    return f"{tag}_f32"


def launch(
    family: str,
    kernel: str,
    lists: Sequence[Sequence[Tensor | None]],
    hp: Sequence[float],
    ip: Sequence[int] = (),
    *,
    state_dtype: torch.dtype | None = None,
    n_out: int = 0,
) -> list[list[float]] | None:
    """Call ``kernel`` of ``csrc/<family>.c`` once over every tensor of ``lists`` (``lists[0]``: the parameters).

    Args:
        family: the C source's stem (``"lion"``); each family's file builds into its own library.
        kernel: the kernel's name in it (``"lion"``), without the dtype suffix.
        lists: equally long tensor lists in the kernel's order; ``None`` entries become NULL.
        hp: float hyperparameters (passed as doubles); ``ip``: integer ones.
        state_dtype: the dtype of the state lists when it differs from the parameters'.
        n_out: per-tensor results the kernel writes.

    Returns:
        ``n_out`` floats per tensor, or ``None`` when ``n_out`` is 0.
    """
    params = lists[0]
    n = len(params)
    fn = _function(family, f"{kernel}_{suffix(params[0].dtype, state_dtype)}")
    ptrs = (ctypes.c_void_p * (n * len(lists)))()
    sizes = (ctypes.c_int64 * n)()
    write_back: list[tuple[Tensor, Tensor]] = []
    for t in range(n):
        numel = params[t].numel()
        sizes[t] = numel
        for j, lst in enumerate(lists):
            x = lst[t]
            if x is None:
                continue
            if x.numel() != numel:
                raise ValueError(f"{kernel}: tensor {t} of list {j} has {x.numel()} elements, expected {numel}")
            if not x.is_contiguous():
                c = x.contiguous()
                write_back.append((x, c))
                x = c
            ptrs[j * n + t] = x.data_ptr()
    hp_arr = (ctypes.c_double * max(1, len(hp)))(*hp)
    ip_arr = (ctypes.c_int64 * max(1, len(ip)))(*ip)
    out = (ctypes.c_double * max(1, n * n_out))()
    fn(n, ptrs, sizes, hp_arr, ip_arr, out, torch.get_num_threads())
    for orig, copy in write_back:
        orig.copy_(copy)
    if n_out == 0:
        return None
    return [list(out[t * n_out : (t + 1) * n_out]) for t in range(n)]
