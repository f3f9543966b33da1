"""Markdown tables for the digits experiments (rows come from ``glass_fast.zoo.experiments``)."""
from __future__ import annotations

from collections import defaultdict


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def quality_table(rows: list[dict]) -> str:
    """Plain samplers: method, model calls, Frechet distance, class diversity, confident rate, seconds."""
    body = [[r["method"], str(int(r["nfe"])) if r["nfe"] else "-", f"{r['frechet']:.2f}", f"{r['diversity']:.2f}",
             f"{r['confident']:.3f}", f"{r['seconds']:.2f}" if r["seconds"] else "-"] for r in rows]
    return _table(["sampler", "model calls", "Frechet dist. (lower is better)", "class diversity (max 10)",
                   "confident (p > 0.9)", "seconds"], body)


def steering_table(rows: list[dict]) -> str:
    """One steering comparison: method, calls per output, mean log p(target), success, Frechet, seconds."""
    body = [[r["method"], str(int(r["nfe"])), f"{r['log_prob']:.3f}", f"{r['success']:.3f}", f"{r['frechet']:.2f}",
             f"{r['seconds']:.2f}"] for r in rows]
    return _table(["method", "model calls / output", "mean log p(target)", "success", "Frechet to target digit",
                   "seconds"], body)


def steering_summary(rows: list[dict]) -> str:
    """Table 1 in miniature: per method, the mean over target digits of each metric, plus the worst digit."""
    by_method = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    body = []
    for method, rs in by_method.items():
        n = len(rs)
        body.append([method, str(int(rs[0]["nfe"])), f"{sum(r['log_prob'] for r in rs) / n:.3f}",
                     f"{sum(r['success'] for r in rs) / n:.3f}", f"{min(r['success'] for r in rs):.3f}",
                     f"{sum(r['frechet'] for r in rs) / n:.2f}"])
    return _table(["method", "model calls / output", "mean log p(target)", "success (mean)",
                   "success (worst digit)", "Frechet to target digit (mean)"], body)


def steering_per_digit(rows: list[dict], metric: str = "log_prob") -> str:
    """One column per target digit, one row per method, showing ``metric``."""
    digits = sorted({r["digit"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["digit"]): r[metric] for r in rows}
    fmt = "{:.2f}" if metric == "frechet" else "{:.3f}"
    body = [[m] + [fmt.format(cell[(m, d)]) for d in digits] for m in methods]
    return _table(["method"] + [str(d) for d in digits], body)


def curve_table(series: dict) -> str:
    """name -> (x values, y values) as a table: one row per name, one column per x (blank where absent)."""
    xs = sorted({x for xv, _ in series.values() for x in xv})
    body = []
    for name, (xv, yv) in series.items():
        vals = dict(zip(xv, yv))
        body.append([name] + [f"{vals[x]:.3f}" if x in vals else "" for x in xs])
    return _table(["method"] + [f"{x:g} calls" for x in xs], body)
