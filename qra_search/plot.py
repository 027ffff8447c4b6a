"""The Pareto front as a PNG (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os


def plot_front(result, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    front = [(o["memory_bytes"] / 2**20, o["quality"]) for _, o in result.pareto]
    ax.plot(*zip(*front), "o-", color="tab:blue", label="Pareto front (searched)")
    uni = [(o["memory_bytes"] / 2**20, o["quality"], a) for a, o in result.baselines]
    ax.scatter([u[0] for u in uni], [u[1] for u in uni], marker="s", color="tab:orange",
               label="uniform bits (rank 0 / default rank)", zorder=3)
    for m, q, a in uni:
        s = next(iter(a.layers.values()))
        ax.annotate(f"{s['bits']}b r{s['rank']}", (m, q), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    b = result.best.objectives
    ax.scatter([b["memory_bytes"] / 2**20], [b["quality"]], marker="*", s=200, color="tab:red",
               label="chosen", zorder=4)
    if result.budget.get("memory_bytes"):
        ax.axvline(result.budget["memory_bytes"] / 2**20, ls="--", color="grey", label="budget")
    ax.set_yscale("log")
    ax.set_xlabel("quantized linear layers + adapters (MiB, measured bytes)")
    ax.set_ylabel("KL(float ‖ quantized) per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
