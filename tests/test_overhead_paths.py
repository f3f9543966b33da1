"""The sampler's own work between model calls: planned once, inputs checked once, one host read per run."""
import pytest
import torch

import glass_fast as gf
from glass_fast import ops, plan as plan_mod, sampling
from glass_fast.transitions import DevicePlan, FiniteGuard, all_finite, draw_noise, execute


def _model(fn=lambda x, t: -x, **kw):
    return gf.FlowModel(fn, gf.LinearSchedule(), "velocity", **kw)


def _counting(monkeypatch, module, name):
    """Count the calls of ``module.name`` (patched in place); returns the one-element counter."""
    count, inner = [0], getattr(module, name)

    def wrapped(*args, **kwargs):
        count[0] += 1
        return inner(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)
    return count


def test_runs_reuse_the_plans_built_at_construction(monkeypatch):
    built = _counting(monkeypatch, sampling, "glass_plan")
    s = gf.Sampler(_model(), transitions=4, inner_steps=3)
    assert built[0] == 4
    x = torch.randn(8, 2)
    s.run(x, generator=torch.Generator().manual_seed(0))
    s.run(x, generator=torch.Generator().manual_seed(1), callback=lambda *a: None)
    assert built[0] == 4


@pytest.mark.parametrize("option", [dict(compile=True), dict(cuda_graph=True)], ids=["compile", "cuda_graph"])
def test_guidance_with_compile_or_graphs_is_refused_before_any_model_call(monkeypatch, option):
    g = lambda model, y, t, t_host, out: out   # noqa: E731
    m, x = _model(), torch.randn(4, 2)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    s = gf.Sampler(m, transitions=2, inner_steps=2, **option)
    with pytest.raises(ValueError, match="guidance is not supported with compile= or cuda_graph=: run it eagerly"):
        s.run(x, generator=gen, guidance=g, callback=lambda *a: None)   # the callback would call the model first
    with pytest.raises(ValueError, match="guidance is not supported with compile= or cuda_graph=: run it eagerly"):
        s.step(0, x, generator=gen, guidance=g)
    built = _counting(monkeypatch, sampling, "glass_plan")
    with pytest.raises(ValueError, match="guidance is not supported with compile= or cuda_graph=: run it eagerly"):
        gf.sample(m, x, generator=gen, guidance=g, **option)
    assert m.calls == 0 and built[0] == 0 and torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("option", [dict(compile=True), dict(cuda_graph=True)], ids=["compile", "cuda_graph"])
def test_steering_refuses_guidance_with_compile_or_graphs_when_built(option):
    g = lambda model, y, t, t_host, out: out   # noqa: E731
    m, reward = _model(), lambda z: z[:, 0]
    for build in (gf.FKSteering, gf.BestOfN):
        with pytest.raises(ValueError, match="guidance is not supported with compile= or cuda_graph=: run it eagerly"):
            build(m, reward, guidance=g, **option)
    assert m.calls == 0


def test_finite_guard_reads_flags_and_records_in_one_transfer(monkeypatch):
    reads = _counting(monkeypatch, torch.Tensor, "tolist")
    g = FiniteGuard(torch.device("cpu"))
    g.check_input(torch.ones(3), "noise")
    g.extend(torch.tensor([True, True]), ["s0", "s1"])
    assert g.read(torch.tensor(3), torch.tensor([-1, 2]), torch.tensor([True, False])) == [[3], [-1, 2], [1, 0]]
    assert reads[0] == 1
    g.extend(torch.tensor([True, False]), ["s2", "s3"])
    g.check(torch.tensor([float("nan")]), "s4")
    with pytest.raises(FloatingPointError, match="^the model returned NaN or Inf at s3$"):
        g.read(torch.tensor([5, 6]))
    with pytest.raises(FloatingPointError, match="at s3$"):
        g.raise_if_bad()
    assert FiniteGuard(torch.device("cpu")).read(torch.tensor([4])) == [[4]]
    assert FiniteGuard(torch.device("cpu")).read() == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method,solver", [("glass", "midpoint"), ("ode", "heun"), ("sde", "euler")])
def test_stage_flags_mark_exactly_the_non_finite_outputs(bad, method, solver):
    """execute's per-stage flags equal all_finite of each stage's model output, also with D_t(x) handed in
    in another dtype than the network's outputs (bfloat16 network, float32 state)."""
    outs = []

    def net(x, t):
        out = -x
        if len(outs) == 2:   # the third model call of the transition
            out = out.clone()
            out[1, 0] = bad
        outs.append(out)
        return out
    m = _model(net, dtype=torch.bfloat16)
    calls = 4
    t, tn = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    p = (plan_mod.glass_plan(m, t, tn, torch.tensor(0.4, dtype=torch.float64), calls, solver) if method == "glass"
         else plan_mod.ode_plan(m, t, tn, calls, solver) if method == "ode" else plan_mod.sde_plan(m, t, tn, calls))
    x = torch.randn(3, 2)
    d = torch.randn(3, 2)
    dp = DevicePlan(p, x.device, x.dtype)
    _, finite = execute(m, dp, x, draw_noise(dp, x, torch.Generator().manual_seed(0)), denoised=d)
    expected = [bool(all_finite(o)) for o in [d] + outs]
    assert finite.tolist() == expected and expected.count(False) == 1 and not expected[3]


def test_unchecked_step_equals_the_checked_op():
    gen = torch.Generator().manual_seed(0)
    base, out, xt, stage = (torch.randn(5, 3, generator=gen) for _ in range(4))
    for coef in (torch.randn(6, generator=gen), torch.randn(5, 6, generator=gen, dtype=torch.float64)):
        for backend in ops.available_backends("cpu"):
            with ops.use_backend(backend):
                want = ops.fused_step(base, out, coef, x_t=xt, stage=stage)
            got = ops.fused_step_on(backend, base, out, coef, x_t=xt, stage=stage)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), backend


def test_row_of_scalars_equals_the_broadcast_row():
    """_row's scalar shortcut gives the values the general (broadcasting) form gives."""
    a, b = torch.tensor(0.1, dtype=torch.float64) / 3, torch.tensor(2.0, dtype=torch.float64).sqrt()
    fast = plan_mod._row(a, 0.0, b, a * b, n_new=1.0)
    general = plan_mod._row(a.reshape(1), 0.0, b.reshape(1), (a * b).reshape(1), n_new=1.0)
    assert fast.shape == (6,) and fast.dtype == torch.float64 and torch.equal(fast, general[0])


def test_state_on_another_device_than_the_rows_is_refused():
    s = gf.Sampler(_model(), transitions=2, inner_steps=2)
    with pytest.raises(ValueError, match="planned for torch.float32 on cpu: build it with device=x.device"):
        s.run(torch.randn(4, 2, device="meta"))


def test_inpaint_broadcast_rule_matches_torch():
    import itertools
    from glass_fast.inpaint import _broadcasts

    def torch_rule(shape, to):
        try:
            return tuple(torch.broadcast_shapes(shape, to)) == tuple(to)
        except RuntimeError:
            return False
    shapes = [s for n in range(4) for s in itertools.product((0, 1, 2, 3), repeat=n)]
    assert all(_broadcasts(a, b) == torch_rule(a, b) for a in shapes for b in shapes)


def test_first_runs_in_a_process_do_not_import_sympy():
    """torch.broadcast_shapes's first call imports sympy (about 0.4 s, more than a whole small run): planning,
    sampling, steering and inpainting avoid it."""
    import subprocess
    import sys
    code = """
import sys, torch, glass_fast as gf
if "sympy" in sys.modules:
    print("PRELOADED"); raise SystemExit
m = gf.FlowModel(lambda x, t: -x, gf.LinearSchedule())
noise = torch.randn(8, 2)
hook = gf.Inpaint(m.schedule, torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), noise)
for method in ("glass", "ode", "sde", "plugin"):
    gf.sample(m, noise, method=method, transitions=2, inner_steps=2 if method != "plugin" else 1, project=hook)
gf.glass_transition(m, noise, torch.full((8,), 0.2), 0.5)
gf.fk_steering(m, lambda z: z[:, 0], noise.reshape(2, 4, 2), transitions=2, inner_steps=2)
print("sympy" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "PRELOADED":
        pytest.skip("importing torch and glass_fast already imports sympy here: nothing to avoid")
    assert out.stdout.strip() == "False"
