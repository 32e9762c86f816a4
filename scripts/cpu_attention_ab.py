"""The CPU (`batched`) paged attention of this tree against that of an earlier revision, in one process:
whole engine steps (forward plus the logits of the last rows) of one model with each revision's
`kernels/batched.py` as the attention op, interleaved round by round.

    OMP_WAIT_POLICY=PASSIVE python scripts/cpu_attention_ab.py smollm2 float32 --context 1024 --baseline 58f1610

Times are CPU seconds of the process (`time.process_time`) on one thread by default, so that other load
on the machine moves them less than wall time; medians of `--rounds`, each the best of 3 calls. The
baseline is called as the earlier op was: without the step's k/v. Models as in `server.bench.cpu_dtype`
(`smollm2`, `llama-125m`, or a model directory; random weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

import torch

from server.bench.cpu_dtype import _config_dir, _step_inputs, build_runner


def load_revision(rev: str, directory: Path) -> types.ModuleType:
    """`kernels/batched.py` as it was at `rev`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:kernels/batched.py"], check=True, capture_output=True, text=True).stdout
    path = directory / f"batched_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.inference_mode()
def step_seconds(runner, inputs) -> float:
    ids, positions, meta, last_rows = inputs
    start = time.process_time()
    hidden = runner.model(ids, positions, runner.kv_caches, meta)
    runner.model.compute_logits(hidden[last_rows])
    return time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("dtype")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--baseline", required=True, help="git revision whose kernels/batched.py is the baseline")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    use_baseline = [False]
    with tempfile.TemporaryDirectory() as tmp:
        baseline = load_revision(ns.baseline, Path(tmp))
        runner = build_runner(_config_dir(ns.model, Path(tmp)), ns.dtype, max(ns.context, ns.prefill))
        for module in runner.model.modules():
            ops = getattr(module, "ops", None)
            if ops is not None and dataclasses.is_dataclass(ops):
                current = ops.paged_attention

                def either(*args, k=None, v=None, current=current, **kwargs):
                    if use_baseline[0]:
                        return baseline.paged_attention(*args, **kwargs)
                    return current(*args, k=k, v=v, **kwargs)

                module.ops = dataclasses.replace(ops, paged_attention=either)
        cases = {f"decode b={b}": _step_inputs(b, 1, ns.context) for b in map(int, ns.batches.split(","))}
        cases[f"prefill {ns.prefill}"] = _step_inputs(1, ns.prefill, ns.prefill)
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in range(ns.rounds):
            for case, inputs in cases.items():
                for side in (True, False):
                    use_baseline[0] = side
                    step_seconds(runner, inputs)
                    times.setdefault((case, side), []).append(min(step_seconds(runner, inputs) for _ in range(3)))
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"{ns.model} {ns.dtype}, context {ns.context}, threads {ns.threads}, baseline {ns.baseline}, load {' '.join(load)}")
    print("| step | baseline ms | this tree ms | speed-up |")
    for case in cases:
        before, after = (statistics.median(times[(case, side)]) * 1e3 for side in (True, False))
        print(f"| {case} | {before:.1f} | {after:.1f} | {before / after:.2f}x |")


if __name__ == "__main__":
    main()
