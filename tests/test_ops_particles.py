"""Particle ops: log-weight normalisation, resampling indices and gathers, every backend."""
import math
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from glass_fast import ops  # noqa: E402
from glass_fast.ops import reference as R  # noqa: E402
from glass_fast.ops.testing import backend_device_params, backend_devices  # noqa: E402


PAIRS = backend_device_params()
SCHEMES = list(R.RESAMPLING_SCHEMES)
# All -inf groups and exactly-integer residual weights divide 0 by 0 by design (NaN, then unused);
# Triton's CPU interpreter reports that through numpy.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
SHAPES = [(1, 1), (1, 7), (5, 37), (3, 256), (2, 300)]


def _log_w(shape, dtype=torch.float32, seed=0, with_zero_weights=True):
    g = torch.Generator().manual_seed(seed)
    lw = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    if with_zero_weights and shape[1] > 2:
        lw[:, 1] = -math.inf  # zero-weight particles must never be picked
    return lw.to(dtype)


# ------------------------------------------------------------------ normalize_log_weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", PAIRS)
def test_normalize_matches_reference(backend, device, shape, dtype):
    lw = _log_w(shape, dtype).to(device)
    ref_n, ref_e = R.normalize_log_weights(lw)
    with ops.use_backend(backend):
        n, e = ops.normalize_log_weights(lw)
    assert n.dtype == dtype and e.dtype == dtype and e.shape == (shape[0],)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=2e-2)
    finite = torch.isfinite(ref_n)
    assert torch.equal(torch.isfinite(n), finite)
    torch.testing.assert_close(n[finite].cpu(), ref_n[finite].cpu(), **tol)
    torch.testing.assert_close(e.cpu(), ref_e.cpu(), **tol)


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
    for dtype in (torch.float64, torch.bfloat16):
        lw = _log_w((3, 40), dtype, seed=3).to(device)
        u = torch.rand((3, 40), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        u = u.to(device)
        ref = R.resample_indices(lw, u, scheme)
        with ops.use_backend(backend):
            got = ops.resample_indices(lw, u, scheme)
        mismatch = (got.cpu() != ref.cpu()) & ~_near_ties(lw, u, scheme)
        assert not mismatch.any(), f"{dtype}: {int(mismatch.sum())} ancestors differ"


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
    backends = ["reference"] + [b for b, d in backend_devices() if d == "cpu"]
    for backend in backends:
        with ops.use_backend(backend):
            got = ops.resample_indices(lw, uu, scheme)
        assert got.tolist() == [expected], backend


def test_resample_rejects_bad_arguments():
    lw = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="scheme='bogus' is not a resampling scheme"):
        ops.resample_indices(lw, torch.rand(2, 3), "bogus")
    with pytest.raises(ValueError, match=r"uniforms has shape \(2, 4\)"):
        ops.resample_indices(lw, torch.rand(2, 4), "multinomial")
    with pytest.raises(ValueError, match=r"log_w has shape \(6,\)"):
        ops.normalize_log_weights(torch.zeros(6))


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
    idx = torch.randint(0, 3, (4, 3), generator=g).to(device)
    with ops.use_backend(backend):
        got = ops.gather_particles(x, idx)
        inplace = x.clone()
        ops.gather_particles_(inplace, idx, torch.empty_like(x))
    assert torch.equal(got, R.gather_particles(x, idx))
    assert torch.equal(inplace, got)


def test_gather_rejects_bad_arguments():
    x = torch.randn(2, 3, 4)
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
