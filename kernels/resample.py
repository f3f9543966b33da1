"""Triton particle-weight kernels: log-weight normalisation and grouped resampling indices.

Math, per group b (one program per group, the K weights of a group held in one block):
    normalize:  v_j = (lw_j - m) - log sum_i exp(lw_i - m), m = max_i lw_i;  ess = 1 / sum_j exp(2 v_j)
    weights:    w_j = exp(lw_j - m) / sum_j exp(lw_j - m);  cdf = cumsum(w), set to 1 where it
                reached min(total, 1) (from the last positive weight on) and at K - 1
    ancestors:  a_k = #{j : cdf_j <= p_k} (torch.searchsorted(..., right=True)), at most the index of
                the cdf's first 1 (the last particle of positive weight)
    residual:   n_j = floor(K w_j); slots k < sum n take #{j : cumsum(n)_j <= k}; the others take a
                multinomial ancestor from the cdf of the residual weights K w_j - n_j.
The search counts the cdf entries below each position in tiles of the cdf; the normalisation and
the cdf hold a group in one block, so K is at most Triton's block limit (2^20; refused above).
A group without valid weights (all -inf, a NaN or +inf entry: NaN weights) keeps its particles
(ancestors 0..K-1), as in the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _normalize_kernel(lw_ptr, norm_ptr, ess_ptr, K, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    lw = tl.load(lw_ptr + row * K + offs, mask=mask, other=float("-inf")).to(ACC)
    d = lw - tl.max(lw, axis=0)
    norm = d - tl.log(tl.sum(tl.where(mask, tl.exp(d), 0.0), axis=0))
    ess = 1.0 / tl.sum(tl.where(mask, tl.exp(2.0 * norm), 0.0), axis=0)
    tl.store(norm_ptr + row * K + offs, norm.to(norm_ptr.dtype.element_ty), mask=mask)
    tl.store(ess_ptr + row, ess.to(ess_ptr.dtype.element_ty))


@triton.jit
def _closed(cdf, last):
    # 1 from the last positive weight on (every entry that reached min(total, 1)) and at the last entry:
    # no position below 1 selects a trailing particle of weight zero (reference._closed_cdf)
    top = tl.minimum(tl.sum(tl.where(last, cdf, 0.0), axis=0), 1.0)  # a total above 1 stays sorted
    return tl.where(last | (cdf >= top), 1.0, cdf)


@triton.jit
def _cdf_kernel(lw_ptr, cdf_ptr, rcdf_ptr, copies_ptr, total_ptr, K,
                RESIDUAL: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    last = offs == K - 1
    lw = tl.load(lw_ptr + row * K + offs, mask=mask, other=float("-inf")).to(ACC)
    e = tl.where(mask, tl.exp(lw - tl.max(lw, axis=0)), 0.0)
    w = e / tl.sum(e, axis=0)
    if RESIDUAL:
        kw = K * w
        n = tl.floor(kw)
        copies = tl.cumsum(n, axis=0)
        r = kw - n
        rcdf = _closed(tl.cumsum(r / tl.sum(r, axis=0), axis=0), last)
        tl.store(copies_ptr + row * K + offs, copies, mask=mask)
        tl.store(rcdf_ptr + row * K + offs, rcdf, mask=mask)
        tl.store(total_ptr + row, tl.sum(n, axis=0))
    else:
        cdf = _closed(tl.cumsum(w, axis=0), last)
        tl.store(cdf_ptr + row * K + offs, cdf, mask=mask)


@triton.jit
def _search_kernel(sorted_ptr, pos_ptr, idx_ptr, K, CLOSED: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_J: tl.constexpr):
    # idx[b, k] = min(#{j : sorted[b, j] <= pos[b, k]}, limit); tiles of BLOCK_P positions. limit:
    # for a closed cdf the index of its first 1 (the last particle of positive weight: a position at
    # or past 1 never draws a trailing zero weight, reference._search_closed), else K - 1.
    row = tl.program_id(0).to(tl.int64)
    p_offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p_offs < K
    pos = tl.load(pos_ptr + row * K + p_offs, mask=p_mask, other=0.0)
    count = tl.zeros([BLOCK_P], dtype=tl.int32)
    below_one = tl.zeros([BLOCK_J], dtype=tl.int32)
    for j0 in range(0, K, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        cdf = tl.load(sorted_ptr + row * K + j, mask=j < K, other=float("inf"))
        # not (pos < cdf) rather than cdf <= pos: a NaN position counts every entry (ancestor K - 1),
        # like std::upper_bound and torch.searchsorted
        count += tl.sum((~(pos[:, None] < cdf[None, :])).to(tl.int32), axis=1)
        below_one += (cdf < 1.0).to(tl.int32)
    limit = tl.sum(below_one, axis=0) if CLOSED else K - 1
    tl.store(idx_ptr + row * K + p_offs, tl.minimum(count, limit).to(tl.int64), mask=p_mask)


def _check_group_size(k: int) -> None:
    """A group is one block (normalisation, cdf): Triton caps a block at TRITON_MAX_TENSOR_NUMEL."""
    if triton.next_power_of_2(k) > tl.TRITON_MAX_TENSOR_NUMEL:
        raise ValueError(f"log_w has K = {k} particles per group; the triton backend takes at most "
                         f"{tl.TRITON_MAX_TENSOR_NUMEL} (the cpp, cuda and reference backends take any K)")


def _acc(log_w: torch.Tensor):
    return (torch.float64, tl.float64) if log_w.dtype == torch.float64 else (torch.float32, tl.float32)


def normalize_log_weights_triton(log_w: torch.Tensor):
    """(log_w - logsumexp, ess) per group for log_w [B, K] (checked by the caller)."""
    lw = log_w.contiguous()
    b, k = lw.shape
    _check_group_size(k)
    norm, ess = torch.empty_like(lw), torch.empty(b, dtype=lw.dtype, device=lw.device)
    if b > 0:
        _normalize_kernel[(b,)](lw, norm, ess, k, ACC=_acc(lw)[1], BLOCK_K=triton.next_power_of_2(k))
    return norm, ess


def _search(sorted_: torch.Tensor, pos: torch.Tensor, closed: bool = True) -> torch.Tensor:
    b, k = pos.shape
    idx = torch.empty((b, k), dtype=torch.int64, device=pos.device)
    block_p = min(64, triton.next_power_of_2(k))
    _search_kernel[(b, triton.cdiv(k, block_p))](sorted_, pos.contiguous(), idx, k, CLOSED=closed,
                                                  BLOCK_P=block_p, BLOCK_J=min(64, triton.next_power_of_2(k)))
    return idx


def resample_indices_triton(log_w: torch.Tensor, uniforms: torch.Tensor, scheme: str) -> torch.Tensor:
    """[B, K] int64 ancestors for log_w, uniforms [B, K] and a scheme name (checked by the caller)."""
    lw = log_w.contiguous()
    b, k = lw.shape
    _check_group_size(k)
    if b == 0:
        return torch.empty((0, k), dtype=torch.int64, device=lw.device)
    acc, tl_acc = _acc(lw)
    u = uniforms.to(acc)
    block_k = triton.next_power_of_2(k)
    if scheme != "residual":
        cdf = torch.empty((b, k), dtype=acc, device=lw.device)
        _cdf_kernel[(b,)](lw, cdf, cdf, cdf, cdf, k, RESIDUAL=False, ACC=tl_acc, BLOCK_K=block_k)
        slots = torch.arange(k, device=lw.device, dtype=acc)
        if scheme == "multinomial":
            pos = u
        elif scheme == "stratified":
            pos = (slots + u) / k
        else:
            pos = (slots + u[:, :1]) / k
        return _keep_invalid(cdf, _search(cdf, pos))
    copies = torch.empty((b, k), dtype=acc, device=lw.device)
    rcdf = torch.empty_like(copies)
    total = torch.empty((b, 1), dtype=acc, device=lw.device)
    _cdf_kernel[(b,)](lw, rcdf, rcdf, copies, total, k, RESIDUAL=True, ACC=tl_acc, BLOCK_K=block_k)
    slots = torch.arange(k, device=lw.device, dtype=acc).expand(b, k)
    det = _search(copies, slots, closed=False)
    rand = _search(rcdf, u)
    return _keep_invalid(copies, torch.where(slots < total, det, rand))


def _keep_invalid(first: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """idx with the identity in groups whose weights are NaN (column 0 of the cdf or of the
    cumulative copies is then NaN; with K = 1 the only ancestor is 0 anyway)."""
    identity = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape)
    return torch.where(torch.isnan(first[:, :1]), identity, idx)
