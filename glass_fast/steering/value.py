"""Value estimates V_t(x) = log E[exp(r(z)) | x_t = x] from GLASS posterior samples (MATH.md section 4).

Posterior sampling is a GLASS transition with t' = 1 (gamma_bar = 0, alpha_bar = 1, sigma_bar = 0), so z_i
are n independent draws of p(z | x_t) and V is estimated by logmeanexp_i r(z_i) (consistent as n grows,
biased low for finite n by Jensen). The s = 0 model call of that transition is D_t(x), the same for every
draw of a particle: when the caller already has it (FK steering does), it is reused.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..model import FlowModel
from ..plan import check_calls, check_solver
from ..sampling import Sampler
from ..transitions import FiniteGuard, check_state, stage_labels
from .result import check_reward, metered_sampler


def logmeanexp(r: torch.Tensor) -> torch.Tensor:
    """log mean exp over the last dim, in float64."""
    r = r.to(torch.float64)
    return torch.logsumexp(r, dim=-1) - math.log(r.shape[-1])


class PosteriorValue:
    """V_t at one fixed time t < 1, planned once (used by FK steering at every grid time).

    Args:
        model: FlowModel; t: float in [0, 1); samples: posterior draws per particle; inner_steps, rho,
        solver, sigmabar0: the GLASS posterior transition; device, dtype: of the particles; final_index: the
        index of t = 1 on the caller's grid (what a ``project`` hook is told of the draws).
    """

    def __init__(self, model: FlowModel, t: float, *, samples: int, inner_steps: int, rho, solver: str,
                 device, dtype, final_index: int = 1, sigmabar0: float = 1.0):
        self.samples, self.final_index = samples, final_index
        grid = torch.tensor([float(t), 1.0], dtype=torch.float64)
        self.sampler = Sampler(model, method="glass", inner_steps=inner_steps, rho=rho, solver=solver,
                               sigmabar0=sigmabar0, device=device, dtype=dtype, grid=grid)
        # A non-finite model output is reported as the draws', not as "transition 0" of the caller's run.
        self.sampler.labels = [stage_labels(self.sampler.plans[0], f"the value estimate's posterior draws "
                                                                   f"(t={float(t):.4f} -> 1), ")]

    def __call__(self, x: torch.Tensor, score, *, denoised=None, first_output=None, generator=None, guard=None,
                 project=None) -> torch.Tensor:
        """[N] logmeanexp of ``score(z)`` ([M] -> [M]) over ``samples`` posterior draws z of each x [N, ...].
        ``denoised`` / ``first_output``: D_t(x) or the raw model output at (x, t), if already computed
        (``Sampler.step``). ``project``: the run's hook, applied to the draws at t = 1 as the run applies it
        to its final states (so that an inpainted region is scored as it will end)."""
        n = x.shape[0]
        xr = x.repeat_interleave(self.samples, dim=0)
        dr, outr = (None if v is None else v.repeat_interleave(self.samples, dim=0) for v in (denoised, first_output))
        at_end = None if project is None else (lambda _k, t, z: project(self.final_index, t, z))
        z = self.sampler.step(0, xr, generator=generator, denoised=dr, first_output=outr, guard=guard,
                              project=at_end)
        return logmeanexp(score(z).reshape(n, self.samples))


def values_on_grid(model: FlowModel, grid: torch.Tensor, samples: int, inner_steps: int, rho, solver: str,
                   device, dtype, sigmabar0: float = 1.0) -> dict:
    """{k: PosteriorValue at grid[k]} for the interior grid times k = 1 .. K - 1 (where steering and search
    estimate a state's value; grid[0] needs none and at grid[K] the reward itself is the value)."""
    return {k: PosteriorValue(model, float(grid[k]), samples=samples, inner_steps=inner_steps, rho=rho, solver=solver,
                              device=device, dtype=dtype, final_index=len(grid) - 1, sigmabar0=sigmabar0)
            for k in range(1, len(grid) - 1)}


def predicted_scores(sampler: Sampler, values: dict, k: int, x: torch.Tensor, score, *, generator, guard,
                     project) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Score states x at interior grid time k: transition k's first model call, made ahead (``Sampler.predict``),
    then the value estimate of each state (``values[k]``, its draws reusing that call) or, without value
    estimates, the reward of its x0-prediction.

    Returns:
        (the call's raw output, to hand to ``sampler.step(k, x, first_output=)``; scores [N]; model calls
        the value draws made, batched: the caller counts the rows beyond one per state).
    """
    out, d = sampler.predict(k, x)
    guard.check(d, sampler.labels[k][0])
    if not values:
        return out, score(d), 0
    calls = sampler.model.calls
    s = values[k](x, score, first_output=out, generator=generator, guard=guard, project=project)
    return out, s, sampler.model.calls - calls


def metered_parts(model: FlowModel, device, dtype, timings, value_samples: int | None, settings: dict) -> tuple:
    """(meter, sampler, value estimators by grid index; {} when ``value_samples`` is None): what a steering or
    search object builds once per device and dtype and reuses across batches. ``settings``: the checked
    ``sampler_settings``; the posterior draws of the value estimates take its GLASS settings (rho, solver,
    sigmabar0, inner_steps) whatever the proposal's method."""
    meter, sampler = metered_sampler(model, device, dtype, timings=timings, **settings)
    o = settings
    values = ({} if value_samples is None else
              values_on_grid(meter.model, sampler.grid, value_samples, o["inner_steps"], o["rho"], o["solver"],
                             device, dtype, o["sigmabar0"]))
    return meter, sampler, values


def value_estimate(model: FlowModel, reward, x: torch.Tensor, t, *, samples: int = 8, inner_steps: int = 10,
                   rho=0.4, solver: str = "euler", generator: torch.Generator | None = None,
                   denoised: torch.Tensor | None = None, sigmabar0: float = 1.0) -> torch.Tensor:
    """Estimate V_t(x) = log E[exp(r(z)) | x_t = x] with ``samples`` GLASS posterior samples per state.

    Args:
        model: the FlowModel.
        reward: callable(z [M, ...]) -> Tensor[M].
        x: [B, ...] states at time t.
        t: float in [0, 1] (at t = 1 the value is r(x)).
        samples: posterior draws per state (cost: samples * inner_steps model evaluations per state, one
            fewer per draw when ``denoised`` is given).
        inner_steps, rho, solver, sigmabar0: the GLASS posterior transition (rho does not change the law at
            t' = 1).
        generator: randomness of the draws.
        denoised: D_t(x) [B, ...] if already computed (saves the first model call).
    Returns:
        [B] float64 estimates.

    Example:
        >>> v = value_estimate(model, lambda z: z[:, 0], x_t, 0.4, samples=16)
    """
    check_state(model, x, generator)
    samples = check_calls(samples, "samples")
    inner_steps = check_calls(inner_steps, "inner_steps")
    check_solver(solver)
    if isinstance(t, torch.Tensor):
        if t.dim() != 0:
            raise ValueError(f"t must be a float (one time for the batch), got a Tensor of shape {tuple(t.shape)}")
        t = float(t)
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t must be a float in [0, 1], got {t!r}")
    if denoised is not None and (not isinstance(denoised, torch.Tensor) or denoised.shape != x.shape):
        # Checked here: past this point it is repeated per draw, and an error would quote the repeated shapes.
        got = f"shape {tuple(denoised.shape)}" if isinstance(denoised, torch.Tensor) else type(denoised).__name__
        raise ValueError(f"denoised must be None or D_t(x), a Tensor of x's shape {tuple(x.shape)}, got {got}")
    if float(t) == 1.0:
        return check_reward(reward(x), x, "value_estimate at t = 1").to(torch.float64)
    guard = FiniteGuard(x.device)
    value = PosteriorValue(model, float(t), samples=samples, inner_steps=inner_steps, rho=rho, solver=solver,
                           device=x.device, dtype=x.dtype, sigmabar0=sigmabar0)
    v = value(x, lambda z: check_reward(reward(z), z, "value_estimate"), denoised=denoised,
              generator=generator, guard=guard)
    guard.raise_if_bad()
    return v
