"""The native CPU kernels of `kernels/native/`: compiled once per machine with the C compiler found here,
cached, and called through ctypes (no Python headers, no torch headers: a build takes about a second).

The shared object is keyed by a hash of the source, the compiler, its flags and this CPU's feature flags
(it is built with ``-march=native``), and lives in ``$XDG_CACHE_HOME/pagedserve/kernels`` (``~/.cache``
by default; the system temporary directory where that is not writable). It links the OpenMP runtime that
torch has already loaded, so its threads are torch's. Where no compiler is found (``$CC``, ``cc``, ``gcc``)
or the build fails, `load` says why and the callers keep their torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import cpu_small_ops

SOURCES = tuple(
    Path(__file__).parent / "native" / name
    for name in ("decode_attention.c", "small_ops.c")
)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")
BUILD_TIMEOUT_S = 120
_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_DECODE_ARGS = [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr]
_DECODE_ARGS += [_i64] * 5 + [_f32, _i64, _f32, ctypes.c_int, ctypes.c_int]
_NORM_ARGS = [
    _ptr,
    _ptr,
    _i64,
    _ptr,
    _ptr,
    _i64,
    _ptr,
    _i64,
    _i64,
    _f32,
    ctypes.c_int,
    ctypes.c_int,
]
_SILU_ARGS = [_ptr, _ptr, _i64, _i64, _i64, ctypes.c_int, ctypes.c_int]


@dataclass(frozen=True)
class NativeKernels:
    """The loaded library; one instance per engine (held by its `kernels.ops.Ops`)."""

    library: ctypes.CDLL
    path: Path

    def decode_attention(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> None:
        """out[rows[b]] = attention of q[rows[b]] ([Hq, D] per row) over the first seq_lens[b] tokens of
        sequence b's blocks. out, q: [T, Hq, D] with contiguous heads; caches contiguous, float32 or
        bfloat16 like q and out; rows, block_tables, seq_lens int64 and contiguous."""
        num_heads, head_dim = q.shape[1], q.shape[2]
        status = self.library.pagedserve_decode_attention(
            out.data_ptr(), out.stride(0), q.data_ptr(), q.stride(0),
            k_cache.data_ptr(), v_cache.data_ptr(), rows.data_ptr(),
            block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
            rows.shape[0], num_heads, k_cache.shape[2], head_dim, k_cache.shape[1],
            scale, sliding_window or 0, softcap or 0.0, int(q.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError(
                "the native decode attention kernel could not allocate its scratch memory"
            )

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """`kernels.reference.rms_norm` in one pass (`cpu_small_ops` where the tensors do not fit)."""
        rows = _rows(x, weight)
        if rows is None:
            return cpu_small_ops.rms_norm(x, weight, eps)
        out = torch.empty(x.shape, dtype=x.dtype)
        self.library.pagedserve_rms_norm(
            out.data_ptr(), rows.data_ptr(), rows.stride(0), None, None, 0, weight.data_ptr(),
            rows.shape[0], rows.shape[1], eps, int(x.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`kernels.reference.fused_add_rms_norm` in one pass: (norm of x + residual, x + residual)."""
        rows, residual_rows = _rows(x, weight), _rows(residual, weight)
        if rows is None or residual_rows is None or x.shape != residual.shape:
            return cpu_small_ops.fused_add_rms_norm(x, residual, weight, eps)
        out, summed = (
            torch.empty(x.shape, dtype=x.dtype),
            torch.empty(x.shape, dtype=x.dtype),
        )
        self.library.pagedserve_rms_norm(
            out.data_ptr(), rows.data_ptr(), rows.stride(0), summed.data_ptr(), residual_rows.data_ptr(),
            residual_rows.stride(0), weight.data_ptr(), rows.shape[0], rows.shape[1], eps,
            int(x.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        return out, summed

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """`kernels.reference.silu_and_mul` in one pass: [..., 2I] -> [..., I]."""
        rows = _rows(x, x)
        if rows is None:
            return cpu_small_ops.silu_and_mul(x)
        half = x.shape[-1] // 2
        out = torch.empty((*x.shape[:-1], half), dtype=x.dtype)
        self.library.pagedserve_silu_and_mul(
            out.data_ptr(), rows.data_ptr(), rows.stride(0), rows.shape[0], half,
            int(x.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        return out


def _rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, last dim] with contiguous rows (a view), or None where the native ops do not take it."""
    if (
        torch.compiler.is_compiling()
    ):  # a compiled graph cannot trace a ctypes call: the torch twins there
        return None
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or like.dtype != x.dtype
    ):
        return None
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    return x.view(-1, x.shape[-1]) if x.is_contiguous() and x.dim() > 0 else None


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `NativeKernels.decode_attention` takes these tensors (else the caller's torch path)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and k_cache.dtype == q.dtype
        and q.stride(2) == 1
        and q.stride(1) == q.shape[2]
        and k_cache.is_contiguous()
    )


def load() -> tuple[NativeKernels | None, str]:
    """(the kernels, "") once built and loaded, or (None, why not)."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found ($CC, cc or gcc)"
    try:
        version = subprocess.run(
            [compiler, "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        path = _cache_dir() / f"pagedserve_cpu-{_key(compiler, version)}.so"
        if not path.exists():
            _build(compiler, path)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return (
            None,
            f"building or loading {', '.join(source.name for source in SOURCES)} failed: {exc}",
        )
    for name, argtypes in (
        ("pagedserve_decode_attention", _DECODE_ARGS),
        ("pagedserve_rms_norm", _NORM_ARGS),
        ("pagedserve_silu_and_mul", _SILU_ARGS),
    ):
        getattr(library, name).argtypes = argtypes
        getattr(library, name).restype = ctypes.c_int
    return NativeKernels(library, path), ""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _key(compiler: str, version: str) -> str:
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES))
    for part in (compiler, version, " ".join(FLAGS), _cpu_flags()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    base = (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "pagedserve"
        / "kernels"
    )
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"pagedserve-kernels-{os.getuid()}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _build(compiler: str, path: Path) -> None:
    """Compile into a temporary file beside `path`, then rename: concurrent builders never see half a file."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                result.stderr.strip().splitlines()[-1]
                if result.stderr.strip()
                else "compiler failed"
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
