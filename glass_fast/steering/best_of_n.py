"""Best-of-N: K independent samples per group from any sampler, keep the highest reward."""
from __future__ import annotations

import math

import torch

from ..model import FlowModel
from ..sampling import METHODS, Sampler
from ..transitions import FiniteGuard
from .result import Meter, SteeringResult, best_of_groups, check_particles

_SAMPLER_KWARGS = ("transitions", "inner_steps", "rho", "solver", "sigmabar0", "generator", "guidance",
                   "timings", "progress", "compile", "cuda_graph", "max_batch", "grid")


def best_of_n(model: FlowModel, reward, noise: torch.Tensor, *, method: str = "glass",
              **sampler_kwargs) -> SteeringResult:
    """Sample B groups of K particles independently and select the highest-reward particle per group.

    Args:
        model: the FlowModel.
        reward: callable(x [N, ...]) -> Tensor[N], larger is better.
        noise: [B, K, ...] initial noise (K = N candidates per group).
        method: "glass" | "ode" | "sde" | "plugin".
        **sampler_kwargs: transitions, inner_steps, rho, solver, sigmabar0, generator, guidance (as in
            ``glass_fast.sample``); compile, cuda_graph, max_batch (see ``Sampler``); timings (see
            ``fk_steering``); progress (tqdm bar).
    Returns:
        SteeringResult: samples [B, K, ...] with equal log_weights (the samples are draws of p, not p_r),
        rewards [B, K], best [B, ...] (the argmax), nfe, reward_calls (1), timings.

    Example:
        >>> res = best_of_n(model, lambda x: x[:, 0], torch.randn(4, 8, 2), method="ode")
    """
    unknown = sorted(set(sampler_kwargs) - set(_SAMPLER_KWARGS))
    if unknown:
        raise TypeError(f"best_of_n got unexpected keyword arguments {unknown}; allowed: {_SAMPLER_KWARGS}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    generator = sampler_kwargs.pop("generator", None)
    guidance = sampler_kwargs.pop("guidance", None)
    timings = sampler_kwargs.pop("timings", None)
    progress = sampler_kwargs.pop("progress", False)
    b, k = check_particles(model, reward, noise, generator)
    n, rest = b * k, tuple(noise.shape[2:])
    meter = Meter(model, noise.device, timings, max_batch=sampler_kwargs.pop("max_batch", None),
                  graphs=bool(sampler_kwargs.get("cuda_graph", False)))
    sampler = Sampler(meter.model, method=method, device=noise.device, dtype=noise.dtype, **sampler_kwargs)
    guard = FiniteGuard(noise.device)
    x = noise.reshape((n,) + rest)
    steps = range(sampler.transitions)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="best_of_n", unit="transition")
    for i in steps:
        x = sampler.step(i, x, generator=generator, guard=guard, guidance=guidance)
    guard.raise_if_bad()
    r = meter.reward(reward, x, "in best_of_n")
    nfe, reward_calls, secs = meter.close(n)
    samples, rewards = x.reshape(noise.shape), r.reshape(b, k)
    log_w = torch.full((b, k), -math.log(k), dtype=torch.float64, device=noise.device)
    return SteeringResult(samples=samples, log_weights=log_w, rewards=rewards, best=best_of_groups(samples, rewards),
                          nfe=nfe, reward_calls=reward_calls, timings=secs)
