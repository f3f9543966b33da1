"""Grouped resampling: ESS, unbiasedness and variance of every scheme, grouping, ESS-adaptive steps."""
import math

import pytest
import torch

from glass_fast.steering import SCHEMES, ess, gather, resample
from glass_fast.steering.resampling import AdaptiveResampler

W = torch.tensor([0.31, 0.02, 0.17, 0.0, 0.05, 0.25, 0.12, 0.08], dtype=torch.float64)  # K = 8, one zero


def _offspring(idx: torch.Tensor, k: int) -> torch.Tensor:
    """[R, K] number of copies of each particle in each of R resamplings."""
    return torch.nn.functional.one_hot(idx, k).sum(dim=1).to(torch.float64)


@pytest.mark.parametrize("weights,expected", [
    ([1.0, 1.0, 1.0, 1.0], 4.0),
    ([1.0, 0.0, 0.0, 0.0], 1.0),
    ([0.5, 0.5, 0.0, 0.0], 2.0),
    ([3.0, 1.0], 16.0 / 10.0),            # (3 + 1)^2 / (9 + 1)
    ([0.2, 0.3, 0.5], 1.0 / 0.38),        # 1 / (0.04 + 0.09 + 0.25)
])
def test_ess_exact(weights, expected):
    lw = torch.log(torch.tensor([weights], dtype=torch.float64))
    assert float(ess(lw)[0]) == pytest.approx(expected, rel=1e-12)
    # invariant to a per-group offset of the log-weights
    assert float(ess(lw + 123.4)[0]) == pytest.approx(expected, rel=1e-12)


def test_ess_is_per_group():
    lw = torch.log(torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    assert ess(lw).tolist() == pytest.approx([3.0, 1.0])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_unbiased(scheme):
    # R independent groups with the same weights: E[copies of j] = K w_j, checked at 5 standard errors.
    r, k = 20000, W.shape[0]
    idx = resample(torch.log(W).expand(r, k).contiguous(), scheme, torch.Generator().manual_seed(3))
    assert idx.shape == (r, k) and idx.dtype == torch.int64
    counts = _offspring(idx, k)
    mean, se = counts.mean(0), counts.std(0) / math.sqrt(r)
    assert torch.all((mean - k * W).abs() <= 5 * se + 1e-12), (mean, k * W, se)
    assert torch.all(counts[:, 3] == 0)  # a zero weight is never drawn


def _total_variance(counts: torch.Tensor) -> tuple[float, float]:
    """(sum over particles of the offspring variance, its standard error) from R resamplings [R, K]."""
    dev2 = (counts - counts.mean(0)).square().sum(1) * (counts.shape[0] / (counts.shape[0] - 1))
    return float(dev2.mean()), float(dev2.std()) / math.sqrt(counts.shape[0])


def test_offspring_variances_match_their_closed_forms():
    # Per particle j with expected copies K w_j = n_j + f_j (n_j integer, 0 <= f_j < 1):
    #   multinomial: Binomial(K, w_j), variance K w_j (1 - w_j);
    #   systematic: n_j or n_j + 1 copies, variance f_j (1 - f_j), the least of any unbiased scheme;
    #   residual: n_j + Binomial(R, f_j / R) with R = sum f, variance f_j (1 - f_j / R);
    #   stratified: between systematic and multinomial (no closed form).
    r, k = 20000, W.shape[0]
    lw = torch.log(W).expand(r, k).contiguous()
    kw = k * W
    frac = kw - torch.floor(kw)
    exact = {"multinomial": float((kw * (1 - W)).sum()), "systematic": float((frac * (1 - frac)).sum()),
             "residual": float((frac * (1 - frac / frac.sum())).sum())}
    counts = {s: _offspring(resample(lw, s, torch.Generator().manual_seed(4)), k) for s in SCHEMES}
    total = {s: _total_variance(c) for s, c in counts.items()}
    for s, v in exact.items():
        assert abs(total[s][0] - v) < 5 * total[s][1], (s, total[s], v)
    # Systematic: every count is the floor or the ceiling of K w_j.
    assert torch.all((counts["systematic"] == torch.floor(kw)) | (counts["systematic"] == torch.ceil(kw)))
    strat, se = total["stratified"]
    assert exact["systematic"] - 5 * se < strat < exact["multinomial"] - 5 * se, (strat, exact)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_groups_resample_independently(scheme):
    lw = torch.full((3, 5), -math.inf, dtype=torch.float64)
    lw[0, 3] = 0.0
    lw[1, 0] = 2.0
    lw[2] = 0.0   # uniform
    idx = resample(lw, scheme, torch.Generator().manual_seed(0))
    assert torch.all(idx[0] == 3) and torch.all(idx[1] == 0)
    assert torch.all((idx[2] >= 0) & (idx[2] < 5))
    if scheme != "multinomial":   # equal weights: the low-variance schemes keep every particle exactly once
        assert sorted(idx[2].tolist()) == list(range(5))


def test_gather_selects_per_group():
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    idx = torch.tensor([[2, 2, 0], [1, 0, 1]])
    out = gather(x, idx)
    for b in range(2):
        for k in range(3):
            assert torch.equal(out[b, k], x[b, idx[b, k]])


def test_adaptive_step_resamples_only_low_ess_groups():
    k = 4
    lw = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25],      # ESS 4: kept
                                 [0.97, 0.01, 0.01, 0.01]],     # ESS ~1.06: resampled
                                dtype=torch.float64)) + 0.3
    idx, new = AdaptiveResampler(2, k, "systematic", 0.5, "cpu")(lw, torch.Generator().manual_seed(0))
    assert idx[0].tolist() == [0, 1, 2, 3]
    assert torch.equal(new[0], lw[0])                     # not resampled: weights carried on
    assert torch.allclose(new[1], torch.full((k,), -math.log(k), dtype=torch.float64))
    assert idx[1].tolist() == [0, 0, 0, 0]
    # threshold 1 resamples every group, even with uniform weights
    _, new = AdaptiveResampler(2, k, "systematic", 1.0, "cpu")(lw, None)
    assert torch.allclose(new, torch.full_like(new, -math.log(k)))


def test_adaptive_step_keeps_dead_groups_dead():
    lw = torch.tensor([[-math.inf, -math.inf], [0.0, -5.0]], dtype=torch.float64)
    idx, new = AdaptiveResampler(2, 2, "multinomial", 1.0, "cpu")(lw, torch.Generator().manual_seed(0))
    assert torch.all(torch.isneginf(new[0])) and torch.all(torch.isfinite(new[1]))
    assert torch.all((idx >= 0) & (idx < 2))


def test_bad_input():
    with pytest.raises(ValueError, match="scheme must be one of"):
        resample(torch.zeros(2, 3), "bogus")
    with pytest.raises(ValueError, match=r"log_weights must be a floating Tensor\[B, K\]"):
        resample(torch.zeros(3), "systematic")
    with pytest.raises(ValueError, match=r"log_weights must be a floating Tensor\[B, K\]"):
        ess(torch.zeros(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("row", [[0.0, math.nan, 0.0], [0.0, math.inf, 0.0], [-math.inf, -math.inf, -math.inf]])
def test_weights_without_a_distribution_are_refused(row):
    # NaN, +inf or all-zero weights used to give arbitrary ancestors; now the group is named.
    lw = torch.tensor([[0.0, -1.0, -2.0], row], dtype=torch.float64)
    with pytest.raises(ValueError, match="log_weights of group 1 must be finite or -inf"):
        resample(lw, "systematic")
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        resample(torch.zeros(2, 3), "systematic", generator=3)
