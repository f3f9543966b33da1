"""Particle ops: log-weight normalisation, resampling indices and gathers, every backend."""
import math
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from glass_fast import ops  # noqa: E402
from glass_fast.ops import reference as R  # noqa: E402
from glass_fast.ops.testing import (INTERPRETER_BF16_ULPS, assert_within_reference_error,  # noqa: E402
                                    backend_device_params, backend_devices, interpreted)


PAIRS = backend_device_params()
SCHEMES = list(R.RESAMPLING_SCHEMES)
# All -inf groups and exactly-integer residual weights divide 0 by 0 by design (NaN, then unused),
# and invalid groups reduce NaN rows; Triton's CPU interpreter reports those through numpy.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]
SHAPES = [(1, 1), (1, 7), (5, 37), (3, 256), (2, 300)]


def _log_w(shape, dtype=torch.float32, seed=0, with_zero_weights=True):
    g = torch.Generator().manual_seed(seed)
    lw = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    if with_zero_weights and shape[1] > 2:
        lw[:, 1] = -math.inf  # zero-weight particles must never be picked
    return lw.to(dtype)


# ------------------------------------------------------------------ normalize_log_weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", PAIRS)
def test_normalize_matches_reference(backend, device, shape, dtype):
    lw = _log_w(shape, dtype).to(device)
    ref_n, ref_e = R.normalize_log_weights(lw)
    true_n, true_e = R.normalize_log_weights(lw.double())
    with ops.use_backend(backend):
        n, e = ops.normalize_log_weights(lw)
    assert n.dtype == dtype and e.dtype == dtype and e.shape == (shape[0],)
    finite = torch.isfinite(ref_n)
    assert torch.equal(torch.isfinite(n), finite) and torch.equal(torch.isneginf(n), torch.isneginf(ref_n))
    # error against float64 at most twice the reference's at this precision
    extra = INTERPRETER_BF16_ULPS if interpreted(backend, device) and dtype == torch.bfloat16 else 0.0
    assert_within_reference_error(n[finite], ref_n[finite], true_n[finite], "normalised log-weights", extra)
    assert_within_reference_error(e, ref_e, true_e, "ess", extra)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_normalize_non_contiguous_and_empty(backend, device):
    lw = _log_w((9, 4), seed=7).to(device).t()  # [4, 9] transposed view
    with ops.use_backend(backend):
        n, e = ops.normalize_log_weights(lw)
        n0, e0 = ops.normalize_log_weights(torch.zeros(0, 5, device=device))
        nb, eb = ops.normalize_log_weights(lw[:1].expand(3, 9))  # 0-stride rows
    assert torch.equal(nb, n[:1].expand(3, 9)) and torch.equal(eb, e[:1].expand(3))
    ref_n, ref_e = R.normalize_log_weights(lw.contiguous())
    finite = torch.isfinite(ref_n)
    torch.testing.assert_close(n[finite], ref_n[finite], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e, ref_e, rtol=1e-6, atol=1e-6, equal_nan=True)  # group 1: all -inf
    assert torch.isnan(e[1]) and torch.isfinite(e[[0, 2, 3]]).all()
    assert n0.shape == (0, 5) and e0.shape == (0,)


@pytest.mark.parametrize("backend", ["reference"] + [b for b, d in backend_devices() if d == "cpu"])
def test_normalize_by_hand(backend):
    lw = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -math.inf, -math.inf],
                       [-math.inf] * 4])
    with ops.use_backend(backend):
        n, e = ops.normalize_log_weights(lw)
    torch.testing.assert_close(n[0], torch.full((4,), -math.log(4.0)))
    torch.testing.assert_close(n[1, :2], torch.tensor([math.log(0.75), math.log(0.25)]))
    assert torch.isneginf(n[1, 2:]).all()
    torch.testing.assert_close(e[:2], torch.tensor([4.0, 1.0 / (0.75 ** 2 + 0.25 ** 2)]))
    assert torch.isnan(e[2]) and torch.isnan(n[2]).all()  # all-zero group: the caller checks


# ------------------------------------------------------------------ resample_indices


def _near_ties(lw, u, scheme, tol=1e-5):
    """[B, K] mask of positions within tol of a cdf boundary, where float rounding may differ."""
    w = R._normalized_weights(lw.cpu())
    u = u.cpu().to(w.dtype)
    if scheme == "residual":
        kw = lw.shape[1] * w
        r = kw - torch.floor(kw)
        cdf, pos = R._closed_cdf(r / r.sum(-1, keepdim=True)), u
        # floor(K w) is ambiguous when K w is within tol of a positive integer
        frac = (((kw - torch.round(kw)).abs() < tol) & (torch.round(kw) >= 1)).any(-1, keepdim=True)
    else:
        cdf, pos = R._closed_cdf(w), R.resampling_positions(u, scheme)
        frac = torch.zeros(lw.shape[0], 1, dtype=torch.bool)
    close = ((pos.unsqueeze(-1) - cdf.unsqueeze(1)).abs() < tol).any(-1)
    return close | frac


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", PAIRS)
def test_resample_same_ancestors_as_reference(backend, device, shape, scheme):
    lw = _log_w(shape, seed=1).to(device)
    u = torch.rand(shape, generator=torch.Generator().manual_seed(2)).to(device)
    ref = R.resample_indices(lw, u, scheme)
    with ops.use_backend(backend):
        got = ops.resample_indices(lw, u, scheme)
    assert got.dtype == torch.int64 and got.shape == shape and got.device == lw.device
    if shape[1] == 1:
        assert (got == 0).all()
        return
    ties = _near_ties(lw, u, scheme)
    assert ties.float().mean() < 0.01, "too many near-ties for a meaningful comparison"
    mismatch = (got.cpu() != ref.cpu()) & ~ties
    assert not mismatch.any(), f"{int(mismatch.sum())} ancestors differ away from cdf ties"
    if shape[1] > 2:
        assert not (got == 1).any(), "a zero-weight particle was selected"


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("backend,device", PAIRS)
def test_resample_float64_and_reduced_precision(backend, device, scheme):
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        lw = _log_w((3, 40), dtype, seed=3).to(device)
        u = torch.rand((3, 40), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        u = u.to(device)
        ref = R.resample_indices(lw, u, scheme)
        with ops.use_backend(backend):
            got = ops.resample_indices(lw, u, scheme)
        mismatch = (got.cpu() != ref.cpu()) & ~_near_ties(lw, u, scheme)
        assert not mismatch.any(), f"{dtype}: {int(mismatch.sum())} ancestors differ"


CPU_BACKENDS = ["reference"] + [b for b, d in backend_devices() if d == "cpu"]
INF, NAN = math.inf, math.nan
# Groups without valid weights: the normalisation is NaN throughout, the ancestors are the identity.
INVALID_GROUPS = {
    "all -inf": [-INF] * 5,
    "one NaN": [0.0, NAN, 1.0, -2.0, 0.5],
    "all NaN": [NAN] * 5,
    "one +inf": [INF, 0.0, 0.0, -INF, 0.0],
    "two +inf": [INF, 0.0, INF, 0.0, 0.0],
    "NaN and -inf": [-INF, -INF, NAN, -INF, -INF],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", PAIRS)
def test_invalid_groups_keep_their_particles(backend, device, dtype):
    valid = [0.3, -1.0, 2.0, -INF, 0.0]
    rows = list(INVALID_GROUPS.values())
    lw = torch.tensor([valid] + rows + [valid], dtype=dtype, device=device)
    u = torch.rand(lw.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(device)
    identity = torch.arange(5).expand(len(rows), 5)
    with ops.use_backend(backend):
        n, e = ops.normalize_log_weights(lw)
        got = {s: ops.resample_indices(lw, u, s).cpu() for s in SCHEMES}
    assert torch.isnan(n[1:-1]).all() and torch.isnan(e[1:-1]).all(), list(INVALID_GROUPS)
    assert torch.isfinite(e[[0, -1]]).all()
    for scheme, idx in got.items():
        assert torch.equal(idx[1:-1], identity), (scheme, idx[1:-1].tolist())
        ref = R.resample_indices(lw, u, scheme).cpu()
        assert torch.equal(idx, ref), scheme  # the valid groups around them are untouched
        assert not (idx[[0, -1]] == 3).any()  # ... and never pick a zero weight


@pytest.mark.parametrize("backend,device", PAIRS)
def test_one_huge_weight_and_single_particle_groups(backend, device):
    # exp(lw - max) must not overflow: a weight of e^(1e30) (or e^(1e300) in float64) takes everything
    for dtype, big in ((torch.float32, 1e30), (torch.float64, 1e300), (torch.bfloat16, 1e30)):
        lw = torch.tensor([[0.0, big, -big, 1.0], [-big, -big, -big, -big]], dtype=dtype, device=device)
        u = torch.rand(2, 4, generator=torch.Generator().manual_seed(9)).to(device)
        with ops.use_backend(backend):
            n, e = ops.normalize_log_weights(lw)
            for scheme in SCHEMES:
                idx = ops.resample_indices(lw, u, scheme).cpu()
                assert idx[0].tolist() == [1, 1, 1, 1], (dtype, scheme)
                assert torch.equal(idx[1], R.resample_indices(lw, u, scheme)[1].cpu()), (dtype, scheme)
        # equal huge log-weights: normalised exactly to log(1/4), however large they are
        torch.testing.assert_close(e.cpu().double(), torch.tensor([1.0, 4.0], dtype=torch.float64),
                                   rtol=1e-2, atol=0.0)
        torch.testing.assert_close(n[1].cpu().double(), torch.full((4,), -math.log(4.0), dtype=torch.float64),
                                   rtol=1e-2, atol=0.0)
        assert n[0, 1].item() == 0.0, dtype
    # K = 1: the only ancestor is 0, for valid and invalid groups alike
    lw = torch.tensor([[3.0], [-INF], [NAN], [INF]], device=device)
    with ops.use_backend(backend):
        n, e = ops.normalize_log_weights(lw)
        for scheme in SCHEMES:
            assert (ops.resample_indices(lw, torch.rand(4, 1).to(device), scheme) == 0).all()
    assert n[0].item() == 0.0 and e[0].item() == 1.0 and torch.isnan(e[1:]).all()


@pytest.mark.parametrize("backend,device", PAIRS)
def test_resample_uniforms_outside_the_unit_interval(backend, device):
    """Positions at or past the ends (u = 0, 1, < 0, > 1, +-inf, NaN) give the reference's ancestors:
    #{j : cdf_j <= p}, at most the index of the closed cdf's first 1 (a NaN position counts every
    entry)."""
    lw = torch.tensor([[0.0, 1.0, -1.0, 0.5]] * 5, device=device)
    u = torch.tensor([[0.0, 0.3, 0.6, 0.9], [1.0] * 4, [-0.5, 0.2, 0.2, 0.2], [NAN] * 4,
                      [0.999999, 2.0, INF, -INF]], device=device)
    for scheme in SCHEMES:
        with ops.use_backend(backend):
            got = ops.resample_indices(lw, u, scheme)
        assert torch.equal(got.cpu(), R.resample_indices(lw, u, scheme).cpu()), scheme


@pytest.mark.parametrize("backend,device", PAIRS)
def test_resample_non_contiguous_and_empty(backend, device):
    lw = _log_w((37, 5), seed=10).to(device).t()  # [5, 37] transposed views
    u = torch.rand(37, 5, generator=torch.Generator().manual_seed(11)).to(device).t()
    with ops.use_backend(backend):
        for scheme in SCHEMES:
            got = ops.resample_indices(lw, u, scheme)
            ref = R.resample_indices(lw.contiguous(), u.contiguous(), scheme)
            mismatch = (got.cpu() != ref.cpu()) & ~_near_ties(lw, u, scheme)
            assert not mismatch.any(), scheme
            empty = ops.resample_indices(torch.zeros(0, 3, device=device),
                                         torch.zeros(0, 3, device=device), scheme)
            assert empty.shape == (0, 3) and empty.dtype == torch.int64
            # 0-stride: one group's log-weights broadcast over 5 groups, each with its own uniforms
            shared = lw[:1].expand(5, 37)
            got = ops.resample_indices(shared, u, scheme)
            ref = R.resample_indices(shared.contiguous(), u.contiguous(), scheme)
            assert not ((got.cpu() != ref.cpu()) & ~_near_ties(shared, u, scheme)).any(), scheme


BY_HAND = [
    # equal weights: systematic and stratified keep every particle once, in order
    ("systematic", [0.0] * 5, [0.37] * 5, [0, 1, 2, 3, 4]),
    ("stratified", [0.0] * 5, [0.9, 0.1, 0.5, 0.01, 0.99], [0, 1, 2, 3, 4]),
    # multinomial: cdf [.25 .5 .75 1]; searchsorted right, so a boundary goes to the next particle
    ("multinomial", [0.0] * 4, [0.1, 0.25, 0.74, 0.999999], [0, 1, 2, 3]),
    # one particle holds all the weight
    ("multinomial", [-math.inf, 0.0, -math.inf], [0.0, 0.5, 0.99], [1, 1, 1]),
    ("systematic", [-math.inf, -math.inf, 2.0], [0.0, 0.0, 0.0], [2, 2, 2]),
    # weights (1/2, 1/4, 1/4, 0): systematic with u = 0 -> positions 0, .25, .5, .75
    ("systematic", [math.log(2.0), 0.0, 0.0, -math.inf], [0.0] * 4, [0, 0, 1, 2]),
    # residual, K w = (2, 1, 1, 0) exactly: all slots deterministic
    ("residual", [math.log(2.0), 0.0, 0.0, -math.inf], [0.99] * 4, [0, 0, 1, 2]),
    # residual, K w = (2.4, 1.6, 0, 0): copies (2, 1), slot 3 draws from residuals (.4, .6)
    ("residual", [math.log(0.6), math.log(0.4), -math.inf, -math.inf], [0.5, 0.5, 0.5, 0.3],
     [0, 0, 1, 0]),
    ("residual", [math.log(0.6), math.log(0.4), -math.inf, -math.inf], [0.5, 0.5, 0.5, 0.7],
     [0, 0, 1, 1]),
]


@pytest.mark.parametrize("scheme,log_w,u,expected", BY_HAND)
def test_resample_by_hand(scheme, log_w, u, expected):
    lw = torch.tensor([log_w], dtype=torch.float64)
    uu = torch.tensor([u], dtype=torch.float64)
    for backend in CPU_BACKENDS:
        with ops.use_backend(backend):
            got = ops.resample_indices(lw, uu, scheme)
        assert got.tolist() == [expected], backend


# (call, exception, message): every backend refuses these before running a kernel.
BAD_PARTICLE_CALLS = [
    (lambda: ops.resample_indices(torch.zeros(2, 3), torch.rand(2, 3), "bogus"), ValueError,
     "scheme='bogus' is not a resampling scheme; allowed: multinomial"),
    (lambda: ops.resample_indices(torch.zeros(2, 3), torch.rand(2, 4), "multinomial"), ValueError,
     r"uniforms has shape \(2, 4\) but log_w has shape \(2, 3\)"),
    (lambda: ops.resample_indices(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), "systematic"),
     TypeError, "uniforms has dtype torch.int64; allowed: float32"),
    (lambda: ops.resample_indices(torch.zeros(2, 3, dtype=torch.int32), torch.rand(2, 3), "residual"),
     TypeError, "log_w has dtype torch.int32; allowed: float32"),
    (lambda: ops.resample_indices(torch.zeros(2, 3), torch.rand(2, 3, device="meta"), "stratified"),
     ValueError, "uniforms is on meta but log_w is on cpu"),
    (lambda: ops.resample_indices(torch.zeros(2, 3), torch.rand(2, 3), None), ValueError,
     "scheme=None is not a resampling scheme"),
    (lambda: ops.normalize_log_weights(torch.zeros(6)), ValueError,
     r"log_w has shape \(6,\); allowed: \[B, K\] with K >= 1"),
    (lambda: ops.normalize_log_weights(torch.zeros(2, 0)), ValueError, r"log_w has shape \(2, 0\)"),
    (lambda: ops.normalize_log_weights(torch.zeros(2, 3, 4)), ValueError, r"log_w has shape \(2, 3, 4\)"),
    (lambda: ops.normalize_log_weights(torch.zeros(2, 3, dtype=torch.bool)), TypeError,
     "log_w has dtype torch.bool; allowed"),
    (lambda: ops.normalize_log_weights(torch.zeros(2, 3, dtype=torch.complex64)), TypeError,
     "log_w has dtype torch.complex64; allowed"),
    (lambda: ops.normalize_log_weights([[0.0]]), TypeError, "log_w must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", range(len(BAD_PARTICLE_CALLS)))
def test_particle_ops_reject_bad_arguments(backend, case):
    call, exc, msg = BAD_PARTICLE_CALLS[case]
    with ops.use_backend(backend), pytest.raises(exc, match=msg):
        call()


# ------------------------------------------------------------------ gather_particles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend,device", PAIRS)
def test_gather_matches_reference(backend, device, dtype):
    g = torch.Generator().manual_seed(5)
    shapes = [(1, 1), (2, 3, 5), (3, 4, 2, 7), (2, 5, 1025)]
    if device == "cuda":  # rows of several tiles, and more tiles than the CUDA grid's blocks
        shapes += [(3, 7, 4099), (64, 64, 515)]
    for shape in shapes:
        x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        idx = torch.randint(0, shape[1], shape[:2], generator=g).to(device)
        with ops.use_backend(backend):
            got = ops.gather_particles(x, idx)
            assert torch.equal(got, R.gather_particles(x, idx))
            inplace, scratch = x.clone(), torch.empty_like(x)
            assert ops.gather_particles_(inplace, idx, scratch) is inplace
            assert torch.equal(inplace, got)
        if x.shape[0] * x.shape[1] > 64:
            continue  # the reference, checked below on the small shapes, stands for the definition
        for b in range(shape[0]):  # the definition, element by element
            for k in range(shape[1]):
                assert torch.equal(got[b, k], x[b, idx[b, k]])


@pytest.mark.parametrize("backend,device", PAIRS)
def test_gather_non_contiguous(backend, device):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 6, 5, generator=g).to(device).transpose(2, 3)  # [B, K, 5, 6] strided
    idx = torch.randint(0, 3, (3, 4), generator=g).to(device).t()  # [B, K] strided too
    with ops.use_backend(backend):
        got = ops.gather_particles(x, idx)
        inplace = x.clone()
        ops.gather_particles_(inplace, idx, torch.empty_like(x))
    assert torch.equal(got, R.gather_particles(x, idx))
    assert torch.equal(inplace, got)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_gather_broadcast_and_empty(backend, device):
    g = torch.Generator().manual_seed(12)
    idx = torch.randint(0, 3, (4, 3), generator=g).to(device)
    row = torch.randn(1, 3, 5, generator=g).to(device)
    for x in (row.expand(4, 3, 5), torch.randn(4, 1, 5, generator=g).to(device).expand(4, 3, 5)):
        with ops.use_backend(backend):
            got = ops.gather_particles(x, idx)  # 0-stride input: read as x.contiguous()
        assert torch.equal(got, R.gather_particles(x.contiguous(), idx)) and got.is_contiguous()
    for shape in ((0, 3, 2), (2, 3, 0), (2, 0)):
        x = torch.randn(shape).to(device)
        i = torch.zeros(shape[:2], dtype=torch.long, device=device)
        with ops.use_backend(backend):
            assert ops.gather_particles(x, i).shape == shape
            assert ops.gather_particles_(x, i, torch.empty_like(x)).shape == shape


@pytest.mark.parametrize("backend,device", PAIRS)
def test_gather_any_dtype(backend, device):
    """Particles may carry any dtype (labels, masks, complex states): the gather moves elements."""
    g = torch.Generator().manual_seed(14)
    idx = torch.randint(0, 3, (2, 3), generator=g).to(device)
    for dtype in (torch.float16, torch.int64, torch.int8, torch.bool, torch.complex64):
        x = (10 * torch.randn(2, 3, 5, generator=g)).to(dtype).to(device)
        want = R.gather_particles(x, idx)
        with ops.use_backend(backend):
            assert torch.equal(ops.gather_particles(x, idx), want), dtype
            inplace = x.clone()
            ops.gather_particles_(inplace, idx, torch.empty_like(x))
        assert torch.equal(inplace, want), dtype


@pytest.mark.parametrize("backend,device", PAIRS)
def test_gather_in_place_with_overlapping_scratch(backend, device):
    """scratch may be x itself or share memory with it: x still gets the old x[b, idx[b, k]]."""
    g = torch.Generator().manual_seed(13)
    shape, n = (3, 4, 5), 60
    idx = torch.randint(0, 4, (3, 4), generator=g).to(device)
    buf = torch.randn(n + 7, generator=g).to(device)
    want = R.gather_particles(buf[:n].view(shape).clone(), idx)
    with ops.use_backend(backend):
        x = buf[:n].clone().view(shape)
        assert ops.gather_particles_(x, idx, x) is x
        assert torch.equal(x, want), "scratch is x"
        work = buf.clone()
        x, scratch = work[:n].view(shape), work[7:].view(shape)  # scratch starts 7 elements into x
        ops.gather_particles_(x, idx, scratch)
        assert torch.equal(x, want), "scratch overlaps x"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gather_index_out_of_range_raises(backend):
    """On CPU every backend refuses an ancestor outside [0, K) (never a particle of the next group)."""
    x = torch.randn(3, 4, 2)
    for bad in (4, -1):
        idx = torch.tensor([[0, 1, 2, 3], [0, bad, 1, 1], [3, 3, 3, 3]])
        with ops.use_backend(backend):
            with pytest.raises(RuntimeError, match=rf"idx(\[1, 1\] = {bad} is out of range| holds an "
                                                   r"ancestor outside) \[0, 4\)"):
                ops.gather_particles(x, idx)
            y = x.clone()
            with pytest.raises(RuntimeError, match=r"idx.* \[0, 4\)"):
                ops.gather_particles_(y, idx, torch.empty_like(x))
            assert torch.equal(y, x), "a refused in-place gather must leave x as it was"
            # particles without elements: the indices are still checked (as by the reference)
            empty = torch.randn(3, 4, 0)
            with pytest.raises(RuntimeError, match=r"idx.* \[0, 4\)"):
                ops.gather_particles(empty, idx)
            with pytest.raises(RuntimeError, match=r"idx.* \[0, 4\)"):
                ops.gather_particles_(empty, idx, empty.clone())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gather_rejects_bad_arguments(backend):
    x = torch.randn(2, 3, 4)
    with ops.use_backend(backend):
        with pytest.raises(TypeError, match="idx has dtype torch.int32"):
            ops.gather_particles(x, torch.zeros(2, 3, dtype=torch.int32))
        with pytest.raises(ValueError, match=r"idx has shape \(3, 2\)"):
            ops.gather_particles(x, torch.zeros(3, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="scratch has shape"):
            ops.gather_particles_(x, torch.zeros(2, 3, dtype=torch.long), torch.empty(2, 3))
        with pytest.raises(ValueError, match=r"x has shape \(4,\); allowed: \[B, K, ...\]"):
            ops.gather_particles(torch.randn(4), torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="idx is on meta but x is on cpu"):
            ops.gather_particles(x, torch.zeros(2, 3, dtype=torch.long, device="meta"))
        with pytest.raises(TypeError, match="scratch has dtype torch.float64 but x has dtype torch.float32"):
            ops.gather_particles_(x, torch.zeros(2, 3, dtype=torch.long), x.double())
        with pytest.raises(TypeError, match="idx has dtype torch.float32; allowed: torch.int64"):
            ops.gather_particles(x, torch.zeros(2, 3))
        with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
            ops.gather_particles([[0.0]], torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("backend,device", PAIRS + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_gather_in_place_with_expanded_scratch_and_refuses_expanded_x(backend, device):
    """scratch is clobbered at will: an expanded one is fine (the op stages elsewhere); an expanded x
    cannot be written and is refused before anything is."""
    x = torch.randn(2, 3, 4).to(device)
    idx = torch.tensor([[0, 0, 1], [2, 1, 0]], device=device)
    want = R.gather_particles(x, idx)
    with ops.use_backend(backend):
        got = x.clone()
        ops.gather_particles_(got, idx, torch.empty(1, 1, 4, device=device).expand(2, 3, 4))
        assert torch.equal(got, want)
        with pytest.raises(ValueError, match=r"x has shape .* and strides .*: an expanded view"):
            ops.gather_particles_(x[:, :1].expand(2, 3, 4), idx, torch.empty_like(x))
    if backend == "cpp":
        with pytest.raises(ValueError, match=r"x has shape .* and strides .*: an expanded view"):
            torch.ops.glass_fast.gather_particles_(x[:, :1].expand(2, 3, 4), idx, torch.empty_like(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_groups_larger_than_a_triton_block(backend):
    """The Triton kernels hold a group in one block (at most 2^20 entries): a larger K is refused
    with the reason, not left to a compiler error; the other backends take it."""
    k = 2**20 + 1
    lw = torch.zeros(1, k)
    lw[0, 7] = 30.0  # all the weight on particle 7
    with ops.use_backend(backend):
        if backend == "triton":
            for call in (lambda: ops.normalize_log_weights(lw),
                         lambda: ops.resample_indices(lw, torch.rand(1, k), "systematic")):
                with pytest.raises(ValueError, match=rf"K = {k} particles per group; the triton backend "
                                                     r"takes at most 1048576"):
                    call()
            return
        norm, ess = ops.normalize_log_weights(lw)
        idx = ops.resample_indices(lw, torch.full((1, k), 0.5), "systematic")
    assert abs(ess.item() - 1.0) < 1e-3 and norm[0, 7].abs() < 1e-3
    assert (idx == 7).float().mean() > 0.99


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("backend,device", PAIRS + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_zero_weight_particles_are_never_drawn(backend, device, scheme):
    """A particle of weight zero (log-weight -inf) after the last positive one is never an ancestor,
    even for positions just below 1 that exceed the rounded cumulative sum of the positive weights
    (closing only the cdf's last entry at 1 handed [cdf_{K-2}, 1) to the last particle)."""
    g = torch.Generator().manual_seed(11)
    lw = torch.randn(256, 6, generator=g)
    lw[:, 4:] = float("-inf")
    lw[:128, 1] = float("-inf")  # and one in the middle
    u = torch.full_like(lw, 1.0 - 2.0**-24)  # the largest float32 below 1
    with ops.use_backend(backend):
        idx = ops.resample_indices(lw.to(device), u.to(device), scheme).cpu()
    drawn = lw.gather(1, idx)
    assert torch.isfinite(drawn).all(), f"{int((~torch.isfinite(drawn)).sum())} draws of zero weight"


def test_triton_gather_rows_of_more_tiles_than_the_grid_holds():
    """CUDA caps the grid's second dimension at 65535 tiles (rows past 67M elements at 1024 per tile): the
    kernel then loops over the tiles beyond it. The loop is run here with a cap of 2 and 4-element tiles."""
    if "triton" not in ops.available_backends():
        pytest.skip("triton backend unavailable here")
    from glass_fast.kernels.gather import gather_particles_triton
    x = torch.randn(2, 3, 5, 19)   # rows of 95 elements: 24 tiles of 4
    idx = torch.tensor([[2, 0, 2], [1, 1, 0]])
    want = R.gather_particles(x, idx)
    for cap in (1, 2, 5, 24, 100):
        out = torch.full_like(x, math.nan)
        gather_particles_triton(x, idx, out, block=4, grid_y_limit=cap)
        assert torch.equal(out, want), cap
