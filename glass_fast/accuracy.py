"""Accuracy per model call: KS distance of one transition to its exact law on a Gaussian mixture.

The table behind the README's solver comparison; ``python benchmarks/bench_accuracy.py`` prints it.
"""
from __future__ import annotations

import numbers

import torch

from .mixtures import GaussianMixture, ks_critical, ks_statistic, mixture_cdf, standard_mixture
from .plan import check_calls
from .schedules import LinearSchedule
from .transitions import glass_transition, sde_transition

PROJECTIONS = ([1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6])
METHODS = ("glass-euler", "glass-midpoint", "glass-heun", "sde")


def transition_ks(method: str, calls: int, t: float, t_next: float, *, n: int = 20000, rho=0.4,
                  mixture: GaussianMixture | None = None, seed: int = 0) -> float:
    """Max KS distance over four projections between n transitions from one x_t and the exact law.

    SDE transitions are compared with the DDPM law (rho = "ddpm"), GLASS ones with the law of their rho.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = check_calls(n, "n")
    gm = mixture or standard_mixture()
    if not isinstance(gm, GaussianMixture) or gm.dim != 2:
        raise ValueError(f"mixture must be a 2-D GaussianMixture (the projections are 2-D), got {gm!r}")
    sch = LinearSchedule()
    model = gm.flow_model(sch, "velocity")
    x_cond = gm.marginal_sample(sch, t, 1, torch.Generator().manual_seed(seed))
    x = x_cond.float().repeat(n, 1)
    gen = torch.Generator().manual_seed(seed + 1)
    if method == "sde":
        law_rho = "ddpm"
        y = sde_transition(model, x, t, t_next, steps=calls, generator=gen)
    else:
        law_rho = rho
        y = glass_transition(model, x, t, t_next, rho=rho, inner_steps=calls, solver=method.split("-")[1], generator=gen)
    w, mu, var = gm.transition_law(x_cond, t, t_next, law_rho, sch)
    y = y.double()
    worst = 0.0
    for d in PROJECTIONS:
        u = torch.tensor(d, dtype=torch.float64)
        worst = max(worst, ks_statistic(y @ u, lambda v: mixture_cdf(v, w[0], mu[0], var[0], u)))
    return worst


def accuracy_table(calls=(2, 4, 8, 16, 32), *, n: int = 20000, transitions: int = 5, rho=0.4,
                   methods=METHODS, seed: int = 0) -> dict:
    """KS per (method, calls), worst over the interior transitions of a ``transitions`` grid and at t' = 1.

    ``seed`` picks the conditioning points and the noise (every method and call count gets the same ones).

    Returns:
        {"interior": {method: {calls: ks}}, "final": {...}, "critical": KS critical value at the 0.1% level}.
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be drawn from {METHODS}, got {m!r}")
    if isinstance(transitions, bool) or not isinstance(transitions, numbers.Integral) or transitions < 2:
        raise ValueError(f"transitions must be an integer >= 2 (at least one interior transition), "
                         f"got {transitions!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    grid = torch.linspace(0, 1, transitions + 1).tolist()
    out = {"interior": {}, "final": {}, "critical": ks_critical(n, 0.001), "n": n}
    for method in methods:
        out["interior"][method], out["final"][method] = {}, {}
        for c in calls:
            if method in ("glass-midpoint", "glass-heun") and c % 2:
                continue
            # transition_ks uses seeds s and s + 1: a stride of transitions + 1 keeps seeds apart (seed 0: s = k)
            ks = [transition_ks(method, c, grid[k], grid[k + 1], n=n, rho=rho, seed=seed * (transitions + 1) + k)
                  for k in range(transitions)]
            out["interior"][method][c] = max(ks[:-1])
            out["final"][method][c] = ks[-1]
    return out


def format_table(result: dict) -> str:
    """Markdown table: one row per method, one column per call count, interior / final."""
    methods = list(result["interior"])
    calls = sorted({c for m in methods for c in result["interior"][m]})
    lines = ["| method | " + " | ".join(f"{c} calls" for c in calls) + " |",
             "|---|" + "---|" * len(calls)]
    for m in methods:
        cells = []
        for c in calls:
            if c not in result["interior"][m]:
                cells.append("-")
                continue
            i, f = result["interior"][m][c], result["final"][m][c]
            mark = "**" if i < result["critical"] else ""
            cells.append(f"{mark}{i:.4f}{mark} / {f:.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(f"\nKS distance, worst interior transition / final transition (t' = 1); n = {result['n']}; "
                 f"0.1% critical value {result['critical']:.4f} (bold: interior below it).")
    return "\n".join(lines)
