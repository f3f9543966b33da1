"""The digits experiments behind ``glass-fast demo`` / ``bench`` and ``benchmarks/bench_digits.py``.

- :func:`sampler_quality`: plain samplers at equal model calls (the paper's Tables 3/4 in miniature):
  Frechet distance in classifier features to the real digits, class diversity, confident rate.
- :func:`steering_comparison`: steering toward one digit at equal model calls per particle (the paper's
  Table 1 in miniature): flow baseline, best-of-N with ODE / SDE / GLASS, FK steering with SDE / GLASS (and
  GLASS with reward guidance), and beam search over GLASS transitions.

Every function takes a :class:`Settings`, a seed and a device and returns plain rows (dicts) plus samples;
printing and plotting live with the callers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .metrics import class_diversity, confident_rate, frechet_to_real
from .models import digit_log_probs, digit_reward, digits_flow_model

STEERING_METHODS = ("flow", "bon-ode", "bon-sde", "bon-glass", "fks-sde", "fks-glass", "fks-glass-guided",
                    "beam-glass")
STEERING_LABELS = {"flow": "flow baseline (ODE)", "bon-ode": "BoN-ODE", "bon-sde": "BoN-SDE",
                   "bon-glass": "BoN-GLASS", "fks-sde": "FKS-SDE", "fks-glass": "FKS-GLASS",
                   "fks-glass-guided": "FKS-GLASS + guidance", "beam-glass": "Beam-GLASS"}
BEAM_EXPANSIONS = 4   # beam search: children per beam; K particles' budget buys K / 4 beams
# FK's proposal with reward guidance: the paper's window, and scale = lmbda, the flow guidance whose tilt is
# FK's target p(x) exp(lmbda r(x)). The gradient is taken at the denoiser output: no extra model calls.
GUIDANCE_WINDOW = (0.2, 0.7)


@dataclass(frozen=True)
class Settings:
    """Sampler and steering settings shared by every method of one comparison.

    Attributes:
        transitions, inner_steps: model calls per sample = transitions * inner_steps.
        rho, solver: GLASS correlation ("ddpm" or a float) and inner solver.
        particles: K particles per group (best-of-N candidates / FK particles).
        lmbda, potential, resample, ess_threshold: FK steering options (lmbda = 1 with the log-probability
            reward targets p(x | digit) exactly).
    """

    transitions: int = 5
    inner_steps: int = 10
    rho: object = 0.4
    solver: str = "euler"
    particles: int = 8
    lmbda: float = 1.0
    potential: str = "diff"
    resample: str = "systematic"
    ess_threshold: float = 0.5

    @property
    def calls(self) -> int:
        return self.transitions * self.inner_steps

    def sampler_kwargs(self, method: str = "glass") -> dict:
        """The sampler options that ``method`` takes: rho for GLASS, the solver for GLASS (the ODE baselines
        step with Euler here, as the paper's)."""
        kw = {"transitions": self.transitions, "inner_steps": self.inner_steps}
        if method == "glass":
            kw.update(rho=self.rho, solver=self.solver)
        return kw


def make_noise(shape, seed: int, device, dtype) -> tuple[torch.Tensor, torch.Generator]:
    """Standard normal noise of ``shape`` and a generator for the sampler, both from ``seed``.

    The noise comes from torch seed 2 seed and the sampler's randomness from 2 seed + 1: every seed has streams
    of its own (with seed and seed + 1, seed s + 1's starting noise was seed s's first transition noise, so runs
    at consecutive seeds were not independent). Seed 0 keeps torch seeds 0 and 1.
    """
    # Noise drawn on the CPU so a seed gives the same starting points on every device.
    gen = torch.Generator().manual_seed(2 * seed)
    noise = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    dev_gen = torch.Generator(device=device).manual_seed(2 * seed + 1)
    return noise, dev_gen


def quality_configs(settings: Settings, best_solver: str = "midpoint") -> list[tuple[str, dict]]:
    """(label, sample() kwargs) of the plain-sampler table at ``settings.calls`` model calls."""
    base = {"transitions": settings.transitions, "inner_steps": settings.inner_steps}
    return [
        ("ODE (Euler)", dict(base, method="ode", solver="euler")),
        ("SDE (DDPM)", dict(base, method="sde")),
        ("GLASS (rho = DDPM)", dict(base, method="glass", rho="ddpm", solver="euler")),
        ("GLASS (rho = 0.4)", dict(base, method="glass", rho=0.4, solver="euler")),
        (f"GLASS (rho = 0.4, {best_solver})", dict(base, method="glass", rho=0.4, solver=best_solver)),
    ]


def sampler_quality(settings: Settings, *, n: int = 1000, seed: int = 0, device="cpu", dtype=torch.float32,
                    best_solver: str = "midpoint", progress: bool = False) -> tuple[list[dict], dict]:
    """Plain samplers at equal model calls, scored against the real digits.

    Args:
        settings: transitions and inner steps (rho / solver are fixed per row, see ``quality_configs``).
        n: samples per method (the same noise for every method).
        seed, device, dtype: reproducibility and placement.
        best_solver: the higher-order inner solver of the last GLASS row ("midpoint" or "heun").
        progress: tqdm bar over methods.

    Returns:
        (rows, samples): rows of {"method", "nfe", "frechet", "diversity", "confident", "seconds"};
        samples maps the method label to images [n, 1, 8, 8].
    """
    import glass_fast

    model = digits_flow_model(device, dtype)
    _warm_up(model, device, dtype)
    configs = quality_configs(settings, best_solver)
    rows, samples = [], {}
    for label, kw in _bar(configs, progress, "samplers"):
        noise, gen = make_noise((n, 1, 8, 8), seed, device, dtype)
        start = time.perf_counter()
        x = glass_fast.sample(model, noise, generator=gen, **kw)
        seconds = time.perf_counter() - start
        samples[label] = x
        rows.append({"method": label, "nfe": settings.calls, "frechet": frechet_to_real(x, split="all"),
                     "diversity": class_diversity(x), "confident": confident_rate(x), "seconds": seconds})
    return rows, samples


def real_reference_row(n_split: str = "test") -> dict:
    """The same metrics for real held-out digits against all real digits (the floor of the table)."""
    from .data import real_digits

    x, _ = real_digits(n_split)
    return {"method": f"real digits ({n_split} split)", "nfe": 0, "frechet": frechet_to_real(x, split="all"),
            "diversity": class_diversity(x), "confident": confident_rate(x), "seconds": 0.0}


def run_steering_method(method: str, model, digit: int, noise: torch.Tensor, settings: Settings,
                        generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """One method of the steering comparison.

    Args:
        method: one of ``STEERING_METHODS``.
        model: the digits FlowModel.
        digit: target digit 0..9.
        noise: [B, K, 1, 8, 8] initial particles (the flow baseline uses particle 0 of each group only).
        settings: see :class:`Settings`.
        generator: randomness of stochastic proposals and resampling.

    Returns:
        (best [B, 1, 8, 8] one output per group, model calls per group).
    """
    from glass_fast import sample
    from glass_fast.steering import RewardGuidance, beam_search, best_of_n, fk_steering

    if method not in STEERING_METHODS:
        raise ValueError(f"method {method!r} is not allowed; use one of {STEERING_METHODS}")
    reward = digit_reward(digit)
    if method == "flow":
        return sample(model, noise[:, 0], method="ode", transitions=settings.transitions,
                      inner_steps=settings.inner_steps, solver="euler"), float(settings.calls)
    kind, proposal, *guided = method.split("-")
    kw = settings.sampler_kwargs(proposal)
    if kind == "beam":
        # The same budget as K particles: K / 4 beams of 4 children each (at least one beam).
        beams = max(1, noise.shape[1] // BEAM_EXPANSIONS)
        res = beam_search(model, reward, noise[:, :beams], expansions=noise.shape[1] // beams, method=proposal,
                          generator=generator, **kw)
        return res.best, res.nfe * beams
    if kind == "bon":
        res = best_of_n(model, reward, noise, method=proposal, generator=generator, **kw)
    else:
        guidance = RewardGuidance(reward, settings.lmbda, window=GUIDANCE_WINDOW) if guided else None
        res = fk_steering(model, reward, noise, method=proposal, potential=settings.potential,
                          lmbda=settings.lmbda, resample=settings.resample, ess_threshold=settings.ess_threshold,
                          guidance=guidance, generator=generator, **kw)
    return res.best, res.nfe * noise.shape[1]


def steering_comparison(digit: int, settings: Settings, *, groups: int = 16, seed: int = 0, device="cpu",
                        dtype=torch.float32, methods=STEERING_METHODS, frechet_split: str = "all",
                        progress: bool = False) -> tuple[list[dict], dict]:
    """Steer ``groups`` groups of ``settings.particles`` particles toward ``digit`` with every method.

    Args:
        digit: target 0..9.
        settings: see :class:`Settings`.
        groups: B, the number of outputs per method.
        seed, device, dtype: reproducibility and placement (every method starts from the same noise).
        methods: subset of ``STEERING_METHODS``.
        frechet_split: real images of ``digit`` that the Frechet distance compares with.
        progress: tqdm bar over methods.

    Returns:
        (rows, best): rows of {"method", "digit", "nfe", "log_prob", "success", "frechet", "seconds"}
        (nfe: model calls per output; log_prob: mean target log-probability of the outputs; success:
        fraction whose predicted class is the target); best maps the method to outputs [B, 1, 8, 8].
    """
    for m in methods:
        if m not in STEERING_METHODS:
            raise ValueError(f"method {m!r} is not allowed; use any of {STEERING_METHODS}")
    model = digits_flow_model(device, dtype)
    _warm_up(model, device, dtype)
    rows, best = [], {}
    for method in _bar(methods, progress, f"digit {digit}"):
        noise, gen = make_noise((groups, settings.particles, 1, 8, 8), seed, device, dtype)
        start = time.perf_counter()
        out, nfe = run_steering_method(method, model, digit, noise, settings, gen)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            logp = digit_log_probs(out.float())
        best[method] = out
        rows.append({"method": STEERING_LABELS[method], "digit": digit, "nfe": nfe,
                     "log_prob": float(logp[:, digit].mean()),
                     "success": float((logp.argmax(-1) == digit).float().mean()),
                     # A Frechet distance needs a covariance: at least two outputs.
                     "frechet": frechet_to_real(out, digit=digit, split=frechet_split) if groups > 1 else float("nan"),
                     "seconds": seconds})
    return rows, best


def _warm_up(model, device, dtype) -> None:
    """One model and one classifier call, so first-call set-up is not timed as part of the first method."""
    x = torch.zeros(2, 1, 8, 8, device=device, dtype=dtype)
    with torch.no_grad():
        model.velocity(x, 0.5)
        digit_log_probs(x)


def _bar(items, on: bool, desc: str):
    if not on:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


__all__ = ["Settings", "STEERING_METHODS", "STEERING_LABELS", "quality_configs", "sampler_quality",
           "real_reference_row", "run_steering_method", "steering_comparison", "make_noise"]
