"""Compiled and captured transitions give the eager samples; max_batch gives the unsplit results."""
import json
import subprocess
import sys

import pytest
import torch

import glass_fast as gf

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    # Each test builds a new network; dynamo would count those as recompilations of one code object.
    torch.compiler.reset()
    yield


def mlp_model(max_batch=None, device="cpu", dtype=None):
    """A small float32 network; ``dtype``: the FlowModel's (float32 to run it beside a half-precision state)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2)).to(device)

    def fn(x, t):
        return net(torch.cat([x, t[:, None].to(x.dtype)], 1))
    return gf.FlowModel(fn, gf.LinearSchedule(), max_batch=max_batch, dtype=dtype)


@pytest.mark.parametrize("method,solver", [("glass", "euler"), ("glass", "midpoint"), ("sde", "euler"), ("ode", "heun")])
@torch.no_grad()
def test_compiled_equals_eager(method, solver):
    m = mlp_model()
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    kw = dict(method=method, solver=solver, transitions=3, inner_steps=4)
    eager = gf.sample(m, noise, generator=torch.Generator().manual_seed(1), **kw)
    sampler = gf.Sampler(m, compile={"backend": "aot_eager", "fullgraph": True}, **kw)
    calls = m.calls
    compiled = sampler.run(noise, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    assert m.calls - calls == 12  # call accounting survives compilation
    # Reused for the next batch of the same shape, as in a serving loop.
    again = sampler.run(noise, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, compiled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_compiled_run_with_a_callback_equals_the_eager_one(dtype):
    # The callback's prediction is the transition's first call, made eagerly and handed to the compiled
    # transition as the raw output (the captured variant whose first stage takes it).
    m = mlp_model(dtype=torch.float32)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    kw = dict(transitions=3, inner_steps=4)
    seen, kept = [], []
    eager = gf.sample(m, noise, generator=torch.Generator().manual_seed(1),
                      callback=lambda k, t, x, x0: seen.append(x0.clone()), **kw)
    sampler = gf.Sampler(m, compile={"backend": "eager", "fullgraph": True}, dtype=dtype, **kw)
    calls = m.calls
    compiled = sampler.run(noise, generator=torch.Generator().manual_seed(1),
                           callback=lambda k, t, x, x0: kept.append(x0.clone()))
    assert m.calls - calls == 12 and len(kept) == 3
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(kept, seen):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # A plain run of the same sampler takes the other variant (the first call inside the transition).
    plain = sampler.run(noise, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain, eager, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_compiled_sampler_compiles_once_per_stage_kinds_and_shape():
    from torch._dynamo.utils import counters
    m = mlp_model()
    sampler = gf.Sampler(m, compile={"backend": "eager", "fullgraph": True}, transitions=8, inner_steps=2)
    before = counters["stats"]["unique_graphs"]
    for _ in range(3):
        sampler.run(torch.randn(16, 2))
    # Every transition of this grid has the same stage kinds: one graph for 24 transitions. (The model's
    # call counter used to be traced, a guard on its value that recompiled every transition.)
    assert counters["stats"]["unique_graphs"] - before == 1
    assert m.calls == 3 * 8 * 2
    sampler.run(torch.randn(8, 2))          # a new batch shape: one more graph
    assert counters["stats"]["unique_graphs"] - before == 2


@torch.no_grad()
def test_compiled_code_is_shared_across_samplers_and_kept_apart_per_shape():
    from torch._dynamo.utils import counters
    m = mlp_model()
    before = counters["stats"]["unique_graphs"]
    for _ in range(3):   # function-style calls build a new Sampler each time: compiled once
        gf.sample(m, torch.randn(16, 2), compile={"backend": "eager"}, transitions=3, inner_steps=2)
    assert counters["stats"]["unique_graphs"] - before == 1
    # More batch shapes than dynamo's recompile limit (8 per code object): each still gets compiled code
    # rather than silently running eagerly.
    sampler = gf.Sampler(m, compile={"backend": "eager"}, transitions=3, inner_steps=2)
    for i, n in enumerate(range(3, 15)):
        sampler.run(torch.randn(n, 2))
        assert counters["stats"]["unique_graphs"] - before == 2 + i, n   # the 16-row graph, then one per shape


@torch.no_grad()
def test_models_sharing_compiled_code_each_give_their_own_samples():
    # Compiled code is keyed by stage kinds and shapes, not by model: two networks, a bfloat16 run and a
    # split one share it, and each must still give its own eager result (guards, not a stale graph).
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
    models = [mlp_model(), gf.FlowModel(lambda x, t: other(torch.cat([x, t[:, None].to(x.dtype)], 1)),
                                        gf.LinearSchedule()),
              mlp_model(max_batch=5), gf.FlowModel(lambda x, t: -x, gf.LinearSchedule())]
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    results = []
    for m in models:
        eager = gf.sample(m, noise, transitions=2, inner_steps=2, generator=torch.Generator().manual_seed(1))
        comp = gf.sample(m, noise, transitions=2, inner_steps=2, generator=torch.Generator().manual_seed(1),
                         compile={"backend": "eager"})
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
        results.append(comp)
    assert not torch.allclose(results[0], results[1]) and not torch.allclose(results[0], results[3])


@pytest.mark.slow
@torch.no_grad()
def test_inductor_compiled_transition_equals_eager():
    m = mlp_model()
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    eager = gf.sample(m, noise, transitions=2, inner_steps=4, generator=torch.Generator().manual_seed(1))
    for compile in ({"fullgraph": True}, True):
        compiled = gf.sample(m, noise, transitions=2, inner_steps=4, generator=torch.Generator().manual_seed(1),
                             compile=compile)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compile_argument_forms():
    m = mlp_model()
    assert gf.Sampler(m, compile=True).compile_kwargs == {}
    assert gf.Sampler(m, compile="max-autotune-no-cudagraphs").compile_kwargs == {"mode": "max-autotune-no-cudagraphs"}
    assert gf.Sampler(m, compile={"backend": "eager"}).compile_kwargs == {"backend": "eager"}
    for off in (None, False):
        sampler = gf.Sampler(m, compile=off)
        assert not sampler.compiled and sampler.compile_kwargs == {}


def test_capture_arguments_are_checked():
    m = mlp_model()
    with pytest.raises(ValueError, match="compile must be"):
        gf.Sampler(m, compile=3)
    with pytest.raises(ValueError, match="choose one of compile= and cuda_graph="):
        gf.Sampler(m, compile=True, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors"):
        gf.sample(m, torch.randn(4, 2), cuda_graph=True)
    with pytest.raises(ValueError, match="max_batch must be None or an integer >= 1"):
        gf.sample(m, torch.randn(4, 2), max_batch=0)


@pytest.mark.parametrize("method", ["glass", "sde", "ode"])
@torch.no_grad()
def test_max_batch_equals_unsplit(method):
    noise = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    full = gf.sample(mlp_model(), noise, method=method, transitions=2, inner_steps=3,
                     generator=torch.Generator().manual_seed(1))
    split = gf.sample(mlp_model(), noise, method=method, transitions=2, inner_steps=3, max_batch=7,
                      generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(split, full, rtol=1e-6, atol=1e-6)


_PEAK = r"""
import json, os, sys, torch, glass_fast as gf
torch.set_num_threads(1)
max_batch = None if sys.argv[1] == "none" else int(sys.argv[1])
page = os.sysconf("SC_PAGE_SIZE")
def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page // 1024
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(16, 16384), torch.nn.SiLU(), torch.nn.Linear(16384, 16))
peak = []
# Resident memory while the hidden activations are alive, taken at the activation's output.
net[1].register_forward_hook(lambda mod, inp, out: peak.append(rss_kib()))
m = gf.FlowModel(lambda x, t: net(x), gf.LinearSchedule(), max_batch=max_batch)
x = torch.randn(4096, 16)
before = rss_kib()
with torch.no_grad():
    gf.sample(m, x, transitions=1, inner_steps=2)
print(json.dumps(max(peak) - before))
"""


def _peak_kib(max_batch):
    """Resident memory the model's activations add during sampling, in KiB (Linux /proc)."""
    out = subprocess.run([sys.executable, "-c", _PEAK, str(max_batch)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_peak_memory_falls_with_max_batch():
    # One call on 4096 rows holds two [4096, 16384] fp32 activations (256 MiB each) at the SiLU's
    # output; chunks of 512 rows hold 32 MiB ones. Require the growth to fall by at least one full activation.
    unsplit, split = _peak_kib("none"), _peak_kib(512)
    assert unsplit > 384 * 1024, unsplit  # the measurement sees more than one full activation
    assert split < unsplit - 256 * 1024, (unsplit, split)


# ------------------------------------------------------------------------------------------------- GPU only
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["glass", "sde"])
@torch.no_grad()
def test_cuda_graph_equals_eager_and_never_syncs(method):
    model = mlp_model(device="cuda")
    noise = torch.randn(256, 2, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(method=method, transitions=4, inner_steps=6)
    eager = gf.sample(model, noise, generator=torch.Generator("cuda").manual_seed(1), **kw)
    sampler = gf.Sampler(model, cuda_graph=True, device="cuda", **kw)
    sampler.run(noise, generator=torch.Generator("cuda").manual_seed(1))  # capture
    gen = torch.Generator("cuda").manual_seed(1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = noise
        for k in range(sampler.transitions):
            x = sampler.step(k, x, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(x, eager, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_with_an_inpainting_project_hook_equals_eager_and_never_syncs():
    model = mlp_model(device="cuda")
    noise = torch.randn(256, 2, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    hook = gf.Inpaint(model.schedule, torch.tensor([[1.5, 0.0]]), torch.tensor([[0.0, 1.0]]), noise)
    kw = dict(transitions=4, inner_steps=6)
    eager = gf.sample(model, noise, generator=torch.Generator("cuda").manual_seed(1), project=hook, **kw)
    sampler = gf.Sampler(model, cuda_graph=True, device="cuda", **kw)
    sampler.run(noise, generator=torch.Generator("cuda").manual_seed(1), project=hook)  # capture
    gen = torch.Generator("cuda").manual_seed(1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = noise
        for k in range(sampler.transitions):
            x = sampler.step(k, x, generator=gen, project=hook)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.all(x[:, 0] == 1.5)
    torch.testing.assert_close(x, eager, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_run_with_a_callback_equals_eager():
    model = mlp_model(device="cuda", dtype=torch.float32)
    noise = torch.randn(256, 2, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(torch.bfloat16)
    kw = dict(transitions=4, inner_steps=6)
    watch = lambda k, t, x, x0: None   # noqa: E731
    eager = gf.sample(model, noise, generator=torch.Generator("cuda").manual_seed(1), callback=watch, **kw)
    sampler = gf.Sampler(model, cuda_graph=True, device="cuda", dtype=torch.bfloat16, **kw)
    calls = model.calls
    graphed = sampler.run(noise, generator=torch.Generator("cuda").manual_seed(1), callback=watch)
    assert model.calls - calls == 24
    torch.testing.assert_close(graphed.float(), eager.float(), rtol=1e-2, atol=1e-2)


@gpu
@pytest.mark.gpu
@torch.no_grad()
def test_reduce_overhead_compile_equals_eager_on_gpu():
    model = mlp_model(device="cuda")
    noise = torch.randn(256, 2, device="cuda")
    eager = gf.sample(model, noise, transitions=3, inner_steps=4, generator=torch.Generator("cuda").manual_seed(1))
    comp = gf.sample(model, noise, transitions=3, inner_steps=4, generator=torch.Generator("cuda").manual_seed(1),
                     compile="reduce-overhead")
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.gpu
@torch.no_grad()
def test_reused_fk_steering_captures_once_and_equals_eager():
    model = mlp_model(device="cuda")
    reward = lambda x: -(x - 1.0).square().sum(-1)  # noqa: E731
    kw = dict(method="glass", transitions=4, inner_steps=4)
    steer = gf.FKSteering(model, reward, cuda_graph=True, **kw)
    for seed in (0, 1):
        noise = torch.randn(8, 16, 2, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        want = gf.fk_steering(model, reward, noise, generator=torch.Generator("cuda").manual_seed(seed), **kw)
        got = steer(noise, generator=torch.Generator("cuda").manual_seed(seed))
        torch.testing.assert_close(got.samples, want.samples, rtol=1e-5, atol=1e-5)
        assert got.nfe == want.nfe == 16
        (_, sampler), = [(m, s) for m, s, *_ in steer._parts.values()]
        if seed == 0:
            graphs = dict(sampler._runners)
        assert sampler._runners == graphs      # the second batch replays the first batch's graphs
