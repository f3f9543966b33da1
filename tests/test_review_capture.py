"""Compiled transitions against eager ones: every method and solver, every way a transition is entered
(plain, callback, denoised= and first_output= hand-ins), per-sample rows, half-precision states, max_batch,
project hooks and steering; how often code is compiled, which code a model runs, and the call accounting.

Tolerances: the "eager" and "aot_eager" backends run the eager kernels (aot_eager after decompositions that may
reorder a few float32 roundings per stage): with states of magnitude ~3 over at most 16 stages, a few float32
roundings (2^-24 relative each) per stage stay far below 1e-5. A half-precision state is rounded once per
transition, where such a float32 difference can flip the rounding by one unit of the state's dtype: two units
(2 * eps, relative) bound it.
"""
import pytest
import torch

import glass_fast as gf
from glass_fast.capture import _CODE_BY_SIGNATURE

CUDA = torch.cuda.is_available()
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch.compiler.reset()
    yield


class CountingBackend:
    """A torch.compile backend counting the graphs it is handed (one per compilation), running them eagerly.
    Each instance is its own compile argument, so a test sees only its own compilations."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def net_fn(seed=0, scale=1.0, dtype=None):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def fn(x, t):
        return scale * net(torch.cat([x, t[:, None].to(x.dtype)], 1))
    fn.net = net
    return fn


def mlp(seed=0, scale=1.0, dtype=None, max_batch=None):
    return gf.FlowModel(net_fn(seed, scale), gf.LinearSchedule(), dtype=dtype, max_batch=max_batch)


def gen(seed):
    return torch.Generator().manual_seed(seed)


NOISE = torch.randn(12, 2, generator=gen(0))
COMBOS = [("glass", "euler"), ("glass", "midpoint"), ("glass", "heun"), ("ode", "euler"), ("ode", "midpoint"),
          ("ode", "heun"), ("sde", "euler"), ("plugin", "euler")]


def counted(model, fn, *args, **kwargs):
    """(fn's result, model calls it made)."""
    before = model.calls
    out = fn(*args, **kwargs)
    return out, model.calls - before


@pytest.mark.parametrize("method,solver", COMBOS)
@torch.no_grad()
def test_every_way_into_a_transition_equals_eager(method, solver):
    m = mlp()
    kw = dict(method=method, solver=solver, transitions=3, inner_steps=4)
    eager, comp = gf.Sampler(m, **kw), gf.Sampler(m, compile={"backend": "aot_eager", "fullgraph": True}, **kw)
    for callback in (None, lambda k, t, x, x0: None):
        want, want_calls = counted(m, eager.run, NOISE, generator=gen(1), callback=callback)
        got, got_calls = counted(m, comp.run, NOISE, generator=gen(1), callback=callback)
        torch.testing.assert_close(got, want, **TOL)
        assert got_calls == want_calls == eager.calls
    for k in range(eager.transitions):
        x = torch.randn(12, 2, generator=gen(10 + k))
        out, d = eager.predict(k, x)
        for hand in ({"denoised": d}, {"first_output": out}):
            want, want_calls = counted(m, eager.step, k, x, generator=gen(3), **hand)
            got, got_calls = counted(m, comp.step, k, x, generator=gen(3), **hand)
            torch.testing.assert_close(got, want, **TOL)
            assert got_calls == want_calls == len(eager.plans[k].kinds) - 1


@pytest.mark.parametrize("method", ["glass", "plugin"])
@torch.no_grad()
def test_per_sample_rows_compiled_equal_eager(method):
    m = mlp()
    kw = dict(method=method, transitions=3, inner_steps=4, rho=lambda t, tn: torch.linspace(-0.5, 0.9, 12,
                                                                                             dtype=torch.float64))
    eager, comp = gf.Sampler(m, **kw), gf.Sampler(m, compile={"backend": "aot_eager"}, **kw)
    assert eager.plans[0].coefs.dim() == 3   # rows per state, not shared
    for callback in (None, lambda k, t, x, x0: None):
        want, want_calls = counted(m, eager.run, NOISE, generator=gen(1), callback=callback)
        got, got_calls = counted(m, comp.run, NOISE, generator=gen(1), callback=callback)
        torch.testing.assert_close(got, want, **TOL)
        assert got_calls == want_calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method,solver", [("glass", "heun"), ("ode", "midpoint"), ("sde", "euler")])
@torch.no_grad()
def test_half_precision_states_with_a_float32_network(dtype, method, solver):
    m = mlp(dtype=torch.float32)
    kw = dict(method=method, solver=solver, transitions=3, inner_steps=4, dtype=dtype)
    eager, comp = gf.Sampler(m, **kw), gf.Sampler(m, compile={"backend": "aot_eager"}, **kw)
    tol = dict(rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
    noise = NOISE.to(dtype)
    for callback in (None, lambda k, t, x, x0: None):
        want, want_calls = counted(m, eager.run, noise, generator=gen(1), callback=callback)
        got, got_calls = counted(m, comp.run, noise, generator=gen(1), callback=callback)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)
        assert got_calls == want_calls
    out, d = eager.predict(1, noise)
    assert out.dtype == torch.float32 and d.dtype == dtype
    for hand in ({"denoised": d}, {"first_output": out}):
        want, want_calls = counted(m, eager.step, 1, noise, generator=gen(3), **hand)
        got, got_calls = counted(m, comp.step, 1, noise, generator=gen(3), **hand)
        torch.testing.assert_close(got, want, **tol)
        assert got_calls == want_calls


@torch.no_grad()
def test_max_batch_and_a_project_hook_compiled_equal_eager():
    m = mlp()
    hook = gf.Inpaint(m.schedule, torch.tensor([[1.5, 0.0]]), torch.tensor([[0.0, 1.0]]), NOISE)
    kw = dict(transitions=3, inner_steps=4)
    want, want_calls = counted(m, gf.sample, m, NOISE, generator=gen(1), project=hook, **kw)
    for extra in ({"max_batch": 5}, {"max_batch": 5, "callback": lambda k, t, x, x0: None}):
        got, got_calls = counted(m, gf.sample, m, NOISE, generator=gen(1), project=hook,
                                 compile={"backend": "aot_eager"}, **extra, **kw)
        torch.testing.assert_close(got, want, **TOL)   # split matmuls round differently
        assert torch.all(got[:, 0] == 1.5)
        # max_batch counts batched calls: the unsplit ones the eager run made, each split into three chunks.
        assert got_calls == want_calls == 12


@pytest.mark.parametrize("method", ["glass", "sde"])
@torch.no_grad()
def test_steering_and_search_compiled_equal_eager(method):
    m = mlp()
    reward = lambda x: -(x - 1.0).square().sum(-1)   # noqa: E731
    noise = torch.randn(3, 4, 2, generator=gen(5))
    kw = dict(method=method, transitions=3, inner_steps=4)
    hook = gf.Inpaint(m.schedule, torch.tensor([[1.5, 0.0]]), torch.tensor([[0.0, 1.0]]), noise)
    runs = [(gf.fk_steering, {}), (gf.fk_steering, {"value_samples": 2}), (gf.fk_steering, {"project": hook}),
            (gf.beam_search, {}), (gf.beam_search, {"project": hook}), (gf.best_of_n, {})]
    for fn, extra in runs:
        want, want_calls = counted(m, fn, m, reward, noise, generator=gen(1), **extra, **kw)
        got, got_calls = counted(m, fn, m, reward, noise, generator=gen(1), compile={"backend": "aot_eager"},
                                 **extra, **kw)
        torch.testing.assert_close(got.samples, want.samples, **TOL)
        assert got.nfe == want.nfe and got_calls == want_calls, (fn.__name__, extra)


@torch.no_grad()
def test_a_reused_sampler_compiles_once_per_variant_and_shares_across_samplers_and_models():
    backend = CountingBackend()
    m = mlp()
    kw = dict(method="glass", solver="heun", transitions=4, inner_steps=4, compile={"backend": backend})
    sampler = gf.Sampler(m, **kw)
    kinds = {p.kinds for p in sampler.plans}
    assert len(kinds) == 2   # heun's last transition ends with an Euler step: other stage kinds
    for seed in range(3):
        sampler.run(torch.randn(12, 2, generator=gen(seed)))
    assert backend.graphs == 2
    sampler.run(NOISE, callback=lambda k, t, x, x0: None)   # the first call handed in: its own variant
    assert backend.graphs == 4
    # Another Sampler of the same settings, and another network of the same architecture and other weights,
    # run the same compiled code (weights are inputs, not constants of the graph) with their own results.
    gf.Sampler(m, **kw).run(NOISE)
    other = mlp(seed=1)
    got = gf.Sampler(other, **kw).run(NOISE, generator=gen(1))
    assert backend.graphs == 4
    want = gf.sample(other, NOISE, method="glass", solver="heun", transitions=4, inner_steps=4, generator=gen(1))
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, sampler.run(NOISE, generator=gen(1)))


@torch.no_grad()
def test_variants_keep_their_code_beyond_the_recompile_limit():
    # Shapes, state dtypes and hand-in variants are each their own code object: building more variants than
    # dynamo's per-code limit leaves every earlier variant compiled (run again: nothing compiles, calls exact).
    backend = CountingBackend()
    m = mlp(dtype=torch.float32)
    sampler = gf.Sampler(m, transitions=2, inner_steps=2, compile={"backend": backend})
    variants = [torch.randn(n, 2) for n in range(3, 10)] + [NOISE.to(torch.bfloat16), NOISE.to(torch.float16)]
    for x in variants:
        sampler.run(x)
        sampler.run(x, callback=lambda k, t, x, x0: None)
        out, d = sampler.predict(0, x)
        sampler.step(0, x, denoised=d)
    compiled = backend.graphs
    assert compiled == 3 * len(variants)
    for x in variants:
        for callback in (None, lambda k, t, x, x0: None):
            _, calls = counted(m, sampler.run, x, callback=callback)
            assert calls == sampler.calls
        _, calls = counted(m, sampler.step, 0, x, denoised=sampler.predict(0, x)[1])
        assert calls == 1
    assert backend.graphs == compiled


@pytest.mark.parametrize("fullgraph", [False, True])
@torch.no_grad()
def test_models_that_trace_differently_each_run_compiled_and_are_counted_once(fullgraph):
    # Networks differing in a Python constant (a guidance scale sweep) share the transition's code object and
    # each needs its own entry. Past dynamo's per-code limit the transition used to run eagerly (a logged
    # warning only) with its model calls counted twice, once by the model and once by the Sampler, or with
    # fullgraph=True to fail (FailOnRecompileLimitHit).
    backend = CountingBackend()
    kw = dict(transitions=2, inner_steps=2)
    with torch._dynamo.config.patch(recompile_limit=2):
        for i in range(5):
            m = mlp(scale=1.0 + 0.1 * i)
            sampler = gf.Sampler(m, compile={"backend": backend, "fullgraph": fullgraph}, **kw)
            got, calls = counted(m, sampler.run, NOISE, generator=gen(1))
            assert calls == sampler.calls == 4, i
            want = gf.sample(m, NOISE, generator=gen(1), **kw)
            torch.testing.assert_close(got, want, **TOL)
            assert backend.graphs == i + 1, i   # compiled, not run eagerly
            _, calls = counted(m, sampler.run, NOISE)   # and kept compiled
            assert calls == 4 and backend.graphs == i + 1, i


@torch.no_grad()
def test_model_calls_are_counted_once_when_a_graph_break_falls_back_to_eager():
    # A network with a graph break makes FlowModel.__call__ a compiled frame of its own, shared by every
    # shape: past its recompile limit the call runs eagerly and counts itself, beside the Sampler's count.
    inner = net_fn()

    def fn(x, t):
        torch._dynamo.graph_break()
        return inner(x, t)
    m = gf.FlowModel(fn, gf.LinearSchedule())
    sampler = gf.Sampler(m, transitions=2, inner_steps=2, compile={"backend": "eager"})
    with torch._dynamo.config.patch(recompile_limit=2):
        for n in range(3, 8):
            x = torch.randn(n, 2, generator=gen(n))
            got, calls = counted(m, sampler.run, x, generator=gen(1))
            assert calls == 4, n
            torch.testing.assert_close(got, gf.sample(m, x, transitions=2, inner_steps=2, generator=gen(1)), **TOL)


class _Affine:
    """A network that is no nn.Module, holding a plain tensor: dynamo must read it from each model."""

    def __init__(self, w):
        self.w = w

    def __call__(self, x, t):
        return x @ self.w + t[:, None]


class _Shifted(torch.nn.Module):
    """A network module called as the model itself, with a buffer beside its parameters."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("shift", torch.randn(2))

    def forward(self, x, t):
        return self.lin(x) + self.shift * t[:, None]


@torch.no_grad()
def test_models_never_run_each_others_weights_or_constants():
    backend = CountingBackend()
    models = [gf.FlowModel(_Affine(torch.tensor([[0.5, 0.1], [0.0, -0.3]])), gf.LinearSchedule()),
              gf.FlowModel(_Affine(torch.tensor([[-0.2, 0.4], [0.3, 0.1]])), gf.LinearSchedule()),
              gf.FlowModel(_Shifted(0), gf.LinearSchedule()), gf.FlowModel(_Shifted(1), gf.LinearSchedule()),
              mlp(seed=0), mlp(seed=1), mlp(seed=0, scale=0.5),
              gf.FlowModel(net_fn(seed=0), gf.LinearSchedule(), "x0")]
    results = []
    for m in models:
        want = gf.sample(m, NOISE, transitions=2, inner_steps=2, generator=gen(1))
        got = gf.sample(m, NOISE, transitions=2, inner_steps=2, generator=gen(1), compile={"backend": backend})
        torch.testing.assert_close(got, want, **TOL)
        results.append(got)
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            assert not torch.allclose(results[i], results[j]), (i, j)


@pytest.mark.parametrize("method", ["glass", "sde", "plugin"])
@torch.no_grad()
def test_compiled_runs_consume_the_generator_as_eager_runs(method):
    m = mlp()
    kw = dict(method=method, transitions=3, inner_steps=2)
    comp = gf.Sampler(m, compile={"backend": "eager"}, **kw)
    g_eager, g_comp = gen(7), gen(7)
    want = gf.sample(m, NOISE, generator=g_eager, **kw)
    got = comp.run(NOISE, generator=g_comp)
    assert torch.equal(got, want)
    assert torch.equal(g_comp.get_state(), g_eager.get_state())
    assert torch.equal(comp.run(NOISE, generator=gen(7)), got)      # reproduces itself from the seed
    assert not torch.equal(comp.run(NOISE, generator=gen(8)), got)  # and the noise comes from the generator


@torch.no_grad()
def test_inductor_compiled_models_sharing_code_equal_eager():
    # The default backend: two networks of one architecture share the code; neither runs the other's weights.
    kw = dict(transitions=2, inner_steps=2)
    for seed in (0, 1):
        m = mlp(seed=seed)
        want = gf.sample(m, NOISE, generator=gen(1), **kw)
        got, calls = counted(m, gf.sample, m, NOISE, generator=gen(1), compile=True, **kw)
        torch.testing.assert_close(got, want, **TOL)
        assert calls == 4


def test_code_objects_are_kept_per_signature():
    m = mlp()
    backend = CountingBackend()
    sampler = gf.Sampler(m, transitions=2, inner_steps=2, compile={"backend": backend})
    with torch.no_grad():
        sampler.run(NOISE)
        sampler.run(NOISE[:5])
    mine = [codes for key, codes in _CODE_BY_SIGNATURE.items() if repr(backend) in key[-1]]
    assert len(mine) == 2   # one signature per batch shape


def test_a_compiled_step_under_autograd_equals_the_eager_one():
    # Sampler.step outside torch.no_grad with a network whose parameters require grad (nn.Module's default).
    # Eagerly the compiled ops run forward (only their backward raises); compiled, autograd used to be traced
    # through them and compilation failed (BackendCompilerFailed: no derivative for glass_fast::fused_step).
    m = mlp()
    kw = dict(method="glass", solver="midpoint", transitions=2, inner_steps=4)
    eager, comp = gf.Sampler(m, **kw), gf.Sampler(m, compile={"backend": "aot_eager"}, **kw)
    x = NOISE.clone()
    for k in range(2):
        want, want_calls = counted(m, eager.step, k, x, generator=gen(1))
        got, got_calls = counted(m, comp.step, k, x, generator=gen(1))
        torch.testing.assert_close(got, want.detach(), **TOL)
        assert got_calls == want_calls
        x = want.detach()


def test_compiled_reference_ops_keep_their_gradients():
    # The reference ops are differentiable: a compiled transition on them keeps autograd, with eager's gradients.
    m = mlp()
    kw = dict(transitions=2, inner_steps=2)
    weight = m.fn.net[0].weight
    grads = []
    with gf.ops.use_backend("reference"):
        for sampler in (gf.Sampler(m, **kw), gf.Sampler(m, compile={"backend": "aot_eager"}, **kw)):
            out = sampler.step(0, NOISE, generator=gen(1))
            grads.append(torch.autograd.grad(out.square().sum(), weight)[0])
    torch.testing.assert_close(grads[1], grads[0], **TOL)
    assert grads[0].abs().sum() > 0


def _switching_rho(t, t_next):
    """A float on the first transition, one value per state (12) on the later ones."""
    return 0.4 if float(t) == 0.0 else torch.linspace(-0.5, 0.9, 12, dtype=torch.float64)


@torch.no_grad()
def test_shared_and_per_sample_rows_in_one_grid_compiled_equal_eager():
    m = mlp()
    kw = dict(transitions=3, inner_steps=2, rho=_switching_rho)
    eager, comp = gf.Sampler(m, **kw), gf.Sampler(m, compile={"backend": "aot_eager"}, **kw)
    assert [p.coefs.dim() for p in eager.plans] == [2, 3, 3] and len({p.kinds for p in eager.plans}) == 1
    want, want_calls = counted(m, eager.run, NOISE, generator=gen(1))
    got, got_calls = counted(m, comp.run, NOISE, generator=gen(1))
    torch.testing.assert_close(got, want, **TOL)
    assert got_calls == want_calls



@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_network_editing_the_state_in_place_is_refused_compiled_too(backend):
    # Eagerly FlowModel refuses a network that edits the sampler's state in place (checked on its version
    # counter, which traced code does not read): compiled, the edit used to reach the caller's tensor silently.
    def fn(x, t):
        x.mul_(0.5)
        return -x
    m = gf.FlowModel(fn, gf.LinearSchedule())
    for sampler in (gf.Sampler(m, transitions=2, inner_steps=2),
                    gf.Sampler(m, transitions=2, inner_steps=2, compile={"backend": backend})):
        with pytest.raises(RuntimeError, match="the network modified its input x in place"):
            with torch.no_grad():
                sampler.run(NOISE.clone())


# ------------------------------------------------------------------------------------------------- GPU only
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_with_shared_and_per_sample_rows_in_one_grid_equals_eager():
    m = gf.FlowModel(net_fn(), gf.LinearSchedule())
    m.fn.net.to("cuda")
    noise = NOISE.to("cuda")
    kw = dict(transitions=3, inner_steps=2, rho=_switching_rho, device="cuda")
    want = gf.Sampler(m, **kw).run(noise, generator=torch.Generator("cuda").manual_seed(1))
    got = gf.Sampler(m, cuda_graph=True, **kw).run(noise, generator=torch.Generator("cuda").manual_seed(1))
    torch.testing.assert_close(got, want, **TOL)
