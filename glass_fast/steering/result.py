"""The value every steering routine returns, and the accounting shared by them (model / reward meters)."""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..model import FlowModel
from ..sampling import Sampler
from ..transitions import FiniteGuard, check_state


@dataclass
class SteeringResult:
    """Particles at t = 1 with their weights and what they cost.

    Attributes:
        samples: [B, K, ...] final particles of B groups of K.
        log_weights: [B, K] log-weights normalised per group (logsumexp over K is 0). Together with
            ``samples`` they represent the target; equal weights after best-of-N.
        rewards: [B, K] reward of each final particle.
        best: [B, ...] the highest-reward particle of each group.
        nfe: model evaluations per particle (batched model calls; a call on several copies of every
            particle, as in value estimates, counts once per copy).
        reward_calls: reward evaluations per particle (rows the reward saw / (B * K)); a guidance hook's own
            reward calls are not among them.
        timings: seconds spent in the model, the reward and the sampler itself (everything else), and
            their sum "total". "reward" is the reward calls of ``reward_calls``: a guidance hook's reward
            gradients count in "sampler" (its network calls, with ``detach=False``, in "model"). NaN where
            not measured (``timings=False``, or CUDA without ``timings=True``; "model" inside compiled or
            captured transitions; see ``Meter``).
    """

    samples: torch.Tensor
    log_weights: torch.Tensor
    rewards: torch.Tensor
    best: torch.Tensor
    nfe: float
    reward_calls: float = 0.0
    timings: dict = field(default_factory=dict)

    @property
    def weights(self) -> torch.Tensor:
        """[B, K] normalised weights exp(log_weights)."""
        return self.log_weights.exp()

    def resample(self, scheme: str = "multinomial", generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, K, ...] equally weighted particles drawn from the weighted system (the final selection).

        Args:
            scheme: "multinomial" | "stratified" | "systematic" | "residual".
            generator: randomness of the draw.
        """
        from .resampling import gather, resample
        return gather(self.samples, resample(self.log_weights, scheme, generator))

    def select(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, ...] one particle per group drawn with probability equal to its weight (log_weights need not be
        normalised; a group without a distribution, NaN, +inf or all -inf, raises ValueError naming it)."""
        from .resampling import check_distribution
        lw = check_distribution(self.log_weights, generator).double()
        u = torch.rand(lw.shape[0], 1, generator=generator, device=lw.device, dtype=torch.float64)
        # Normalised first: exp of large unnormalised log-weights overflows, and inf / inf picks the last particle.
        cdf = torch.cumsum(torch.softmax(lw, dim=-1), dim=-1)
        idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(cdf.shape[-1] - 1)
        return self.samples[torch.arange(self.samples.shape[0], device=idx.device), idx[:, 0]]


class Meter:
    """Counts and times the model and the reward of steering runs, one run at a time (``begin`` .. ``close``).

    The network runs through a twin ``FlowModel`` (same function, schedule, parameterization, dtype, time
    range, optionally another ``max_batch``) whose function is wrapped by a timer; the twin's ``calls``
    are the run's batched model calls, and the user's ``model.calls`` is advanced by them at ``close``.
    Model evaluations per particle (``nfe``) are those calls, plus ``extra`` for calls whose batch holds
    several rows per particle (value estimates run ``samples`` copies of every particle at once).

    Timing: on CPU the wall clock around each call is exact without any synchronisation. On CUDA a
    call returns before the GPU finishes, so honest per-part seconds need a ``torch.cuda.synchronize``
    around every call; that is done only when asked (``timings=True``), since it stalls the pipeline.
    Unmeasured parts are NaN. Inside compiled code or replayed CUDA graphs (``captured``) the network is
    not timed on its own: "model" is NaN and its time is part of "sampler".
    """

    def __init__(self, model: FlowModel, device: torch.device, timings: bool | None, *,
                 max_batch: int | None = None, captured: bool = False):
        self.user = model
        self.measure = (device.type == "cpu") if timings is None else bool(timings)
        self.sync = self.measure and device.type == "cuda"
        self.device = device
        # Compiled or captured transitions trace the network: no clock or synchronisation may run inside.
        meter = self
        time_model = self.time_model = self.measure and not captured

        def metered(x, t):
            if not time_model:
                return model.fn(x, t)
            start = meter._now()
            out = model.fn(x, t)
            meter.model_s += meter._now() - start
            return out

        metered.__name__ = getattr(model.fn, "__name__", type(model.fn).__name__)
        self.model = FlowModel(metered, model.schedule, model.prediction, dtype=model.dtype,
                               time_range=model.time_range,
                               max_batch=max_batch if max_batch is not None else getattr(model, "max_batch", None))
        self.begin()

    def begin(self) -> None:
        """Start a run: zero the counters and the clock (a Meter serves one run at a time, any number in turn)."""
        self.model.calls = 0
        self.extra = 0
        self.reward_rows = 0
        self.model_s = self.reward_s = 0.0
        self._start = self._now()

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reward(self, reward, x: torch.Tensor, what: str, guard: FiniteGuard | None = None) -> torch.Tensor:
        """reward(x) checked for shape, dtype and device, and for leaving x unchanged (RuntimeError if it edited x
        in place); ``what`` names the call site in errors. If the reward raises and ``guard`` recorded a
        non-finite model output, that is raised instead: the reward most likely failed on the NaN states it
        caused (the guard is read only then)."""
        self.reward_rows += x.shape[0]
        # x is the particles or their x0-prediction, and at t = 1 the samples returned: an in-place edit by the
        # reward (a rescale to a pixel range) would silently change them, so it is refused at every call site.
        # Caught through the version counter, as the network's (inference tensors have none).
        version = None if x.is_inference() else x._version
        start = self._now() if self.measure else 0.0
        try:
            r = reward(x)
        except Exception:
            if guard is not None:
                guard.raise_if_bad()
            raise
        if self.measure:
            self.reward_s += self._now() - start
        if version is not None and x._version != version:
            raise RuntimeError(f"the reward modified its input x in place ({what}); x is the particles' state or "
                               f"their x0-prediction (at t = 1 the samples returned), which that would change: "
                               f"compute out of place (or work on x.clone() inside the reward)")
        # Weights and selections need the values only: a graph kept alive here would grow with every transition.
        return check_reward(r, x, what).detach()

    def close(self, particles: int) -> tuple[float, float, dict]:
        """(nfe per particle, reward calls per particle, timings); advances the user model's call count."""
        total = self._now() - self._start if self.measure else math.nan
        self.user.calls += self.model.calls
        if self.measure:
            model_s = self.model_s if self.time_model else math.nan
            timings = {"model": model_s, "reward": self.reward_s,
                       "sampler": max(total - self.model_s - self.reward_s, 0.0), "total": total}
        else:
            timings = {"model": math.nan, "reward": math.nan, "sampler": math.nan, "total": math.nan}
        return float(self.model.calls + self.extra), self.reward_rows / particles, timings


def metered_sampler(model: FlowModel, device: torch.device, dtype: torch.dtype, *, timings: bool | None,
                    max_batch: int | None, **sampler_options) -> tuple[Meter, Sampler]:
    """A Meter for steering runs on ``device`` and the Sampler that calls the network through it."""
    captured = bool(sampler_options.get("compile") or sampler_options.get("cuda_graph"))
    meter = Meter(model, device, timings, max_batch=max_batch, captured=captured)
    return meter, Sampler(meter.model, device=device, dtype=dtype, **sampler_options)


def check_timings(timings) -> bool | None:
    """``timings``: None (measure on CPU only), True or False; anything else is refused rather than read as
    true or false."""
    if timings is not None and not isinstance(timings, bool):
        raise ValueError(f"timings must be None (measure on CPU only), True or False, got {timings!r}")
    return timings


def progress_bar(steps, on: bool, desc: str):
    """``steps`` wrapped in a tqdm bar over transitions when ``on``."""
    if not on:
        return steps
    from tqdm.auto import tqdm
    return tqdm(steps, desc=desc, unit="transition")


def check_reward(r, x: torch.Tensor, what: str) -> torch.Tensor:
    """Validate a reward's output against its input x [N, ...]: a floating Tensor[N] on x's device."""
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"reward must return a Tensor[{x.shape[0]}], got {type(r).__name__} ({what})")
    if r.shape != (x.shape[0],):
        raise ValueError(f"reward must return a Tensor of shape [{x.shape[0]}] (one value per particle), "
                         f"got shape {tuple(r.shape)} ({what})")
    if not r.is_floating_point():
        raise TypeError(f"reward must return a floating-point Tensor, got dtype {r.dtype} ({what})")
    if r.device != x.device:
        raise ValueError(f"reward must return a Tensor on the particles' device {x.device}, got {r.device} ({what})")
    return r


def check_particles(model, reward, noise, generator) -> tuple[int, int]:
    """Validate grouped noise [B, K, ...] and the reward; return (B, K)."""
    if not isinstance(noise, torch.Tensor) or noise.dim() < 3:
        got = f"shape {tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a Tensor[B, K, ...] (B groups of K particles, data dims after), got {got}")
    b, k = noise.shape[:2]
    if b < 1 or k < 1:
        raise ValueError(f"noise must hold B >= 1 groups of K >= 1 particles, got B={b}, K={k}")
    check_state(model, noise, generator, "noise")
    check_model_and_reward(model, reward)
    return b, k


def check_model_and_reward(model, reward) -> None:
    """The steering routines' model and reward, refused by name when an object is built (not at its first batch)."""
    if not isinstance(model, FlowModel):
        raise TypeError(f"model must be a glass_fast.FlowModel, got {type(model).__name__}")
    if not callable(reward):
        raise TypeError(f"reward must be callable(x [N, ...]) -> Tensor[N], got {type(reward).__name__}")


def first_dead_group(dead_at: list[int], grid) -> tuple[int, str] | None:
    """(group, "transition k (t=.. -> ..)[ (and n more groups: [...])]") for the first group with
    ``dead_at[g] >= 0`` (host values: the transition after which all its particles had invalid rewards),
    None if none."""
    groups = [g for g, k in enumerate(dead_at) if k >= 0]
    if not groups:
        return None
    g, k = groups[0], dead_at[groups[0]]
    more = f" (and {len(groups) - 1} more groups: {groups[1:8]})" if len(groups) > 1 else ""
    return g, f"transition {k} (t={float(grid[k]):.4f} -> {float(grid[k + 1]):.4f}){more}"


def check_selection_rewards(bad: int, dead_at: list[int], grid, who: str, first: tuple[int, int] | None = None) -> None:
    """After a selection run (best-of-N, beam search), from host values (``FiniteGuard.read``): raise if every
    candidate of a group had a NaN or Inf reward (no best exists; ``dead_at[b]`` is the first transition
    where that happened, -1 never), and warn with the number ``bad`` of such rewards otherwise (they rank
    below every finite one), naming ``first`` = (group, candidate) of the first one when given."""
    dead = first_dead_group(dead_at, grid)
    if dead is not None:
        raise RuntimeError(f"{who}: the reward was NaN or Inf for every candidate of group {dead[0]} after "
                           f"{dead[1]}: no best candidate exists")
    if bad:
        where = f" (the first: group {first[0]}, candidate {first[1]})" if first is not None else ""
        warnings.warn(f"{who}: the reward was NaN or Inf for {bad} candidate evaluations{where}; those candidates "
                      f"ranked below every candidate with a finite reward", UserWarning, stacklevel=caller_level())


def caller_level() -> int:
    """``stacklevel`` for a ``warnings.warn`` made by this function's caller that attributes the warning to the
    first frame outside glass_fast and torch (the user's line). A fixed level lands in torch's ``no_grad``
    wrapper, or in the library when the public function wraps a reusable object; and the default filter shows
    a message once per location, so a message from several callers would show once."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("glass_fast", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def best_of_groups(samples: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """[B, ...] the highest-reward particle of each group; NaN or Inf rewards never win (an invalid reward)."""
    r = rewards.to(torch.float64)
    r = torch.where(torch.isfinite(r), r, -math.inf)
    idx = r.argmax(dim=-1)
    return samples[torch.arange(samples.shape[0], device=samples.device), idx]
