"""Plain-PyTorch reference for every per-element op. The compiled kernels implement these signatures.

Kernels derive nothing: every coefficient arrives precomputed (see ``glass_fast.plan``).
"""
from __future__ import annotations

import torch

# Column order of a fused-step coefficient row.
K_BASE, K_STAGE, K_XT, K_OUT, N_XT, N_NEW = range(6)
NUM_COEFS = 6


def _per_sample(coef: torch.Tensor, col: int, like: torch.Tensor) -> torch.Tensor:
    """Column ``col`` of ``coef`` ([6] or [B, 6]) shaped to broadcast against ``like`` ([B, ...])."""
    c = coef[..., col]
    if c.dim() == 0:
        return c
    return c.reshape((-1,) + (1,) * (like.dim() - 1))


def fused_step(base: torch.Tensor, out: torch.Tensor, coef: torch.Tensor,
               x_t: torch.Tensor | None = None, stage: torch.Tensor | None = None):
    """One sampler stage as two linear combinations.

        new    = k_base * base + k_stage * stage + k_xt * x_t + k_out * out
        y_next = n_xt * x_t + n_new * new

    Args:
        base: [B, ...] state the stage updates (xbar for GLASS, x for ODE/SDE).
        out: [B, ...] model output (or noise / denoised estimate), any float dtype.
        coef: [6] or [B, 6] coefficients (k_base, k_stage, k_xt, k_out, n_xt, n_new).
        x_t: [B, ...] the transition's conditioning state, or None (its terms vanish).
        stage: [B, ...] an intermediate state (midpoint / Heun predictor, SDE noise), or None.
    Returns:
        (new [B, ...] in base.dtype, y_next [B, ...] in out.dtype): the updated state and the next
        model input.
    """
    acc = _acc_dtype(base)
    c = coef.to(acc)
    new = _per_sample(c, K_BASE, base) * base.to(acc) + _per_sample(c, K_OUT, out) * out.to(acc)
    if stage is not None:
        new = new + _per_sample(c, K_STAGE, stage) * stage.to(acc)
    if x_t is None:
        y = _per_sample(c, N_NEW, new) * new
    else:
        xt = x_t.to(acc)
        new = new + _per_sample(c, K_XT, xt) * xt
        y = _per_sample(c, N_NEW, new) * new + _per_sample(c, N_XT, xt) * xt
    # Contiguous whatever the inputs' layout (channels_last, say), as the compiled backends return them.
    fmt = torch.contiguous_format
    return new.to(base.dtype, memory_format=fmt), y.to(out.dtype, memory_format=fmt)


def fused_step_(base: torch.Tensor, out: torch.Tensor, coef: torch.Tensor,
                x_t: torch.Tensor | None = None, stage: torch.Tensor | None = None,
                y_out: torch.Tensor | None = None):
    """In-place ``fused_step``: writes ``new`` into ``base`` and ``y_next`` into ``y_out``.

    Args:
        base, out, coef, x_t, stage: as in ``fused_step``; ``base`` is overwritten with ``new``.
        y_out: [B, ...] buffer for ``y_next`` (dtype ``out.dtype``), or None to allocate one.
    Returns:
        y_out (the buffer written, or a new tensor).
    """
    new, y = fused_step(base, out, coef, x_t, stage)
    base.copy_(new)
    if y_out is None:
        return y
    y_out.copy_(y)
    return y_out


RESAMPLING_SCHEMES = ("multinomial", "stratified", "systematic", "residual")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def normalize_log_weights(log_w: torch.Tensor):
    """Normalise grouped log-weights and report the effective sample size.

    Args:
        log_w: [B, K] log-weights of K particles in each of B groups; -inf is a zero weight.
    Returns:
        (log_w - logsumexp_k log_w [B, K] in log_w.dtype, ess [B] in log_w.dtype), computed as
        (lw_k - m) - log sum_j exp(lw_j - m) with m = max_j lw_j, and
        ess = 1 / sum_k w_k^2 = (sum w)^2 / sum w^2. A group without a finite normalisation (all
        -inf, or any NaN or +inf entry) gives NaN in every entry and in its ess.
    """
    lw = log_w.to(_acc_dtype(log_w))
    # Written out rather than torch.logsumexp (which special-cases +inf) so that every backend follows
    # one formula: an invalid group is NaN throughout on all of them. Subtracting m before log(sum)
    # keeps the result exact for log-weights of any magnitude (lw - (m + log s) rounds to ulp(m)).
    d = lw - lw.amax(dim=-1, keepdim=True)
    lw = d - torch.log(torch.exp(d).sum(dim=-1, keepdim=True))
    ess = 1.0 / torch.exp(2.0 * lw).sum(dim=-1)
    return lw.to(log_w.dtype), ess.to(log_w.dtype)


def _normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """[B, K] weights exp(lw - max) / sum exp(lw - max), the formula every backend follows.

    A valid group sums at least exp(0) = 1; an invalid one (all -inf, any NaN or +inf) has a NaN sum
    and NaN weights throughout.
    """
    lw = log_w.to(_acc_dtype(log_w))
    e = torch.exp(lw - lw.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def _closed_cdf(w: torch.Tensor) -> torch.Tensor:
    """Cumulative sum over the last dim, closed at exactly 1 from the last positive weight on.

    Every entry that reached min(total, 1) (the last positive weight's and the zero weights' after it)
    is set to 1, the last entry always: forcing only the last entry would leave the positions in
    [cdf_{K-2}, 1) (rounding, about 1e-7 in float32) to a trailing particle of weight zero.
    """
    cdf = torch.cumsum(w, dim=-1)
    top = cdf[..., -1:].clamp_max(1.0)  # a total above 1 (rounding) still leaves a sorted cdf
    cdf = torch.where(cdf >= top, torch.ones_like(cdf), cdf)
    return torch.cat([cdf[..., :-1], torch.ones_like(cdf[..., -1:])], dim=-1)


def _search_closed(cdf: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """#{j : cdf_j <= p} for a ``_closed_cdf``, at most the index of its first 1 (the last particle of
    positive weight): a position at or past 1 (NaN included; (K - 1 + u) / K rounds to 1 for u near
    1) draws that particle, never a trailing one of weight zero."""
    first_one = (cdf < 1).sum(dim=-1, keepdim=True)
    return torch.minimum(torch.searchsorted(cdf, pos, right=True), first_one)


def resampling_positions(uniforms: torch.Tensor, scheme: str) -> torch.Tensor:
    """Points in [0, 1) that select the ancestors of the cdf-based schemes.

    Args:
        uniforms: [B, K] uniforms in [0, 1).
        scheme: "multinomial" (p_k = u_k), "stratified" (p_k = (k + u_k) / K) or
            "systematic" (p_k = (k + u_{b,0}) / K).
    Returns:
        [B, K] positions in the dtype of the weights' accumulator (float32 or float64).
    """
    k = uniforms.shape[-1]
    ar = torch.arange(k, device=uniforms.device, dtype=uniforms.dtype)
    if scheme == "multinomial":
        return uniforms
    if scheme == "stratified":
        return (ar + uniforms) / k
    if scheme == "systematic":
        return (ar + uniforms[..., :1]) / k
    raise ValueError(f"scheme={scheme!r} has no positions; allowed: multinomial, stratified, systematic")


def resample_indices(log_w: torch.Tensor, uniforms: torch.Tensor, scheme: str) -> torch.Tensor:
    """Ancestor indices for grouped resampling, on the device of ``log_w``, without host sync.

    Weights w = exp(lw - max) / sum exp(lw - max) per group (float32, float64 for float64 input);
    cdf = cumsum(w) with every entry that reached min(total, 1) (from the last positive weight on)
    set to 1; ancestor a_k = #{j : cdf_j <= p_k} (searchsorted, right), at most the index of the cdf's
    first 1, so no particle of weight zero is drawn. Residual: n_j = floor(K w_j) copies of j fill
    slots k < D = sum n, the rest draw multinomially (p_k = u_k) from the residual weights
    K w_j - n_j.

    A group without valid weights (all -inf, or any NaN or +inf log-weight; its weights are NaN)
    keeps its particles: ancestors 0, 1, ..., K - 1. That choice is arbitrary but harmless, and the
    group stays visible to the caller as NaN in ``normalize_log_weights`` (its ESS is NaN).

    Args:
        log_w: [B, K] unnormalised log-weights (-inf = zero weight).
        uniforms: [B, K] uniforms in [0, 1) (systematic reads column 0 only).
        scheme: one of ``RESAMPLING_SCHEMES``.
    Returns:
        [B, K] int64 ancestor indices in [0, K).
    """
    if scheme not in RESAMPLING_SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not a resampling scheme; allowed: {RESAMPLING_SCHEMES}")
    k = log_w.shape[-1]
    w = _normalized_weights(log_w)
    u = uniforms.to(w.dtype)
    identity = torch.arange(k, device=w.device).expand(w.shape)
    invalid = torch.isnan(w[..., :1])  # NaN weights are NaN in every entry of the group
    if scheme != "residual":
        cdf = _closed_cdf(w)
        pos = resampling_positions(u, scheme).contiguous()
        idx = _search_closed(cdf, pos)
        return torch.where(invalid, identity, idx)
    kw = k * w
    n = torch.floor(kw)
    copies = torch.cumsum(n, dim=-1)
    slots = torch.arange(k, device=w.device, dtype=w.dtype).expand_as(w).contiguous()
    det = torch.searchsorted(copies, slots, right=True).clamp_max(k - 1)
    r = kw - n
    rcdf = _closed_cdf(r / r.sum(dim=-1, keepdim=True))
    rand = _search_closed(rcdf, u.contiguous())
    return torch.where(invalid, identity, torch.where(slots < copies[..., -1:], det, rand))


def gather_particles(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select particles per group: result[b, k] = x[b, idx[b, k]].

    An index outside [0, K) raises (RuntimeError on CPU, a device-side assert on CUDA: checked on the
    device, without waiting for it), as in the compiled backends; it never reads a neighbouring group.

    Args:
        x: [B, K, ...] particles.
        idx: [B, K] int64 ancestor indices in [0, K).
    Returns:
        [B, K, ...] gathered particles (a new contiguous tensor).
    """
    b, k = idx.shape
    torch._assert_async(((idx >= 0) & (idx < k)).all(), f"idx holds an ancestor outside [0, {k})")
    flat = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * k).reshape(-1)
    return x.reshape((b * k,) + tuple(x.shape[2:])).index_select(0, flat).reshape(x.shape)


def gather_particles_(x: torch.Tensor, idx: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """In-place ``gather_particles``: x[b, k] <- x[b, idx[b, k]] of the x before the call.

    Args:
        x: [B, K, ...] particles, overwritten.
        idx: [B, K] int64 ancestor indices.
        scratch: buffer with x's shape and dtype; its contents are clobbered (the compiled backends
            stage x through it). It may be x itself or overlap x: the result is the same.
    Returns:
        x.
    """
    x.copy_(gather_particles(x, idx))
    return x
