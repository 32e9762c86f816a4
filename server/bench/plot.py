"""Sweep charts (matplotlib, the optional `bench` extra): throughput, TTFT and ITL against load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"pagedserve": "tab:blue", "vllm": "tab:orange"}
LABELS = {"pagedserve": "pagedserve", "vllm": "vLLM (CPU)"}


def plot_sweep(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from server.bench.compare import point_figures

    sweep = report["sweep"]
    by_conc = all(p["max_concurrency"] for p in sweep)
    xs = [p["max_concurrency"] if by_conc else float(p["request_rate"]) if p["request_rate"] != "inf" else float("nan")
          for p in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for server in report["results"]:
        figs = [point_figures(report, server, i) for i in range(len(sweep))]
        color = COLORS.get(server)
        label = LABELS.get(server, server)
        axes[0].plot(xs, [f.get("output_throughput") for f in figs], "o-", color=color, label=label)
        for key, style, pct in (("ttft_p50", "o-", "p50"), ("ttft_p99", "s--", "p99")):
            axes[1].plot(xs, [f.get(key) for f in figs], style, color=color, label=f"{label} {pct}")
        for key, style, pct in (("itl_p50", "o-", "p50"), ("itl_p99", "s--", "p99")):
            axes[2].plot(xs, [f.get(key) for f in figs], style, color=color, label=f"{label} {pct}")
    xlabel = "max concurrency (requests in flight)" if by_conc else "request rate (req/s, Poisson)"
    titles = ("Output throughput (tok/s)", "Time to first token (ms)", "Inter-token latency (ms)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if by_conc:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        ax.legend(fontsize=8)
    from matplotlib.ticker import FuncFormatter

    for ax in axes[1:]:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else ""))
    s = report["settings"]
    fig.suptitle(f"{report['name']}: {report['workload']} ({s['dtype']}, {s['threads']} compute thread(s), {report['date']})",
                 fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
