"""Step 1 of the GPU check: versions, the device, and its measured memory bandwidth (the floor of step 4)."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from gpu_check_step import StepContext, copy_bandwidth

COPY_BYTES = {"cuda": 2 << 30, "cpu": 64 << 20}  # large against the H200's 60 MB L2; small on CPU


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _versions(ctx: StepContext) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "cuda_runtime": torch.version.cuda,
        "device": ctx.device,
    }
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "cudnn": torch.backends.cudnn.version(),
        })
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def run(ctx: StepContext) -> None:
    versions = ctx.case("versions", lambda: _versions(ctx))
    bandwidth = ctx.case("bandwidth", lambda: copy_bandwidth(ctx.device, COPY_BYTES[ctx.device]))
    if versions["status"] == "ok":
        where = versions.get("gpu") or f"CPU ({versions.get('cpu_threads')} threads)"
        ctx.summary.append(
            f"{where}; torch {versions['torch']}, CUDA {versions['cuda_runtime']}, triton {versions['triton']}, "
            f"transformers {versions['transformers']}"
        )
    if bandwidth["status"] == "ok":
        ctx.summary.append(f"copy bandwidth {bandwidth['median_gbs']} GB/s median ({bandwidth['best_gbs']} best), read + write")
    ctx.finish()
