"""Feynman-Kac steering: sequential Monte Carlo over any proposal, towards p_r proportional to p exp(lmbda r).

Particles x [B, K, ...] (B groups of K) run flattened as [B*K, ...] through one ``Sampler``. After each
transition k -> k+1 the reward of the x0-prediction r(D_{t_{k+1}}(x_{k+1})) updates the log-weights through a
potential (``potentials``); at t = 1 the reward of x_1 itself, with the final correction by default.

Model calls: D_{t_{k+1}}(x_{k+1}) is exactly the first model call (s = 0, or the first ODE / SDE stage) of
transition k+1, so it is computed once and handed to ``Sampler.step(k+1, x, denoised=...)``; D_{t_0}(x_0)
likewise feeds transition 0. Steering with GLASS therefore costs transitions * inner_steps model calls per
particle, the same as plain sampling. (The "value" potential adds samples * (inner_steps - 1) per particle
and transition for its posterior draws.)

No host synchronisation in the loop: log-weights accumulate on the device, every group computes ancestors
and keeps the identity unless its ESS fell below the threshold (``torch.where``), resetting only resampled
groups to log(1/K). Which steps may resample (window on t, every n-th transition) is fixed before the loop.
Failures are recorded on the device and raised once after the loop: non-finite model outputs, scores lmbda r
so large that the log-weights could overflow float64, groups whose particles all have zero weight (named with
the first transition where it happened), and a warning counting non-finite rewards (each gives its particle
zero weight).
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch

from ..model import FlowModel
from ..plan import check_calls
from ..sampling import METHODS, check_eager_guidance, check_hooks, follow
from ..transitions import FiniteGuard
from .guidance import inside_window, time_window
from .potentials import PotentialState, check_potential
from .resampling import AdaptiveResampler, check_scheme, gather, normalize_log_weights
from .result import (SteeringResult, best_of_groups, caller_level, check_model_and_reward, check_particles,
                     check_timings, first_dead_group, progress_bar)
from .settings import sampler_settings
from .value import metered_parts, predicted_scores


class FKSteering:
    """Feynman-Kac steering with its settings bound once, reusable across batches (for serving).

    ``FKSteering(model, reward, **settings)(noise)`` equals ``fk_steering(model, reward, noise, **settings)``.
    Kept across calls, the proposal's Sampler keeps its compiled code and CUDA graphs (built on the first
    batch of each shape; the sampler, value estimators and meter are built once per device and dtype), so
    only the first call pays for capture. One call at a time per object.

    Args:
        model: the FlowModel.
        reward: callable(x [N, ...]) -> Tensor[N] on x's device, larger is better.
        method: proposal "glass" | "sde" | "ode" | "plugin".
        transitions, inner_steps, rho, solver, sigmabar0: the sampler (see ``Sampler``; model calls per
            particle: transitions * inner_steps). sigmabar0 is GLASS's (and the plug-in kernel's): leave it at
            1.0 for "ode" and "sde".
        potential: "diff" | "max" | "add" | "immediate" | "value" (see ``glass_fast.steering.potentials``).
        lmbda: reward temperature, >= 0.
        resample: "multinomial" | "stratified" | "systematic" | "residual".
        ess_threshold: in [0, 1]; a group resamples when its ESS < ess_threshold * K (0: never, 1: always).
        resample_window: (lo, hi): resample only after transitions ending at a time t_{k+1} in [lo, hi], t < 1.
        resample_every: resample only after every n-th transition (k+1 divisible by n).
        final_correction: make the weighted particles target p_r for any potential (default).
        guidance: optional hook (e.g. ``RewardGuidance``) applied after every model call of the proposal.
        value_samples: posterior draws per particle for potential="value".
        timings: measure seconds in model / reward / sampler; None: on CPU only (CUDA needs syncs).
        compile, cuda_graph: run every proposal transition compiled or as a replayed CUDA graph (see
            ``Sampler``; not with ``guidance``). The reward, potentials and resampling stay eager, and
            host-sync free, between transitions.
        max_batch: call the network in chunks of at most this many rows (value draws included).
        grid: optional increasing float64 Tensor[K+1] of transition times from 0 to 1 (e.g. a pipeline's
            shifted schedule), replacing the uniform grid of ``transitions`` intervals.

    Example:
        >>> steer = FKSteering(model, lambda x: x[:, 0], method="glass", cuda_graph=True)
        >>> results = [steer(torch.randn(4, 8, 2, device="cuda")) for _ in range(3)]  # captured once
    """

    def __init__(self, model: FlowModel, reward, *, method: str = "glass", transitions: int | None = None,
                 inner_steps: int = 10, rho=None, solver: str = "euler", sigmabar0: float = 1.0,
                 potential: str = "diff", lmbda: float = 1.0, resample: str = "systematic",
                 ess_threshold: float = 0.5, resample_window=(0.0, 1.0), resample_every: int = 1,
                 final_correction: bool = True, guidance=None, value_samples: int = 4, timings: bool | None = None,
                 compile=None, cuda_graph: bool = False, max_batch: int | None = None,
                 grid: torch.Tensor | None = None):
        check_model_and_reward(model, reward)
        self.window = _check_options(method, potential, lmbda, resample, ess_threshold, resample_window,
                                     resample_every, value_samples, guidance, final_correction)
        # Refused here, before any particle is drawn.
        self.settings = sampler_settings(method=method, transitions=transitions, inner_steps=inner_steps, rho=rho,
                                         solver=solver, sigmabar0=sigmabar0, grid=grid, compile=compile,
                                         cuda_graph=cuda_graph, max_batch=max_batch)
        check_eager_guidance(guidance, compile, cuda_graph)
        resample_every, value_samples = int(resample_every), int(value_samples)
        self.model, self.reward = model, reward
        self.potential, self.lmbda, self.final_correction = potential, float(lmbda), final_correction
        self.resample, self.ess_threshold, self.resample_every = resample, float(ess_threshold), resample_every
        self.guidance, self.value_samples, self.timings = guidance, value_samples, check_timings(timings)
        self._parts: dict = {}

    def _build(self, device: torch.device, dtype: torch.dtype):
        """(meter, sampler, resampling-due flags, value estimators) for particles of this device and dtype."""
        key = (device, dtype)
        if key not in self._parts:
            meter, sampler, values = metered_parts(self.model, device, dtype, self.timings,
                                                   self.value_samples if self.potential == "value" else None,
                                                   self.settings)
            grid, steps = sampler.grid, sampler.transitions
            due = [0 < k + 1 < steps and inside_window(float(grid[k + 1]), self.window)
                   and (k + 1) % self.resample_every == 0 for k in range(steps)]
            self._parts[key] = (meter, sampler, due, values)
        return self._parts[key]

    @torch.no_grad()   # as Sampler.run: no graph of the network calls is kept
    def __call__(self, noise: torch.Tensor, *, generator: torch.Generator | None = None,
                 progress: bool = False, project=None) -> SteeringResult:
        """Steer B groups of K particles from ``noise`` [B, K, ...] (draws of N(0, I)).

        Args:
            noise: [B, K, ...] initial particles. generator: randomness of the proposal and of the
            resampling. progress: show a tqdm bar over transitions.
            project: optional fn(k, t, x) -> x applied to the particles [B * K, ...] after every transition
                (see ``Sampler.run``), before they are weighted; with potential="value" also to the posterior
                draws at t = 1 (k the final grid index). A hook with per-row data follows the particles through
                resampling (``glass_fast.sampling.follow``; ``Inpaint`` does).
        Returns:
            SteeringResult (see ``fk_steering``).
        """
        b, k_part = check_particles(self.model, self.reward, noise, generator)
        check_hooks(None, None, project)
        n, rest, dev = b * k_part, tuple(noise.shape[2:]), noise.device
        meter, sampler, due, values = self._build(dev, noise.dtype)
        meter.begin()
        grid, steps, guidance, lmbda = sampler.grid, sampler.transitions, self.guidance, self.lmbda
        resampler = (AdaptiveResampler(b, k_part, self.resample, self.ess_threshold, dev)
                     if self.ess_threshold > 0 else None)
        guard = FiniteGuard(dev)
        guard.check_input(noise, "noise")

        # Scores of magnitude <= bound keep every log-weight finite: a potential or log-weight sums at most
        # (steps + 2)^2 of them. Beyond it (a huge lmbda) float64 overflows into NaN weights or spurious zero
        # weights, recorded here and raised after the loop.
        bound = torch.finfo(torch.float64).max / (steps + 2) ** 2
        overflow = [torch.zeros((), dtype=torch.bool, device=dev)]

        def scaled(r):  # lmbda r in float64
            s = lmbda * r.to(torch.float64)
            overflow[0] = overflow[0] | (torch.isfinite(r) & (s.abs() > bound)).any()
            return s

        def score(z):  # lmbda r(z), shape [M]
            return scaled(meter.reward(self.reward, z, "in fk_steering", guard))

        def grouped(t):
            return t.reshape((b, k_part) + tuple(t.shape[1:]))

        x = noise.reshape((n,) + rest)
        out, d = sampler.predict(0, x)   # transition 0's first model call, handed to it
        guard.check(d, sampler.labels[0][0])
        # At t_0 the value is the same constant for every particle when alpha_0 = 0 (the posterior is the
        # prior), so 0 is used; with alpha_0 > 0 the final correction removes the difference.
        score0 = torch.zeros(n, dtype=torch.float64, device=dev) if self.potential == "value" else score(d)
        state = PotentialState(self.potential, grouped(score0), self.final_correction)
        log_w = torch.full((b, k_part), -math.log(k_part), dtype=torch.float64, device=dev)
        dead_at = torch.full((b,), -1, dtype=torch.int64, device=dev)
        r_final = None
        for k in progress_bar(range(steps), progress, "fk_steering"):
            x = sampler.step(k, x, generator=generator, first_output=out, guard=guard, guidance=guidance,
                             project=project)
            if k + 1 < steps:
                out, s, value_calls = predicted_scores(sampler, values, k + 1, x, score, generator=generator,
                                                       guard=guard, project=project)
                meter.extra += value_calls * (self.value_samples - 1)  # value_samples rows per particle
                log_g = state.step(grouped(s))
            else:
                r_final = meter.reward(self.reward, x, "in fk_steering at t = 1", guard)
                log_g = state.final(grouped(scaled(r_final)))
            log_w = log_w + log_g
            log_w = torch.where(torch.isnan(log_w), torch.full_like(log_w, -math.inf), log_w)
            dead = torch.isneginf(log_w).all(dim=-1)
            dead_at = torch.where(dead & (dead_at < 0), torch.full_like(dead_at, k), dead_at)
            if resampler is not None and due[k]:
                idx, log_w = resampler(log_w, generator)
                x = gather(grouped(x), idx).reshape((n,) + rest)
                out = gather(grouped(out), idx).reshape((n,) + rest)
                state.gather(idx, gather)
                if project is not None:   # a hook's per-row data (Inpaint's noise) follows the particles
                    project = follow(project, (idx + torch.arange(b, device=dev)[:, None] * k_part).reshape(-1))
        # One host read for every record of the run (model outputs, dead groups, non-finite rewards, overflow).
        dead_at, (bad,), (overflowed,) = guard.read(dead_at, state.bad, overflow[0])
        if overflowed:
            raise FloatingPointError(f"fk_steering: |lmbda * reward| exceeded {bound:.3g} (lmbda={lmbda!r}): "
                                     f"beyond it the log-weights of {steps} transitions can overflow float64; use a "
                                     f"smaller lmbda")
        _raise_dead(dead_at, grid)
        if bad:
            warnings.warn(f"fk_steering: the reward was NaN or Inf for {bad} particle evaluations; those particles "
                          f"were given zero weight", UserWarning, stacklevel=caller_level())
        lw, _ = normalize_log_weights(log_w)
        nfe, reward_calls, secs = meter.close(n)
        samples, rewards = grouped(x), grouped(r_final)
        return SteeringResult(samples=samples, log_weights=lw, rewards=rewards,
                              best=best_of_groups(samples, rewards), nfe=nfe, reward_calls=reward_calls,
                              timings=secs)


def fk_steering(model: FlowModel, reward, noise: torch.Tensor, *, method: str = "glass",
                transitions: int | None = None, inner_steps: int = 10, rho=None, solver: str = "euler",
                sigmabar0: float = 1.0, potential: str = "diff", lmbda: float = 1.0, resample: str = "systematic",
                ess_threshold: float = 0.5, resample_window=(0.0, 1.0), resample_every: int = 1,
                final_correction: bool = True, guidance=None, generator: torch.Generator | None = None,
                progress: bool = False,
                value_samples: int = 4, timings: bool | None = None, compile=None, cuda_graph: bool = False,
                max_batch: int | None = None, grid: torch.Tensor | None = None, project=None) -> SteeringResult:
    """Steer B groups of K particles towards p_r(z) proportional to p(z) exp(lmbda r(z)).

    Args:
        model, reward, and the settings: see ``FKSteering`` (keep one of those to reuse compiled code or
            CUDA graphs across batches).
        noise: [B, K, ...] initial particles drawn from N(0, I).
        generator: randomness of the proposal and of the resampling.
        progress: show a tqdm bar over transitions.
        project: optional fn(k, t, x) -> x applied to the particles after every transition (see
            ``Sampler.run``), before they are weighted.
    Returns:
        SteeringResult with samples [B, K, ...], per-group normalised log_weights [B, K] (the weighted
        system targets p_r), rewards [B, K], best [B, ...], nfe, reward_calls, timings. The particles are
        not resampled at t = 1: the final selection is ``result.resample()`` (K equally weighted particles
        per group) or ``result.select()`` (one per group, drawn by weight); ``result.best`` is the argmax.

    Raises:
        FloatingPointError: the model returned NaN / Inf, or lmbda * reward is so large that the log-weights
            would overflow float64.
        RuntimeError: every particle of a group reached zero weight (non-finite rewards).

    Example:
        >>> res = fk_steering(model, lambda x: x[:, 0], torch.randn(4, 8, 2), method="glass")
        >>> res.best.shape, res.nfe   # (torch.Size([4, 2]), 50.0)
    """
    steer = FKSteering(model, reward, method=method, transitions=transitions, inner_steps=inner_steps, rho=rho,
                       solver=solver, sigmabar0=sigmabar0, potential=potential, lmbda=lmbda, resample=resample,
                       ess_threshold=ess_threshold, resample_window=resample_window, resample_every=resample_every,
                       final_correction=final_correction, guidance=guidance, value_samples=value_samples,
                       timings=timings, compile=compile, cuda_graph=cuda_graph, max_batch=max_batch, grid=grid)
    return steer(noise, generator=generator, progress=progress, project=project)


def _raise_dead(dead_at: list[int], grid: torch.Tensor) -> None:
    dead = first_dead_group(dead_at, grid)
    if dead is not None:
        raise RuntimeError(f"fk_steering: every particle of group {dead[0]} has zero weight after {dead[1]}: the "
                           f"reward was NaN or Inf for all of them")


def _check_options(method, potential, lmbda, resample, ess_threshold, window, every, value_samples, guidance,
                   final_correction):
    """Validate the steering options; returns the resampling window as floats (lo, hi)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_potential(potential)
    check_scheme(resample, "resample")
    if isinstance(lmbda, bool) or not isinstance(lmbda, numbers.Real) or not math.isfinite(lmbda) or lmbda < 0:
        raise ValueError(f"lmbda must be a finite number >= 0, got {lmbda!r}")
    if (isinstance(ess_threshold, bool) or not isinstance(ess_threshold, numbers.Real)
            or not 0.0 <= ess_threshold <= 1.0):
        raise ValueError(f"ess_threshold must be a number in [0, 1], got {ess_threshold!r}")
    lo, hi = time_window(window, "resample_window")
    check_calls(every, "resample_every")
    check_calls(value_samples, "value_samples")
    if not isinstance(final_correction, bool):
        raise ValueError(f"final_correction must be True or False, got {final_correction!r}")
    if guidance is not None and not callable(guidance):
        raise TypeError(f"guidance must be callable(model, y, t, t_host, out) -> out (e.g. RewardGuidance), "
                        f"got {type(guidance).__name__}")
    return lo, hi
