"""Planning cost: every stage of a transition is planned from one evaluation of the schedule over all its
times, and those rows equal (to the last bit or so) the rows of an evaluation one time at a time."""
import pytest
import torch

import glass_fast as gf
from glass_fast import plan as plan_mod

F64 = dict(dtype=torch.float64)
SCHEDULES = [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule()]


def _same(got: torch.Tensor, want: torch.Tensor, what) -> None:
    """Equal to a few units in the last place. On the machines measured they are equal bit for bit; torch's
    vectorised and one-element float64 kernels (exp, cos, atan, ...) may differ in the last bit elsewhere,
    which no sampler can notice."""
    torch.testing.assert_close(got, want, rtol=4 * torch.finfo(torch.float64).eps, atol=0, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


class _Counting(gf.LinearSchedule):
    """A linear path counting its evaluations by method."""

    def __init__(self):
        self.counts = {}

    def _count(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1

    def alpha(self, t):
        self._count("alpha")
        return super().alpha(t)

    def sigma(self, t):
        self._count("sigma")
        return super().sigma(t)

    def d_alpha(self, t):
        self._count("d_alpha")
        return super().d_alpha(t)

    def d_sigma(self, t):
        self._count("d_sigma")
        return super().d_sigma(t)

    def time_at_snr(self, snr):
        self._count("time_at_snr")
        return super().time_at_snr(snr)


def _evaluations(build, calls):
    sch = _Counting()
    model = gf.FlowModel(lambda x, t: -x, sch, "velocity")
    t, tn = torch.tensor(0.2, **F64), torch.tensor(0.6, **F64)
    p = build(model, t, tn, calls)
    assert p.calls == calls
    return sch.counts


@pytest.mark.parametrize("name,build", [
    ("glass euler", lambda m, t, tn, c: plan_mod.glass_plan(m, t, tn, torch.tensor(0.4, **F64), c, "euler")),
    ("glass midpoint", lambda m, t, tn, c: plan_mod.glass_plan(m, t, tn, torch.tensor(0.4, **F64), c, "midpoint")),
    ("glass heun", lambda m, t, tn, c: plan_mod.glass_plan(m, t, tn, torch.tensor(0.4, **F64), c, "heun")),
    ("ode heun", lambda m, t, tn, c: plan_mod.ode_plan(m, t, tn, c, "heun")),
    ("sde", lambda m, t, tn, c: plan_mod.sde_plan(m, t, tn, c))])
def test_schedule_evaluations_do_not_grow_with_the_stages(name, build):
    """The schedule is evaluated over all stages at once: as often for 20 stages as for 2, and the SNR is
    inverted at most once per plan."""
    few, many = _evaluations(build, 2), _evaluations(build, 20)
    assert few == many, (name, few, many)
    assert few.get("time_at_snr", 0) == (1 if name.startswith("glass") else 0)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun"])
def test_a_glass_plan_evaluates_its_inner_flow_once(monkeypatch, solver):
    """One table of the inner flow per transition, over every stage's time and its next input's time."""
    seen, table = [], plan_mod._Inner.table

    def spy(self, svals):
        seen.append(list(svals))
        return table(self, svals)
    monkeypatch.setattr(plan_mod._Inner, "table", spy)
    model = gf.FlowModel(lambda x, t: -x, gf.LinearSchedule(), "velocity")
    t, tn = torch.tensor(0.2, **F64), torch.tensor(0.6, **F64)
    p = plan_mod.glass_plan(model, t, tn, torch.tensor(0.4, **F64), 8, solver)
    assert p.calls == 8 and len(seen) == 1 and len(seen[0]) == 2 * 8


@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
@pytest.mark.parametrize("prediction", ["velocity", "x0", "epsilon", "score"])
def test_inner_table_at_many_times_equals_one_time_at_a_time(sch, prediction):
    """What planning all inner times at once rests on: each element of the tensor evaluation equals the
    evaluation at its time alone (the schedules' transcendental functions included)."""
    model = gf.FlowModel(lambda x, t: -x, sch, prediction)
    t, tn = torch.tensor(0.3, **F64), torch.tensor(0.55, **F64)
    inner = plan_mod._Inner(model, t, tn, torch.tensor(0.4, **F64), 0.8)
    svals = [j / 17 for j in range(18)] + [0.5 + j / 34 for j in range(17)]
    table = inner.table(svals)
    assert table[0].shape == (len(svals),)
    for i, s in enumerate(svals):
        alone = inner.table([s])
        for name, many, one in zip(("tm", "c_x", "c_b", "w1", "w2", "w3", "a_x", "a_o"), table, alone):
            _same(many[i], one[0], (name, s))


def _glass(model, t, tn, solver, calls):
    return plan_mod.glass_plan(model, t, tn, plan_mod.resolve_rho("ddpm", model.schedule, t, tn), calls, solver, 0.7)


@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
@pytest.mark.parametrize("kind,solver", [("glass", "euler"), ("glass", "midpoint"), ("glass", "heun"),
                                         ("ode", "euler"), ("ode", "midpoint"), ("ode", "heun"), ("sde", None)])
def test_per_sample_rows_equal_each_sample_planned_alone(sch, kind, solver):
    """Rows for per-sample times (Tensor[B]) equal the rows planned for each sample's times on
    their own, including a sample starting at the noise (a batch with one sample ending at the data plans
    the last input of every sample as that one: not compared here)."""
    model = gf.FlowModel(lambda x, t: -x, sch, "epsilon")
    t, tn = torch.tensor([0.0, 0.25, 0.6], **F64), torch.tensor([0.3, 0.5, 0.9], **F64)
    build = {"glass": lambda a, b: _glass(model, a, b, solver, 4),
             "ode": lambda a, b: plan_mod.ode_plan(model, a, b, 4, solver),
             "sde": lambda a, b: plan_mod.sde_plan(model, a, b, 3)}[kind]
    batch = build(t, tn)
    for i in range(3):
        alone = build(t[i], tn[i])
        assert batch.kinds == alone.kinds
        for field in ("times", "coefs", "first_denoised", "init"):
            got, want = getattr(batch, field), getattr(alone, field)
            if want is None:
                assert got is None
                continue
            got = got[i] if field in ("first_denoised", "init") else got[:, i]
            _same(got, want, (field, i))
