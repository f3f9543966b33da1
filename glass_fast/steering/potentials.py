"""Feynman-Kac potentials in log space, with the final correction that makes any of them target p_r.

Notation (MATH.md section 4): target p_r(z) proportional to p(z) exp(lmbda r(z)); at grid time t_k each
particle carries a score s_k: s_k = lmbda r(D_{t_k}(x_k)) (the x0-prediction's reward; lmbda r(x_1) at t = 1)
or, for the "value" potential, s_k = V_{t_k}(x_k) = log E[exp(lmbda r(z)) | x_{t_k}]. The log-potentials:

    diff       s_{k+1} - s_k                 (telescopes to lmbda r(x_1) - s_0: targets p_r by itself)
    max        max(s_{k+1}, max_{j<=k} s_j)  (FK steering's "max")
    add        s_{k+1} + sum_{j<=k} s_j      (FK steering's "sum")
    immediate  s_{k+1}
    value      V_{k+1} - V_k                 (diff of value estimates; V_1 = lmbda r(x_1))

Final correction (on by default): at t = 1 the log-potential is lmbda r(x_1) minus the summed
log-potentials of the particle's ancestry, so the product along every path is exp(lmbda r(x_1)) and the
weighted particles target p_r for every potential; intermediate potentials only decide where particles go.
That holds as K grows; at a given K the potentials differ: "add" (and less so "max" and "immediate") weights
intermediate particles far more steeply than the target, so after resampling the correction rests on a few
particles (measured on the test mixture, ODE proposal: the mean of x off by 0.30 at K = 64, 0.11 at K = 4096
with "add"; "diff" within the statistical error of 128 groups at K = 64: tests/test_review_steering_stat.py).
Without it, "diff" and "value" still target p_r (up to the score at t = 0, the same for every particle
when alpha_0 = 0), while "max", "add" and "immediate" target p(x_{0:1}) times the product of their
potentials: path-dependent heuristics, not p_r.

Every state tensor is [B, K] and follows its particle through resampling (``gather``). Non-finite scores
give the particle a zero weight (-inf log-potential) and are counted on the device, never read in the loop.
"""
from __future__ import annotations

import torch

POTENTIALS = ("diff", "max", "add", "immediate", "value")


def check_potential(potential) -> str:
    if potential not in POTENTIALS:
        raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
    return potential


class PotentialState:
    """Running per-particle state of one potential.

    Args:
        kind: one of ``POTENTIALS``.
        score0: [B, K] the score at t_0 (float64).
        final_correction: replace the last log-potential by lmbda r(x_1) - sum of the earlier ones.
    """

    def __init__(self, kind: str, score0: torch.Tensor, final_correction: bool = True):
        self.kind, self.final_correction = kind, final_correction
        self.bad = torch.zeros((), dtype=torch.int64, device=score0.device)  # non-finite scores seen
        score0 = self._clean(score0)
        self.prev = score0                          # s_k
        self.runmax = score0                        # max_{j<=k} s_j
        self.runsum = score0                        # sum_{j<=k} s_j
        self.logg_sum = torch.zeros_like(score0)    # sum of log-potentials along the ancestry

    def _clean(self, score: torch.Tensor) -> torch.Tensor:
        score = score.to(torch.float64)
        bad = ~torch.isfinite(score)
        self.bad = self.bad + bad.sum()
        return torch.where(bad, torch.full_like(score, float("nan")), score)

    @staticmethod
    def _zero_weight_if_nan(log_g: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isnan(log_g), torch.full_like(log_g, float("-inf")), log_g)

    def step(self, score: torch.Tensor) -> torch.Tensor:
        """Log-potential [B, K] for the new scores [B, K] at an intermediate time; advances the state."""
        score = self._clean(score)
        if self.kind in ("diff", "value"):
            log_g = score - self.prev
        elif self.kind == "max":
            log_g = torch.maximum(score, self.runmax)   # NaN propagates: a bad score stays a zero weight
            self.runmax = log_g
        elif self.kind == "add":
            log_g = score + self.runsum
            self.runsum = self.runsum + score
        else:  # immediate: s_k enters no potential, but a non-finite s_0 must still zero the weight (as for
            # the others; a later non-finite score already did at its own step)
            log_g = torch.where(torch.isnan(self.prev), self.prev, score)
        self.prev = score
        log_g = self._zero_weight_if_nan(log_g)
        self.logg_sum = self.logg_sum + log_g
        return log_g

    def final(self, score: torch.Tensor) -> torch.Tensor:
        """Log-potential [B, K] at t = 1 from lmbda r(x_1) [B, K], with the final correction if enabled."""
        if not self.final_correction:
            return self.step(score)
        score = self._clean(score)
        log_g = self._zero_weight_if_nan(score - self.logg_sum)
        # An ancestry that already had a zero weight (-inf) must not be revived by subtracting it.
        log_g = torch.where(torch.isneginf(self.logg_sum), torch.full_like(log_g, float("-inf")), log_g)
        self.logg_sum = self.logg_sum + log_g
        return log_g

    def gather(self, idx: torch.Tensor, gather_fn) -> None:
        """Make every state follow its particle: state[b, k] <- state[b, idx[b, k]]."""
        self.prev, self.runmax, self.runsum, self.logg_sum = (
            gather_fn(s, idx) for s in (self.prev, self.runmax, self.runsum, self.logg_sum))
