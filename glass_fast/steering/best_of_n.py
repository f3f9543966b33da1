"""Best-of-N: K independent samples per group from any sampler, keep the highest reward."""
from __future__ import annotations

import math

import torch

from ..model import FlowModel
from ..sampling import check_eager_guidance, check_hooks
from ..transitions import FiniteGuard
from .result import (SteeringResult, best_of_groups, check_model_and_reward, check_particles,
                     check_selection_rewards, check_timings, metered_sampler, progress_bar)
from .settings import sampler_settings


class BestOfN:
    """Best-of-N with its settings bound once, reusable across batches (for serving).

    ``BestOfN(model, reward, **settings)(noise)`` equals ``best_of_n(model, reward, noise, **settings)``;
    the Sampler, with its compiled code or CUDA graphs, is kept across calls (built once per device and
    dtype, captured once per batch shape). One call at a time per object.

    Args:
        model: the FlowModel.
        reward: callable(x [N, ...]) -> Tensor[N], larger is better.
        method: "glass" | "ode" | "sde" | "plugin".
        transitions, inner_steps, rho, solver, sigmabar0, grid: the sampler (see ``Sampler``; sigmabar0 is
            GLASS's and the plug-in kernel's: leave it at 1.0 for "ode" and "sde").
        guidance: optional hook (e.g. ``RewardGuidance``) applied after every model call (eager only).
        compile, cuda_graph, max_batch: see ``Sampler``. timings: see ``fk_steering``.
    """

    def __init__(self, model: FlowModel, reward, *, method: str = "glass", transitions: int | None = None,
                 inner_steps: int = 10, rho=None, solver: str = "euler", sigmabar0: float = 1.0,
                 guidance=None, timings: bool | None = None, compile=None, cuda_graph: bool = False,
                 max_batch: int | None = None, grid: torch.Tensor | None = None):
        check_model_and_reward(model, reward)
        check_hooks(guidance, None)
        # Refused here, before any model call.
        self.settings = sampler_settings(method=method, transitions=transitions, inner_steps=inner_steps, rho=rho,
                                         solver=solver, sigmabar0=sigmabar0, grid=grid, compile=compile,
                                         cuda_graph=cuda_graph, max_batch=max_batch)
        check_eager_guidance(guidance, compile, cuda_graph)
        self.model, self.reward, self.guidance, self.timings = model, reward, guidance, check_timings(timings)
        self._parts: dict = {}

    def _build(self, device: torch.device, dtype: torch.dtype):
        """(meter, sampler) for particles of this device and dtype."""
        key = (device, dtype)
        if key not in self._parts:
            self._parts[key] = metered_sampler(self.model, device, dtype, timings=self.timings, **self.settings)
        return self._parts[key]

    @torch.no_grad()   # as Sampler.run: no graph of the network calls is kept
    def __call__(self, noise: torch.Tensor, *, generator: torch.Generator | None = None,
                 progress: bool = False, project=None) -> SteeringResult:
        """Sample ``noise`` [B, K, ...] and keep the best of each group (see ``best_of_n``)."""
        b, k = check_particles(self.model, self.reward, noise, generator)
        check_hooks(None, None, project)
        n, rest = b * k, tuple(noise.shape[2:])
        meter, sampler = self._build(noise.device, noise.dtype)
        meter.begin()
        guard = FiniteGuard(noise.device)
        guard.check_input(noise, "noise")
        x = noise.reshape((n,) + rest)
        for i in progress_bar(range(sampler.transitions), progress, "best_of_n"):
            x = sampler.step(i, x, generator=generator, guard=guard, guidance=self.guidance, project=project)
        r = meter.reward(self.reward, x, "in best_of_n", guard)
        nfe, reward_calls, secs = meter.close(n)
        samples, rewards = x.reshape(noise.shape), r.reshape(b, k)
        bad = ~torch.isfinite(rewards)
        last = sampler.transitions - 1
        # One host read for every record of the run (model outputs, non-finite rewards), after the reward.
        # The first invalid reward's flat index (n: none), read with the rest to name it in the warning.
        first = torch.where(bad.reshape(-1), torch.arange(n, device=bad.device), n).min()
        (bad,), dead_at, (first,) = guard.read(bad.sum(), torch.where(bad.all(-1), last, -1), first)
        check_selection_rewards(bad, dead_at, sampler.grid, "best_of_n", divmod(first, k) if bad else None)
        log_w = torch.full((b, k), -math.log(k), dtype=torch.float64, device=noise.device)
        return SteeringResult(samples=samples, log_weights=log_w, rewards=rewards,
                              best=best_of_groups(samples, rewards), nfe=nfe, reward_calls=reward_calls,
                              timings=secs)


def best_of_n(model: FlowModel, reward, noise: torch.Tensor, *, method: str = "glass",
              transitions: int | None = None, inner_steps: int = 10, rho=None, solver: str = "euler",
              sigmabar0: float = 1.0, guidance=None, generator: torch.Generator | None = None,
              progress: bool = False, timings: bool | None = None, compile=None, cuda_graph: bool = False,
              max_batch: int | None = None, grid: torch.Tensor | None = None, project=None) -> SteeringResult:
    """Sample B groups of K particles independently and select the highest-reward particle per group.

    Args:
        model: the FlowModel.
        reward: callable(x [N, ...]) -> Tensor[N], larger is better.
        noise: [B, K, ...] initial noise (K = N candidates per group).
        method, transitions, inner_steps, rho, solver, sigmabar0, guidance, timings, compile, cuda_graph,
            max_batch, grid: see ``BestOfN`` (keep one of those to reuse compiled code or CUDA graphs across
            batches).
        generator: randomness of the sampler. progress: tqdm bar over transitions.
        project: optional fn(k, t, x) -> x applied to the states after every transition (``Sampler.run``).
    Returns:
        SteeringResult: samples [B, K, ...] with equal log_weights (the samples are draws of p, not p_r),
        rewards [B, K], best [B, ...] (the argmax over valid rewards), nfe, reward_calls (1), timings.

    Raises:
        RuntimeError: every reward of a group was NaN or Inf (no best exists); fewer such rewards only warn,
        naming the first (they never win). Also when the reward edits its input in place (the samples).

    Example:
        >>> res = best_of_n(model, lambda x: x[:, 0], torch.randn(4, 8, 2), method="ode")
    """
    best = BestOfN(model, reward, method=method, transitions=transitions, inner_steps=inner_steps, rho=rho,
                   solver=solver, sigmabar0=sigmabar0, guidance=guidance, timings=timings, compile=compile,
                   cuda_graph=cuda_graph, max_batch=max_batch, grid=grid)
    return best(noise, generator=generator, progress=progress, project=project)
