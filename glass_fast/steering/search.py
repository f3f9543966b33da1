"""Beam search over stochastic transitions: expand every beam with several transitions, keep the best.

Groups of K beams x [B, K, ...]. At each transition every beam draws ``expansions`` children from the
stochastic kernel (GLASS by default) in one batched step; each child is scored by the reward of its
x0-prediction r(D_{t_{k+1}}(child)) (at t = 1 by r(x_1)); each group keeps its K best children. The
x0-prediction of a kept child is its next transition's first model call (handed in, as FK steering
does), so a search costs expansions x the plain sampler's model calls (transitions x inner_steps for GLASS)
per beam, less expansions - 1: D_{t_0} is computed once and shared by a beam's first children.

Unlike FK steering, search is greedy: the kept beams are not a weighted sample of p_r but high-reward
points (the deterministic selection of MATH.md section 4's "value ... usable for search").
"""
from __future__ import annotations

import math

import torch

from ..model import FlowModel
from ..plan import check_calls
from ..sampling import check_hooks, follow
from ..transitions import FiniteGuard
from .result import (SteeringResult, best_of_groups, check_model_and_reward, check_particles,
                     check_selection_rewards, check_timings, progress_bar)
from .settings import sampler_settings
from .value import metered_parts, predicted_scores


class BeamSearch:
    """Beam search with its settings bound once, reusable across batches (for serving).

    ``BeamSearch(model, reward, **settings)(noise)`` equals ``beam_search(model, reward, noise, **settings)``;
    the Sampler, with its compiled code or CUDA graphs, and the value estimators are kept across calls (built
    once per device and dtype). One call at a time per object. Settings as in ``beam_search``.
    """

    def __init__(self, model: FlowModel, reward, *, expansions: int = 4, method: str = "glass",
                 transitions: int | None = None, inner_steps: int = 10, rho=None, solver: str = "euler",
                 sigmabar0: float = 1.0, timings: bool | None = None, max_batch: int | None = None,
                 grid: torch.Tensor | None = None, value_samples: int | None = None, compile=None,
                 cuda_graph: bool = False):
        check_model_and_reward(model, reward)
        self.expansions = check_calls(expansions, "expansions")
        self.value_samples = None if value_samples is None else check_calls(value_samples, "value_samples")
        if method == "ode":
            raise ValueError("method='ode' is deterministic: every child of a beam would be the same; "
                             "use 'glass', 'sde' or 'plugin'")
        # Refused here, before any beam is drawn.
        self.settings = sampler_settings(method=method, transitions=transitions, inner_steps=inner_steps, rho=rho,
                                         solver=solver, sigmabar0=sigmabar0, grid=grid, compile=compile,
                                         cuda_graph=cuda_graph, max_batch=max_batch)
        self.model, self.reward, self.timings = model, reward, check_timings(timings)
        self._parts: dict = {}

    def _build(self, device: torch.device, dtype: torch.dtype):
        """(meter, sampler, value estimators by grid index, grid times on the device) for beams of this
        device and dtype."""
        key = (device, dtype)
        if key not in self._parts:
            meter, sampler, values = metered_parts(self.model, device, dtype, self.timings, self.value_samples,
                                                   self.settings)
            self._parts[key] = (meter, sampler, values)
        return self._parts[key]

    @torch.no_grad()   # as Sampler.run: no graph of the network calls is kept
    def __call__(self, noise: torch.Tensor, *, generator: torch.Generator | None = None,
                 progress: bool = False, project=None) -> SteeringResult:
        """Search from noise [B, K, ...] (K beams per group); see ``beam_search``."""
        b, k_beams = check_particles(self.model, self.reward, noise, generator)
        check_hooks(None, None, project)
        n, rest, dev = b * k_beams, tuple(noise.shape[2:]), noise.device
        meter, sampler, values = self._build(dev, noise.dtype)
        meter.begin()
        m, grid, steps = meter.model, sampler.grid, sampler.transitions
        reward, expansions, value_samples = self.reward, self.expansions, self.value_samples
        guard = FiniteGuard(dev)
        guard.check_input(noise, "noise")

        def score(z):
            return meter.reward(reward, z, "in beam_search", guard).to(torch.float64)

        x = noise.reshape((n,) + rest)
        out, d = sampler.predict(0, x)   # transition 0's first model call, handed to it
        guard.check(d, sampler.labels[0][0])
        scores, value_calls = None, 0
        # Non-finite scores on the device (no host read in the loop): their count, and per group the first
        # transition where every child's score was non-finite (-1: never).
        bad_count = torch.zeros((), dtype=torch.int64, device=dev)
        dead_at = torch.full((b,), -1, dtype=torch.int64, device=dev)
        for k in progress_bar(range(steps), progress, "beam_search"):
            # Every beam's children in one batched transition, rows beam-major: beam i's children are
            # rows i * expansions ... (i + 1) * expansions - 1.
            children = sampler.step(k, x.repeat_interleave(expansions, dim=0), generator=generator,
                                    first_output=out.repeat_interleave(expansions, dim=0), guard=guard,
                                    project=project)
            if k + 1 < steps:
                out_children, s, calls = predicted_scores(sampler, values, k + 1, children, score,
                                                          generator=generator, guard=guard, project=project)
                if values:
                    value_calls += calls * expansions * (value_samples - 1)  # rows beyond the copies
            else:
                out_children = None
                s = meter.reward(reward, children, "in beam_search at t = 1", guard).to(torch.float64)
            # K best of each group's K x expansions children (NaN rewards never win), best first.
            s = s.reshape(b, k_beams * expansions)
            bad = ~torch.isfinite(s)
            bad_count = bad_count + bad.sum()
            dead_at = torch.where(bad.all(-1) & (dead_at < 0), k, dead_at)
            s = torch.where(bad, -math.inf, s)
            scores, keep = s.topk(k_beams, dim=1)
            rows = (keep + torch.arange(b, device=dev)[:, None] * (k_beams * expansions)).reshape(-1)
            x = children[rows]
            if project is not None:   # a hook's per-row data (Inpaint's noise) follows each beam's parent
                project = follow(project, rows // expansions)
            if out_children is not None:
                out = out_children[rows]
        # One host read for every record of the run (model outputs, non-finite scores).
        (bad_count,), dead_at = guard.read(bad_count, dead_at)
        check_selection_rewards(bad_count, dead_at, grid, "beam_search")
        # Every call after the first D_{t_0} ran on `expansions` copies of each beam (value draws on
        # value_samples copies of those): count each copy.
        meter.extra += (m.calls - 1) * (expansions - 1) + value_calls
        nfe, reward_calls, secs = meter.close(n)
        samples, rewards = x.reshape(noise.shape), scores
        log_w = torch.full((b, k_beams), -math.log(k_beams), dtype=torch.float64, device=dev)
        return SteeringResult(samples=samples, log_weights=log_w, rewards=rewards, best=best_of_groups(samples, rewards),
                              nfe=nfe, reward_calls=reward_calls, timings=secs)


def beam_search(model: FlowModel, reward, noise: torch.Tensor, *, expansions: int = 4, method: str = "glass",
                transitions: int | None = None, inner_steps: int = 10, rho=None, solver: str = "euler",
                sigmabar0: float = 1.0, generator: torch.Generator | None = None, progress: bool = False,
                timings: bool | None = None, max_batch: int | None = None, grid: torch.Tensor | None = None,
                value_samples: int | None = None, compile=None, cuda_graph: bool = False,
                project=None) -> SteeringResult:
    """Keep the K best of K x ``expansions`` children per group after every transition.

    Args:
        model: the FlowModel.
        reward: callable(x [N, ...]) -> Tensor[N], larger is better.
        noise: [B, K, ...] initial beams drawn from N(0, I).
        expansions: children per beam and transition (1 is plain sampling).
        method: the kernel, "glass" | "sde" | "plugin" (stochastic; "ode" children would be identical).
        transitions, inner_steps, rho, solver, sigmabar0, grid: the sampler (see ``glass_fast.Sampler``;
            sigmabar0 is GLASS's and the plug-in kernel's: leave it at 1.0 for "sde").
        generator: randomness of the children. progress: tqdm bar over transitions.
        timings: as in ``fk_steering``. max_batch: most rows per network call (children count).
        value_samples: score children before t = 1 by the value estimate V_t = log E[exp r(z) | x_t] from
            this many GLASS posterior draws each (``value_estimate``; samples x (inner_steps - 1) more calls
            per child) instead of the reward of the x0-prediction.
        compile, cuda_graph: run every transition compiled or as a replayed CUDA graph (see ``Sampler``).
        project: optional fn(k, t, x) -> x applied to the children [B * K * expansions, ...] after every
            transition (see ``Sampler.run``), before they are scored; with value_samples also to the
            posterior draws at t = 1 (k the final grid index). A hook with per-row data follows each kept
            child's parent (``glass_fast.sampling.follow``; ``Inpaint`` does).
    Returns:
        SteeringResult: samples [B, K, ...] (the final beams, best first), equal log_weights (a selection,
        not a weighted sample), rewards [B, K], best [B, ...], nfe per beam, reward_calls per beam.

    Raises:
        RuntimeError: every child of a group scored NaN or Inf at some transition (nothing to keep); fewer
        such scores only warn (they rank below every finite score: kept only where a group has fewer than K
        children with finite scores, and then reported with reward -inf).

    Example:
        >>> res = beam_search(model, lambda x: x[:, 0], torch.randn(4, 2, 2), expansions=4)
    """
    check_particles(model, reward, noise, generator)
    search = BeamSearch(model, reward, expansions=expansions, method=method, transitions=transitions,
                        inner_steps=inner_steps, rho=rho, solver=solver, sigmabar0=sigmabar0, timings=timings,
                        max_batch=max_batch, grid=grid, value_samples=value_samples, compile=compile,
                        cuda_graph=cuda_graph)
    return search(noise, generator=generator, progress=progress, project=project)
