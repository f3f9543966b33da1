"""The shipped digit models: offline loading, shapes, accuracy, Frechet distance algebra, rewards."""
import subprocess
import sys

import pytest
import torch

from glass_fast import zoo
from glass_fast.zoo.data import DIGITS_FILE


def test_real_digits_splits_are_disjoint_and_complete():
    xa, ya = zoo.real_digits("all")
    xt, yt = zoo.real_digits("test")
    xr, yr = zoo.real_digits("train")
    assert xa.shape == (1797, 1, 8, 8) and ya.shape == (1797,)
    assert len(xt) + len(xr) == 1797 and len(xt) == 359
    assert xa.min() == -1.0 and xa.max() == 1.0
    # Every digit appears in the held-out split.
    assert set(yt.tolist()) == set(range(10))
    x3, y3 = zoo.real_digits("test", digit=3)
    assert len(x3) > 0 and bool((y3 == 3).all())


def test_real_digits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split='val'"):
        zoo.real_digits("val")
    with pytest.raises(ValueError, match="digit=10"):
        zoo.real_digits("test", digit=10)


def test_loading_needs_neither_network_nor_scikit_learn():
    # A fresh interpreter in which importing scikit-learn fails and sockets cannot be opened.
    code = (
        "import sys, socket\n"
        "sys.modules['sklearn'] = None\n"
        "def _no(*a, **k): raise RuntimeError('network used')\n"
        "socket.socket.connect = _no; socket.socket.connect_ex = _no; socket.create_connection = _no\n"
        "import torch\n"
        "from glass_fast import zoo\n"
        "x, y = zoo.real_digits('test')\n"
        "net = zoo.load_digits_velocity_net()\n"
        "clf = zoo.load_digit_classifier()\n"
        "assert net(x[:2], torch.rand(2)).shape == (2, 1, 8, 8)\n"
        "assert clf(x[:2]).shape == (2, 10)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_network_shapes_and_dtypes():
    net = zoo.load_digits_velocity_net(dtype=torch.float64)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    out = net(x, torch.rand(5, dtype=torch.float64))
    assert out.shape == x.shape and out.dtype == torch.float64
    clf = zoo.load_digit_classifier()
    assert clf(x.float()).shape == (5, 10)
    assert clf.features(x.float()).shape == (5, 64)
    assert zoo.digit_features(x.float()).shape == (5, 64)
    with pytest.raises(ValueError, match="dtype='int8'|dtype=torch.int8"):
        zoo.load_digits_velocity_net(dtype="int8")


def test_classifier_accuracy_on_held_out_digits():
    x, y = zoo.real_digits("test")
    acc = (zoo.digit_log_probs(x).argmax(-1) == y).double().mean().item()
    # Measured 0.994 at training time; 0.95 leaves room for numerics across torch builds.
    assert acc > 0.95


def test_frechet_distance_identity_and_symmetry():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    assert zoo.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert zoo.frechet_distance(a, b) == pytest.approx(zoo.frechet_distance(b, a), rel=1e-8)
    assert zoo.frechet_distance(a, b) > 0


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_frechet_distance_closed_form_for_shift_and_scale(scale):
    # b = scale * a + shift has covariance scale^2 C_a and mean scale mu_a + shift exactly, so
    # FD = |(scale - 1) mu_a + shift|^2 + tr(C_a) (1 - scale)^2 with no sampling error at all.
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    b = scale * a + shift
    dmu = (scale - 1) * a.mean(0) + shift
    expected = dmu.square().sum().item() + torch.cov(a.T).trace().item() * (1 - scale) ** 2
    assert zoo.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="feats_a"):
        zoo.frechet_distance(torch.randn(10), torch.randn(10, 3))
    with pytest.raises(ValueError, match="widths differ"):
        zoo.frechet_distance(torch.randn(10, 2), torch.randn(10, 3))


def test_frechet_to_real_ranks_real_digits_closest():
    real_train, _ = zoo.real_digits("train")
    g = torch.Generator().manual_seed(2)
    noisy = (real_train[:359] + 0.5 * torch.randn(real_train[:359].shape, generator=g)).clamp(-1, 1)
    assert zoo.frechet_to_real(real_train) < zoo.frechet_to_real(noisy)


def test_reward_is_a_log_probability():
    x, _ = zoo.real_digits("test")
    x = x[:64]
    per_digit = torch.stack([zoo.digit_reward(d)(x) for d in range(10)], dim=-1)
    assert per_digit.shape == (64, 10)
    assert torch.allclose(torch.logsumexp(per_digit, dim=-1), torch.zeros(64), atol=1e-5)
    assert bool((per_digit <= 0).all())


def test_reward_keeps_leading_dims_and_gradients():
    r = zoo.digit_reward(3)
    x = torch.zeros(2, 4, 1, 8, 8, requires_grad=True)
    out = r(x)
    assert out.shape == (2, 4)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_reward_rejects_bad_digit():
    for bad in (10, -1, 2.0, True):
        with pytest.raises(ValueError, match="digit="):
            zoo.digit_reward(bad)


def test_metrics_on_real_digits():
    x, _ = zoo.real_digits("test")
    assert 0.8 < zoo.confident_rate(x) <= 1.0
    # The held-out split holds all ten digits in nearly equal numbers.
    assert zoo.class_diversity(x) > 9.5
    assert zoo.class_diversity(zoo.real_digits("test", digit=4)[0]) < 1.5


def test_flow_model_wraps_the_network():
    model = zoo.digits_flow_model()
    net = zoo.load_digits_velocity_net()
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(model.velocity(x, t), net(x, t), atol=1e-5)
    # Linear schedule, velocity prediction: D = x + (1 - t) u.
    assert torch.allclose(model.denoise(x, t), x + (1 - t).view(-1, 1, 1, 1) * net(x, t), atol=1e-5)


def test_shipped_images_match_scikit_learn():
    datasets = pytest.importorskip("sklearn.datasets")
    from safetensors.torch import load_file

    shipped = load_file(DIGITS_FILE)
    d = datasets.load_digits()
    assert torch.equal(shipped["images"], torch.tensor(d.images, dtype=torch.uint8))
    assert torch.equal(shipped["labels"], torch.tensor(d.target, dtype=torch.uint8))


@pytest.mark.slow
def test_ode_samples_are_confidently_classified_like_real_digits():
    import glass_fast

    model = zoo.digits_flow_model()
    g = torch.Generator().manual_seed(0)
    n = 1000
    x = glass_fast.sample(model, torch.randn(n, 1, 8, 8, generator=g), method="ode", transitions=5, inner_steps=10)
    real_rate = zoo.confident_rate(zoo.real_digits("test")[0])
    gen_rate = zoo.confident_rate(x)
    # Quality bar: within 0.1 of the real rate, plus 3 binomial standard errors of the two estimates.
    se = (real_rate * (1 - real_rate) / 359 + gen_rate * (1 - gen_rate) / n) ** 0.5
    assert gen_rate > real_rate - 0.1 - 3 * se
    assert zoo.class_diversity(x) > 9.0


@pytest.mark.parametrize("module", ["glass_fast.zoo", "glass_fast.zoo.data", "glass_fast.zoo.models",
                                    "glass_fast.zoo.metrics"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


@pytest.mark.parametrize("metric", [zoo.digit_features, zoo.confident_rate, zoo.class_diversity])
def test_metrics_refuse_images_they_would_misread(metric):
    # Each used to return a number: [N, 3, 8, 8] as 3N images, no images as diversity 1.0 and confident NaN,
    # NaN images as all "digit 0", raw 0..16 pixels clamped to white.
    bad = [(torch.zeros(2, 3, 8, 8), ValueError, r"x must be images \[N, 1, 8, 8\]"),
           (torch.zeros(0, 1, 8, 8), ValueError, r"x must be images \[N, 1, 8, 8\] \(N >= 1\)"),
           (torch.full((3, 1, 8, 8), float("nan")), ValueError, "x holds NaN or Inf"),
           (torch.full((3, 1, 8, 8), 16, dtype=torch.uint8), TypeError, "x must be floating images in")]
    for x, err, match in bad:
        with pytest.raises(err, match=match):
            metric(x)


def test_confident_rate_threshold_is_a_probability():
    x, _ = zoo.real_digits("test")
    for bad in (1.0, 2.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="threshold must be a probability in"):
            zoo.confident_rate(x[:4], threshold=bad)
    # The rate falls as the threshold rises, and every image clears threshold 0.
    assert zoo.confident_rate(x, threshold=0.0) == 1.0
    assert zoo.confident_rate(x, threshold=0.5) >= zoo.confident_rate(x, threshold=0.99)


def test_frechet_distance_refuses_non_finite_features():
    a = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[3, 1] = float("nan")
    with pytest.raises(ValueError, match="feats_b holds NaN or Inf"):
        zoo.frechet_distance(a, b)
    with pytest.raises(ValueError, match="feats_a has list"):
        zoo.frechet_distance([[0.0, 1.0]], a)


def test_bool_digit_and_non_dtype_are_refused():
    with pytest.raises(ValueError, match="digit=True"):
        zoo.real_digits("test", digit=True)      # used to select the images of digit 1
    for bad in (None, 3, torch.int8):
        with pytest.raises(ValueError, match="is not allowed; use a floating torch dtype"):
            zoo.load_digit_classifier(dtype=bad)


def test_experiment_helpers_name_bad_arguments():
    from glass_fast.zoo.experiments import Settings, run_steering_method

    noise = torch.zeros(1, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="method 'beam' is not allowed"):   # was an unpacking error
        run_steering_method("beam", zoo.digits_flow_model(), 3, noise, Settings(), torch.Generator())
    with pytest.raises(ValueError, match="batch must be an integer >= 1, got 0"):
        zoo.digit_features(torch.zeros(2, 1, 8, 8), batch=0)
