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

SOURCE = Path(__file__).parent / "native" / "decode_attention.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")
BUILD_TIMEOUT_S = 120
_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_DECODE_ARGS = [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr]
_DECODE_ARGS += [_i64] * 5 + [_f32, _i64, _f32, ctypes.c_int, ctypes.c_int]


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
        path = _cache_dir() / f"decode_attention-{_key(compiler, version)}.so"
        if not path.exists():
            _build(compiler, path)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return None, f"building or loading {SOURCE.name} failed: {exc}"
    library.pagedserve_decode_attention.argtypes = _DECODE_ARGS
    library.pagedserve_decode_attention.restype = ctypes.c_int
    return NativeKernels(library, path), ""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _key(compiler: str, version: str) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
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
            [compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"],
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
