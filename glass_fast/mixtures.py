"""Gaussian mixtures: closed-form ground truth for every sampler (MATH.md section 5).

Data z ~ sum_k pi_k N(m_k, s_k^2 I). Denoiser, marginals, the exact transition law p(x_t' | x_t) and the
tilt by a linear reward are all exact; all math runs in float64.
"""
from __future__ import annotations

import math

import torch

from .model import PREDICTIONS, FlowModel, output_from_denoised
from .plan import as_times, check_calls, check_interval, resolve_rho
from .schedules import Schedule


class GaussianMixture:
    """sum_k weights_k N(means_k, stds_k^2 I).

    Args:
        means: [C, d] component means.
        stds: [C] isotropic standard deviations (> 0).
        weights: [C] mixture weights (>= 0; normalised here).
    """

    def __init__(self, means, stds, weights):
        for name, v in (("means", means), ("stds", stds), ("weights", weights)):
            if torch.as_tensor(v).dtype == torch.bool:   # True / False would pass silently as 1.0 / 0.0
                raise TypeError(f"{name} must be real numbers, got booleans: {v!r}")
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"means must be [C, d], got shape {tuple(self.means.shape)}")
        C = self.means.shape[0]
        if self.stds.shape != (C,) or w.shape != (C,):
            raise ValueError(f"stds and weights must be [{C}], got {tuple(self.stds.shape)} and {tuple(w.shape)}")
        if not bool(torch.isfinite(self.means).all()):
            raise ValueError(f"means must be finite, got {self.means.tolist()}")
        if not bool(torch.all((self.stds > 0) & torch.isfinite(self.stds))):
            raise ValueError(f"stds must be finite and > 0, got {self.stds.tolist()}")
        if not bool(torch.all((w >= 0) & torch.isfinite(w))) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and with a positive sum, got {w.tolist()}")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def __repr__(self) -> str:
        return f"GaussianMixture(components={self.means.shape[0]}, dim={self.dim})"

    def _check_points(self, x, name: str = "x", finite: bool = True) -> None:
        """Points [B, d] of this mixture's dimension: a [B, 1] tensor would broadcast against every mean."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a Tensor[B, {self.dim}] (points of this {self.dim}-D mixture), got {got}")
        if finite and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} holds NaN or Inf: the closed forms need finite points")

    # ---------------------------------------------------------------------------------------------- sampling
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n, d] exact samples (float64)."""
        n = check_calls(n, "n")
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + self.stds[comp, None] * eps

    def marginal_sample(self, schedule: Schedule, t: float, n: int, generator=None) -> torch.Tensor:
        """[n, d] exact samples of x_t = alpha_t z + sigma_t eps."""
        t = as_times(t, "t", 1)
        z = self.sample(n, generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return schedule.alpha(t) * z + schedule.sigma(t) * eps

    # ----------------------------------------------------------------------------------------------- posterior
    def posterior(self, x: torch.Tensor, alpha, sigma):
        """Component posteriors of z given x = alpha z + sigma eps.

        Args:
            x: [B, d]; alpha, sigma: floats or Tensor[B].
        Returns:
            (log responsibilities [B, C], posterior means [B, C, d], posterior variances [B, C]).
        """
        self._check_points(x)
        return self._posterior(x, alpha, sigma)

    def _posterior(self, x: torch.Tensor, alpha, sigma):
        x = x.to(torch.float64)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        v = a * a * self.stds ** 2 + s * s                                  # [B, C]
        diff = x[:, None, :] - a[..., None] * self.means                     # [B, C, d]
        logr = torch.log(self.weights) - 0.5 * self.dim * torch.log(v) - 0.5 * (diff ** 2).sum(-1) / v
        logr = logr - torch.logsumexp(logr, dim=1, keepdim=True)
        mean = self.means + (a * self.stds ** 2 / v)[..., None] * diff
        var = (self.stds ** 2 * s * s / v).expand(x.shape[0], -1)   # [1, C] for one time: [B, C] as documented
        return logr, mean, var

    def denoise(self, x: torch.Tensor, t, schedule: Schedule) -> torch.Tensor:
        """Exact D_t(x) = E[z | x_t = x], [B, d] in float64."""
        self._check_points(x)
        return self._denoise(x, as_times(t, "t", x.shape[0]), schedule)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        # No checks on values: the exact model runs this inside compiled code, where they would not trace.
        logr, mean, _ = self._posterior(x, schedule.alpha(t), schedule.sigma(t))
        return (logr.exp()[..., None] * mean).sum(1)

    def flow_model(self, schedule: Schedule, prediction: str = "x0", dtype: torch.dtype | None = None) -> FlowModel:
        """The exact model of this mixture in any parameterization.

        Velocity outputs are evaluated at t <= 1 - 1e-9, where the conversion from D is still finite.
        """
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

        def exact(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(x.shape[0], -1)
            tt = t.to(torch.float64).cpu()
            if prediction == "velocity":
                tt = tt.clamp(max=1 - 1e-9)
            # A non-finite state is passed through (NaN out), for the sampler's own finite checks to report.
            self._check_points(flat, finite=False)
            d = self._denoise(flat.cpu(), tt, schedule)
            out = output_from_denoised(schedule, prediction, tt[:, None], flat.cpu().double(), d)
            return out.to(device=x.device, dtype=x.dtype).reshape(x.shape)

        exact.__name__ = f"exact_{prediction}"
        return FlowModel(exact, schedule, prediction, dtype=dtype)

    # ------------------------------------------------------------------------------------------ transitions
    def transition_law(self, x_t: torch.Tensor, t: float, t_next: float, rho, schedule: Schedule):
        """Exact p(x_t' | x_t) for the GLASS family: a mixture per conditioning point.

        Args:
            x_t: [B, d] conditioning points.
            rho: float, "ddpm", ("ddpm", kappa) or callable, as in ``glass_transition``.
        Returns:
            (weights [B, C], means [B, C, d], variances [B, C]).
        """
        self._check_points(x_t, "x_t")
        t64, tn64 = as_times(t, "t", 1), as_times(t_next, "t_next", 1)
        if t64.dim() or tn64.dim():
            raise ValueError(f"t and t_next must be single times, got shapes {tuple(t64.shape)} and {tuple(tn64.shape)}")
        check_interval(t64, tn64)
        r = resolve_rho(rho, schedule, t64, tn64)
        gamma = r * schedule.sigma(tn64) / schedule.sigma(t64)
        c = schedule.alpha(tn64) - gamma * schedule.alpha(t64)
        sbar2 = schedule.sigma(tn64) ** 2 * (1 - r * r)
        logr, mean, var = self._posterior(x_t, schedule.alpha(t64), schedule.sigma(t64))
        return logr.exp(), c * mean + gamma * x_t.to(torch.float64)[:, None, :], c * c * var + sbar2

    def marginal_law(self, schedule: Schedule, t: float):
        """p_t as (weights [C], means [C, d], variances [C])."""
        t = as_times(t, "t", 1)
        if t.dim():
            raise ValueError(f"t must be a single time, got shape {tuple(t.shape)}")
        a, s = schedule.alpha(t), schedule.sigma(t)
        return self.weights, a * self.means, a * a * self.stds ** 2 + s * s

    def tilted(self, b) -> "GaussianMixture":
        """p(z) exp(b.z), normalised: components move by s_k^2 b, weights scale by exp(b.m_k + s_k^2 |b|^2 / 2)."""
        b = torch.as_tensor(b, dtype=torch.float64)
        if b.shape != (self.dim,):
            raise ValueError(f"b must be [{self.dim}], got shape {tuple(b.shape)}")
        if not bool(torch.isfinite(b).all()):
            raise ValueError(f"b must be finite, got {b.tolist()}")
        logw = torch.log(self.weights) + self.means @ b + 0.5 * self.stds ** 2 * (b @ b)
        return GaussianMixture(self.means + self.stds[:, None] ** 2 * b, self.stds, torch.softmax(logw, 0))


def mixture_cdf(y: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
                direction: torch.Tensor) -> torch.Tensor:
    """CDF at y of direction . X for X ~ sum_k w_k N(means_k, variances_k I).

    Args:
        y: [n] points; weights [C], means [C, d], variances [C]; direction [d].
    """
    u = direction.to(torch.float64)
    if not bool((u @ u) > 0):
        raise ValueError(f"direction must be a non-zero vector, got {u.tolist()}")
    mu = means.to(torch.float64) @ u                          # [C]
    sd = torch.sqrt(variances.to(torch.float64) * (u @ u))     # [C]
    z = (y.to(torch.float64)[:, None] - mu) / sd
    return (weights.to(torch.float64) * 0.5 * torch.erfc(-z / math.sqrt(2))).sum(-1)


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    """One-sample Kolmogorov-Smirnov distance between 1-D ``samples`` and a callable CDF."""
    if samples.dim() != 1 or samples.shape[0] < 1:
        raise ValueError(f"samples must be a non-empty 1-D Tensor, got shape {tuple(samples.shape)}")
    y, _ = torch.sort(samples.to(torch.float64))
    n = y.shape[0]
    F = cdf(y)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - F, F - (i - 1) / n).max())


def ks_critical(n: int, alpha: float = 0.001) -> float:
    """Asymptotic one-sample KS critical value sqrt(-log(alpha/2) / 2) / sqrt(n)."""
    n = check_calls(n, "n")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be a level in (0, 1), got {alpha!r}")
    return math.sqrt(-0.5 * math.log(alpha / 2)) / math.sqrt(n)


def standard_mixture() -> GaussianMixture:
    """The 2-D, three-component mixture used by the tests, benchmarks and demos (unequal weights and widths)."""
    return GaussianMixture([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], [0.3, 0.5, 0.4], [0.3, 0.5, 0.2])
