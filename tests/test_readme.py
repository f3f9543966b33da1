"""The README's snippets run as written, its API table names what the package exports, and the FLUX example
script runs on tiny weights."""
import ast
import inspect
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import glass_fast as gf

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The README text under ``## title`` up to the next ``## `` heading."""
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str, lang: str) -> list:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_readme_example_runs(capsys):
    code = code_blocks(section("Example (runs on CPU)"), "python")[0]
    scope: dict = {}
    exec(compile(code, "README.md example", "exec"), scope)
    res, x, log_p = scope["res"], scope["x"], scope["log_p"]
    assert res.best.shape == (8, 2) and res.nfe == 50
    # Two equal modes at x = +-2: the plain sample is balanced, the reward pulls FK to the right-hand one.
    assert abs(float(x[:, 0].mean())) < 0.3
    assert float((res.samples[..., 0] > 0).double().mul(res.weights).sum(-1).mean()) > 0.9
    assert log_p.shape == (256,) and torch.isfinite(log_p).all()
    assert capsys.readouterr().out.count("\n") == 2


def test_readme_own_loop_equals_the_sampler_run(capsys):
    """The loop of predict / step after the example: what it prints is x0's reward, at no extra model calls,
    and it ends where Sampler.run ends from the same seed."""
    scope: dict = {}
    exec(compile(code_blocks(section("Example (runs on CPU)"), "python")[0], "README.md example", "exec"), scope)
    capsys.readouterr()
    loop = code_blocks(section("Example (runs on CPU)"), "python")[1]
    calls = scope["model"].calls
    exec(compile(loop, "README.md own loop", "exec"), scope)
    sampler, noise = scope["sampler"], scope["noise"]
    assert scope["model"].calls - calls == sampler.calls
    assert torch.equal(scope["x"], sampler.run(noise, generator=torch.Generator().manual_seed(3)))
    assert capsys.readouterr().out.count("\n") == sampler.transitions


def test_flux_example_runs_on_tiny_weights(tmp_path, capsys):
    """examples/flux_fk_glass.py end to end with --tiny (random FLUX-shaped parts, no weights on disk)."""
    import importlib.util

    import pytest
    pytest.importorskip("diffusers")
    spec = importlib.util.spec_from_file_location("flux_fk_glass", ROOT / "examples" / "flux_fk_glass.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--tiny", "--device", "cpu", "--particles", "3", "--transitions", "2", "--inner-steps", "2",
            "--prompt", "a", "--prompt", "b", "--out", str(tmp_path)]
    assert example.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fk_glass_0.png", "fk_glass_1.png"]
    out = capsys.readouterr().out
    assert "4 model calls per particle" in out and out.count("final particles") == 2


def api_rows():
    """(cell text, description) of every row of the README's API table."""
    rows = [line for line in section("API").splitlines() if line.startswith("| `")]
    assert len(rows) >= 10
    return [tuple(cell.strip() for cell in row.strip("|").split(" | ", 1)) for row in rows]


def test_api_table_names_exist_with_the_stated_defaults():
    checked = 0
    for cell, what in api_rows():
        for call in re.findall(r"`([^`]*)`", cell):
            name, _, args = call.partition("(")
            if name.startswith("glass_fast."):
                pytest.importorskip("diffusers")
                __import__(name)
                continue
            assert hasattr(gf, name), f"README's API table names gf.{name}, which glass_fast does not export"
            if not args:
                continue
            params = inspect.signature(getattr(gf, name)).parameters
            for arg in re.sub(r"\[[^]]*\]", "", args.rstrip(")")).split(", "):  # noise[B, K, ...] -> noise
                if arg in ("...", ""):
                    continue
                key, _, default = arg.partition("=")
                assert key in params, f"README: {name}({key}...), but its parameters are {list(params)}"
                if default:
                    actual = params[key].default
                    if key == "transitions" and actual is None:  # None: len(grid) - 1, or the uniform grid's
                        from glass_fast.sampling import DEFAULT_TRANSITIONS as actual
                    assert actual == ast.literal_eval(default), (name, key, actual)
                checked += 1
    assert checked >= 25


def test_api_table_attributes_exist():
    schedule = gf.LinearSchedule()
    cell, what = api_rows()[0]
    for attr in re.findall(r"\.(\w+)", what):
        assert callable(getattr(schedule, attr)), attr
    model = gf.GaussianMixture(means=[[0.0]], stds=[1.0], weights=[1.0]).flow_model(schedule)
    assert callable(model.denoise) and callable(model.velocity) and hasattr(model, "calls")
    assert callable(gf.Sampler.run) and callable(gf.Sampler.step)
    fields = set(gf.SteeringResult.__dataclass_fields__) | {"weights"}
    assert {"samples", "weights", "rewards", "best", "nfe", "timings"} <= fields
    schemes = re.search(r"grouped resampling \(([^)]*)\)", README).group(1).split(", ")
    log_w = torch.zeros(2, 4)
    for scheme in schemes:
        assert gf.resample(log_w, scheme, generator=torch.Generator().manual_seed(0)).shape == (2, 4)


def test_own_network_line_runs():
    """The "Your own network" sentence: fn(x[B, ...], t[B]) -> [B, ...], bf16 network with an fp32 sampler."""
    line = re.search(r"Your own network: `(gf\.FlowModel\(fn, [^`]*)`", README).group(1)
    net = torch.nn.Linear(3, 3)
    fn = lambda x, t: net(x) * t[:, None].to(x.dtype)  # noqa: E731
    model = eval(line, {"gf": gf, "fn": fn})
    assert model.velocity(torch.randn(4, 3), torch.full((4,), 0.5)).shape == (4, 3)
    net.to(torch.bfloat16)
    model = gf.FlowModel(fn, gf.LinearSchedule(), prediction="velocity", dtype=torch.bfloat16)
    x = gf.sample(model, torch.randn(4, 3), method="glass", transitions=2, inner_steps=2,
                  generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_speed_snippets_run(device):
    """The serving-loop snippet (on the CPU without graph capture, which needs CUDA) and the FKSteering line."""
    code = code_blocks(section("Speed: compiled and captured transitions"), "python")[0]
    if device == "cpu":
        assert 'device="cuda"' in code and "cuda_graph=True" in code
        code = code.replace('device="cuda"', 'device="cpu"').replace("cuda_graph=True", "cuda_graph=False")
    data = gf.GaussianMixture(means=[[2.0, 0.0], [-2.0, 0.0]], stds=[0.5, 0.5], weights=[0.5, 0.5])
    model = data.flow_model(gf.LinearSchedule(), prediction="velocity")
    batches = [torch.randn(16, 2, device=device) for _ in range(2)]
    gen = torch.Generator(device=device).manual_seed(0)
    scope = {"gf": gf, "model": model, "batches": batches, "gen": gen}
    exec(compile(code, "README.md speed snippet", "exec"), scope)
    assert scope["x"].shape == (16, 2) and scope["x"].device.type == device

    steer_line = re.search(r"`(steer = gf\.FKSteering\([^`]*)` then `(result = steer\([^`]*)`", README)
    reward = lambda z: z[..., 0]  # noqa: E731
    scope.update(reward=reward, noise=torch.randn(4, 4, 2, device=device))
    steer_code = "\n".join(steer_line.groups())
    if device == "cpu":
        steer_code = steer_code.replace("cuda_graph=True", "cuda_graph=False")
    exec(steer_code, scope)
    assert scope["result"].best.shape == (4, 2) and scope["result"].nfe == 50


def test_environment_table_names_real_variables():
    names = re.findall(r"^\| `([A-Z_0-9]+)(?:=\w+)?`(?:, `([A-Z_0-9]+)`)?", section("Environment variables"), re.M)
    names = [n for pair in names for n in pair if n]
    assert len(names) >= 7
    sources = (ROOT / "setup.py").read_text() + (ROOT / "glass_fast" / "ops" / "_backend.py").read_text()
    for name in names:
        assert name in sources or name in ("TRITON_INTERPRET", "MAX_JOBS", "TORCH_CUDA_ARCH_LIST"), name
    from glass_fast.ops import _backend

    assert _backend.ENV_VAR == "GLASS_FAST_BACKEND"


def test_commands_in_the_readme_exist():
    """Every `python ...py`, `python -m ...` and `glass-fast ...` command names a file, module or subcommand
    that exists, and the CLI accepts its arguments."""
    from glass_fast.cli import _parse

    text = re.sub(r"\n## FLUX.*?(?=\n## )", "\n", README, flags=re.S)  # that section is tested with diffusers
    scripts = set(re.findall(r"python3? (benchmarks/\w+\.py|examples/\w+\.py)", text))
    assert scripts >= {"benchmarks/bench_accuracy.py", "benchmarks/bench_steering.py", "benchmarks/bench_overhead.py"}
    for script in scripts:
        assert (ROOT / script).is_file(), script
    modules = set(re.findall(r"python -m\s+(glass_fast[\w.]*)", text))
    assert "glass_fast.zoo.train" in modules
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file() or (ROOT / module.replace(".", "/")).is_dir()
    commands = re.findall(r"`glass-fast ([^`]*)`", text)
    assert any(c.startswith("bench") for c in commands) and "demo" in commands
    for command in commands:
        if command == "--help":
            continue
        args = _parse(command.split())
        assert args.command in ("demo", "sample", "steer", "bench")


def test_cli_help_runs_as_the_readme_says():
    res = subprocess.run([sys.executable, "-m", "glass_fast", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout and "bench" in res.stdout


def test_digits_model_facts():
    """The README's description of the shipped digits models: parameter count and held-out accuracy."""
    from glass_fast import zoo

    net = zoo.load_digits_velocity_net()
    n = sum(p.numel() for p in net.parameters())
    stated = float(re.search(r"linear schedule, ([0-9.]+)M parameters", README).group(1))
    assert round(n / 1e6, 2) == stated
    x, y = zoo.real_digits("test")
    accuracy = (zoo.digit_log_probs(x).argmax(-1) == y).double().mean().item()
    stated = float(re.search(r"a digit classifier \(([0-9.]+)% held-out accuracy\)", README).group(1)) / 100
    assert abs(accuracy - stated) <= 0.5 / 100 + 1 / len(y)  # the README rounds; one image either way


@pytest.mark.parametrize("argv, needle", [
    (["--model", "/no/such/folder"], "--model '/no/such/folder' is not a folder"),
    (["--tiny", "--clip", "/no/such/clip"], "--clip '/no/such/clip' is not a folder"),
    (["--tiny", "--particles", "0"], "argument --particles: must be an integer >= 1, got '0'"),
    (["--tiny", "--device", "nonsense"], "--device"),
])
def test_flux_example_rejects_bad_arguments_in_one_line(capsys, argv, needle):
    import importlib.util

    spec = importlib.util.spec_from_file_location("flux_fk_glass", ROOT / "examples" / "flux_fk_glass.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit) as exc:
        example.main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]


def test_sample_spends_the_model_calls_the_api_table_states():
    row = next(what for cell, what in api_rows() if cell.startswith("`sample("))
    assert "transitions x inner_steps model calls (plug-in: one per transition)" in row
    data = gf.GaussianMixture(means=[[2.0, 0.0]], stds=[0.5], weights=[1.0])
    for method in ("glass", "ode", "sde", "plugin"):
        model = data.flow_model(gf.LinearSchedule(), prediction="velocity")
        gf.sample(model, torch.randn(4, 2), method=method, transitions=5, inner_steps=4,
                  generator=torch.Generator().manual_seed(0))
        assert model.calls == (5 if method == "plugin" else 20), method


def test_digits_inpainting_example_runs(tmp_path, capsys):
    """examples/digits_inpaint.py end to end on a small set (it raises if a kept half is not the original's)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("digits_inpaint", ROOT / "examples" / "digits_inpaint.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--per-digit", "1", "--particles", "2", "--transitions", "2", "--inner-steps", "2", "--out", str(tmp_path)]
    assert example.main(argv) == 0
    assert (tmp_path / "digits_inpaint.png").exists()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "completion" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["held-out originals", "ODE", "GLASS",
                                                       "FK steering over GLASS"]
    assert all(0.0 <= float(r.split("|")[2]) <= 1.0 for r in rows)
