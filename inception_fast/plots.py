"""PNG charts for the profiler and the benchmark (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bench import BenchReport
    from .profile import ProfileReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on these machines
    import matplotlib.pyplot as plt

    return plt


def plot_profile(report: "ProfileReport", path: str | Path) -> Path:
    """Bars of MACs per layer, the cumulative curve, and the budget as a horizontal line."""
    plt = _pyplot()
    # The rows that add up to the total: no nested subtotals, no auxiliary heads outside it.
    rows = [r for r in report.leaf_rows() if r.output_shape is not None or r.macs]
    names = [r.name for r in rows]
    macs = [r.macs / 1e6 for r in rows]
    cumulative = [sum(macs[: i + 1]) for i in range(len(macs))]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 5))
    ax.bar(names, macs, color="#4c72b0", label="MACs per layer")
    ax.set_ylabel("M multiply-adds per layer")
    ax.tick_params(axis="x", rotation=70)
    ax2 = ax.twinx()
    ax2.plot(names, cumulative, color="#dd8452", marker="o", label="cumulative")
    if report.budget:
        ax2.axhline(report.budget / 1e6, color="#c44e52", linestyle="--", label=f"budget {report.budget / 1e9:g} G")
    ax2.set_ylabel("cumulative M multiply-adds")
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left")
    ax.set_title(f"Multiply-adds per layer, input {report.inputs or '×'.join(map(str, report.input_size))}: "
                 f"{report.total_macs / 1e9:.3f} G total")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_speedups(report: "BenchReport", path: str | Path) -> Path:
    """Grouped bars: speedup of the fused block over each peer, per block and batch."""
    from .bench import PEERS

    plt = _pyplot()
    peers = [p for p in PEERS if any(p in c.ms for c in report.cases)]
    labels = [f"{c.block}\nN={c.batch}" for c in report.cases]
    width = 0.8 / max(1, len(peers))
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(labels)), 4.5))
    for k, peer in enumerate(peers):
        xs = [i + (k - (len(peers) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [c.speedup(peer) or 0 for c in report.cases], width, label=f"vs {peer}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("speedup of fused (×)")
    ax.set_title(f"Fused Inception forward, {report.machine['cpu']}, {report.machine['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
