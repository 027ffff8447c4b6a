"""Turning a sweep's rows into what a reader compares: speed-ups over each peer, a table,
and a PNG (fraction of bandwidth vs M per bit-width; speed-up over each peer vs M).
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Tuple

__all__ = ["speedups", "summarize", "format_table", "write_json", "write_png"]


def _ok(rows: Iterable[dict]) -> List[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _case_key(r: dict) -> Tuple:
    return (r["model"], r["layer"], r["out_features"], r["in_features"], r["rank"], r["M"])


def speedups(rows: Iterable[dict]) -> List[dict]:
    """One entry per (qra backend row, peer row) measuring the same case: same shape,
    rank and M, and the same bit-width unless the peer stores a float weight.
    ``speedup = peer time / qra time`` (> 1: qra is faster)."""
    ok = _ok(rows)
    peers: Dict[Tuple, List[dict]] = defaultdict(list)
    for r in ok:
        if r["family"] == "peer":
            peers[_case_key(r)].append(r)
    out = []
    for q in ok:
        if q["family"] != "qra":
            continue
        for p in peers.get(_case_key(q), ()):
            if p["bits"] is not None and p["bits"] != q["bits"]:
                continue
            out.append({"qra": q["implementation"], "peer": p["implementation"],
                        "model": q["model"], "layer": q["layer"], "bits": q["bits"],
                        "rank": q["rank"], "M": q["M"],
                        "speedup": p["median_us"] / q["median_us"],
                        "memory_ratio": (p["weight_bytes"] / q["weight_bytes"]
                                         if q["weight_bytes"] else None)})
    return out


def _geomean(xs: List[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def summarize(rows: Iterable[dict]) -> Dict[str, dict]:
    """Per "qra backend vs peer": geometric-mean, worst and best speed-up over the cases
    both ran, and the M range where qra is ahead."""
    groups: Dict[Tuple[str, str], List[dict]] = defaultdict(list)
    for s in speedups(rows):
        groups[(s["qra"], s["peer"])].append(s)
    out = {}
    for (q, p), items in sorted(groups.items()):
        xs = [i["speedup"] for i in items]
        by_m: Dict[int, List[float]] = defaultdict(list)
        for i in items:
            by_m[i["M"]].append(i["speedup"])
        out[f"{q} vs {p}"] = {
            "cases": len(items),
            "geomean_speedup": _geomean(xs),
            "min_speedup": min(xs),
            "max_speedup": max(xs),
            "geomean_speedup_by_M": {str(m): _geomean(v) for m, v in sorted(by_m.items())},
            "ahead_in": sum(x > 1 for x in xs),
        }
    return out


def format_table(report: dict, max_rows: Optional[int] = None) -> str:
    """A plain-text table of the measured rows and the speed-up summary."""
    rows = report["rows"]
    head = (f"{'implementation':<26}{'shape':<34}{'bits':>5}{'r':>4}{'M':>6}"
            f"{'us':>11}{'GB/s':>8}{'%BW':>7}{'peak MiB':>10}")
    lines = [head, "-" * len(head)]
    shown = rows if max_rows is None else rows[:max_rows]
    for r in shown:
        shape = f"{r['model']}.{r['layer']}[{r['out_features']}x{r['in_features']}]"
        bits = "-" if r["bits"] is None else str(r["bits"])
        if r["status"] != "ok":
            lines.append(f"{r['implementation']:<26}{shape:<34}{bits:>5}{r['rank']:>4}"
                         f"{r['M']:>6}  {r['status']}: {r.get('reason')}")
            continue
        mem = r.get("peak_call_memory_bytes")
        mem_s = "n/a" if mem is None else f"{mem / 2**20:.2f}"
        lines.append(f"{r['implementation']:<26}{shape:<34}{bits:>5}{r['rank']:>4}{r['M']:>6}"
                     f"{r['median_us']:>11.1f}{r['achieved_GBps']:>8.2f}"
                     f"{100 * r['bandwidth_fraction']:>6.1f}%{mem_s:>10}")
    if max_rows is not None and len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more rows in the JSON")
    limit = report["hardware_limit"]
    lines.append("")
    lines.append(f"hardware limit: {limit['copy_bandwidth_GBps']:.1f} GB/s copy bandwidth "
                 f"({limit['method']})")
    summary = report.get("summary") or summarize(rows)
    if summary:
        lines.append("")
        lines.append(f"{'speed-up (peer time / qra time)':<52}{'cases':>6}{'geomean':>9}"
                     f"{'min':>8}{'max':>8}  by M")
        for name, s in summary.items():
            by_m = " ".join(f"{m}:{v:.2f}" for m, v in s["geomean_speedup_by_M"].items())
            lines.append(f"{name:<52}{s['cases']:>6}{s['geomean_speedup']:>9.2f}"
                         f"{s['min_speedup']:>8.2f}{s['max_speedup']:>8.2f}  {by_m}")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=False)
        f.write("\n")


def write_png(report: dict, path: str) -> None:
    """Left: fraction of copy bandwidth vs M, one line per (implementation, bits), geometric
    mean over shapes at rank 0. Right: speed-up of each qra backend over each peer vs M,
    geometric mean over shapes, bit-widths and ranks (dashed line: parity)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(report["rows"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    # Colour says which implementation, line style which bit-width (left) or which qra
    # backend (right): with a dozen lines a colour cycle alone repeats.
    names = sorted({r["implementation"] for r in ok})
    palette = plt.get_cmap("tab20").colors
    colour = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    bit_style = {2: "-", 3: "--", 4: "-.", 8: ":", None: "-"}
    lines: Dict[Tuple[str, object], Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        if r["rank"] == 0:
            lines[(r["implementation"], r["bits"])][r["M"]].append(r["bandwidth_fraction"])
    for (impl, bits), by_m in sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1] or 99)):
        ms = sorted(by_m)
        label = f"{impl} {'float' if bits is None else f'{bits}-bit'}"
        ax1.plot(ms, [_geomean(by_m[m]) for m in ms], bit_style.get(bits, "-"),
                 color=colour[impl], marker="o" if impl.startswith("qra:") else "s",
                 markersize=3, linewidth=2.2 if impl.startswith("qra:") else 1.2, label=label)
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("M (rows of x)")
    ax1.set_ylabel("bytes read / time ÷ copy bandwidth")
    ax1.set_title("Fraction of measured copy bandwidth (rank 0; style = bits)")
    ax1.legend(fontsize=6, ncol=2)
    ax1.grid(True, which="both", alpha=0.3)

    per: Dict[Tuple[str, str], Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    for s in speedups(report["rows"]):
        per[(s["qra"], s["peer"])][s["M"]].append(s["speedup"])
    backend_style = {}
    for (q, p), by_m in sorted(per.items()):
        style = backend_style.setdefault(q, ["-", "--", "-.", ":"][len(backend_style) % 4])
        ms = sorted(by_m)
        ax2.plot(ms, [_geomean(by_m[m]) for m in ms], style, color=colour.get(p, "k"),
                 marker="o", markersize=3, label=f"{q} vs {p}")
    ax2.axhline(1.0, color="k", linestyle=":", linewidth=1)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("M (rows of x)")
    ax2.set_ylabel("peer time / qra time  (> 1: qra faster)")
    ax2.set_title("Speed-up over each peer (colour = peer, style = qra backend)")
    ax2.legend(fontsize=6, ncol=2)
    ax2.grid(True, which="both", alpha=0.3)

    m = report["machine"]
    where = m.get("gpu", {}).get("name") if m.get("gpu") else m.get("cpu_model")
    fig.suptitle(f"qra bench — {where}, {report['started_utc']}, "
                 f"copy bandwidth {report['hardware_limit']['copy_bandwidth_GBps']:.1f} GB/s",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
