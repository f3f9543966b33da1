"""README statements beyond tests/test_readme.py: the example's units, the t = 1-noise wrapper, the FLUX
snippets against the integration's signatures, the digits and inpainting facts, the backend tables, and the
flags of the commands it shows. Every check reads its text from README.md, so an edit that breaks it fails."""
import ast
import importlib.util
import inspect
import math
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


def python_blocks(text: str) -> list:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mixture_log_density(x: torch.Tensor, means, stds, weights) -> torch.Tensor:
    """log p(x) of an isotropic Gaussian mixture in nats, written out here independently of the package."""
    means, stds, weights = (torch.as_tensor(v, dtype=torch.float64) for v in (means, stds, weights))
    d = x.shape[-1]
    sq = ((x.double()[:, None, :] - means[None]) ** 2).sum(-1) / stds**2
    log_n = -0.5 * sq - d * torch.log(stds) - 0.5 * d * math.log(2 * math.pi)
    return torch.logsumexp(log_n + torch.log(weights), dim=-1)


def test_example_log_likelihood_is_in_nats_per_point():
    """The Example's ``log_p`` ("nats per point") averages to the mixture's exact E[log p] within 4 standard
    errors of its 256 points: per-dimension values or bits would miss it by more than 1."""
    code = python_blocks(section("Example (runs on CPU)"))[0]
    means, stds, weights = (ast.literal_eval(v) for v in
                            re.search(r"GaussianMixture\(means=(\[.*?\]\]), stds=(\[.*?\]), weights=(\[.*?\])\)",
                                      code).groups())
    torch.manual_seed(0)  # the snippet's data.sample(256) draws from the global generator
    scope: dict = {}
    exec(compile(code, "README.md example", "exec"), scope)
    log_p = scope["log_p"]
    reference = mixture_log_density(scope["data"].sample(200_000, generator=torch.Generator().manual_seed(1)),
                                    means, stds, weights)
    tolerance = 4 * float(reference.std()) / math.sqrt(log_p.numel())
    assert abs(float(log_p.mean()) - float(reference.mean())) < tolerance, (float(log_p.mean()),
                                                                            float(reference.mean()), tolerance)


def test_t1_noise_network_wrapper_has_the_stated_signs():
    """A velocity network trained with t = 1 as noise, wrapped as the API section says, gives the package's
    velocity; x0 and epsilon outputs wrapped with the time flipped alone give its denoiser."""
    wrapper = re.search(r"`(FlowModel\(lambda x, t: [^`]*\))`", section("API")).group(1)
    assert '"velocity"' in wrapper and "(x0 and epsilon outputs keep their sign)" in section("API")
    data = gf.GaussianMixture(means=[[2.0, 0.0], [-1.0, 1.0]], stds=[0.5, 0.7], weights=[0.3, 0.7])
    schedule = gf.LinearSchedule()

    def x0_at(x, s):          # s: time with s = 1 noise; the package's time is 1 - s
        return data.denoise(x, 1 - s, schedule).to(x.dtype)

    def velocity_t1_noise(x, s):   # x_s = (1 - s) x0 + s eps, so dx_s/ds = eps - x0
        x0, s = x0_at(x, s), s.to(x.dtype)
        eps = (x - (1 - s)[:, None] * x0) / s[:, None]
        return eps - x0

    x, t = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)), torch.linspace(0.1, 0.9, 6)
    model = eval(wrapper, {"FlowModel": gf.FlowModel, "net": velocity_t1_noise, "schedule": schedule})
    exact = data.flow_model(schedule, prediction="velocity")
    torch.testing.assert_close(model.velocity(x, t), exact.velocity(x, t), rtol=1e-5, atol=1e-5)

    def eps_t1_noise(x, s):
        x0, s = x0_at(x, s), s.to(x.dtype)
        return (x - (1 - s)[:, None] * x0) / s[:, None]
    for prediction, net in (("x0", x0_at), ("epsilon", eps_t1_noise)):
        flipped = gf.FlowModel(lambda x, t: net(x, 1 - t), schedule, prediction)
        torch.testing.assert_close(flipped.denoise(x, t), exact.denoise(x, t), rtol=1e-5, atol=1e-5)


def _flux_calls(text: str):
    """(function name, ast.Call) of every sample / steer / ImageGuidance call in ``text``'s
    python blocks and inline code spans."""
    snippets = python_blocks(text) + re.findall(r"`((?:sample|steer|ImageGuidance)\([^`]*\))`", text)
    for snippet in snippets:
        for node in ast.walk(ast.parse(snippet)):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("sample", "steer", "ImageGuidance"):
                    yield name, node


def test_flux_snippets_bind_to_the_integration_signatures():
    """Every sample / steer / ImageGuidance call the FLUX section shows binds to the function's parameters;
    steer's extra keywords are options of the steering function its ``algorithm`` selects."""
    pytest.importorskip("diffusers")
    from glass_fast.integrations import diffusers as integration

    functions = {"sample": integration.sample, "steer": integration.steer, "ImageGuidance": integration.ImageGuidance}
    text = section("FLUX and SD3 (diffusers)")
    seen = set()
    for name, call in _flux_calls(text):
        signature = inspect.signature(functions[name])
        args = [None] * len(call.args)
        kwargs = {k.arg: None for k in call.keywords}
        bound = signature.bind(*args, **kwargs)   # raises TypeError on an unknown or missing argument
        extra = bound.arguments.get("steering_options", {})
        if extra:
            algorithm = next((ast.literal_eval(k.value) for k in call.keywords if k.arg == "algorithm"), "fk")
            target = gf.beam_search if algorithm == "beam" else gf.fk_steering
            unknown = set(extra) - set(inspect.signature(target).parameters)
            assert not unknown, f"README: steer(..., {unknown}) is not an option of {target.__name__}"
        seen.add(name)
    assert seen == set(functions)


def test_flux_section_keywords_are_parameters():
    """Each ``name=`` the FLUX section names is a keyword of the integration's sample or steer."""
    pytest.importorskip("diffusers")
    from glass_fast.integrations import diffusers as integration

    names = set(re.findall(r"`(\w+)=", section("FLUX and SD3 (diffusers)")))
    names.discard("num_inference_steps")   # named as the pipelines' argument, which sample / steer replace
    assert len(names) >= 15
    known = set(inspect.signature(integration.sample).parameters) | set(inspect.signature(integration.steer).parameters)
    known |= set(inspect.signature(gf.fk_steering).parameters)  # steer's steering_options
    assert names <= known, f"README's FLUX section names {sorted(names - known)}, which sample / steer do not take"


def test_reward_guidance_line_constructs():
    """The digits section's ``RewardGuidance(reward, scale=1, window=(0.2, 0.7))``."""
    line = re.search(r"`(RewardGuidance\(reward, [^`]*\))`", section("A real model: digits")).group(1)
    guidance = eval(line, {"RewardGuidance": gf.RewardGuidance, "reward": lambda x: x.sum(-1)})
    assert isinstance(guidance, gf.RewardGuidance)
    assert "window=(0.2, 0.7)" in line and inspect.signature(gf.RewardGuidance).parameters["window"].default == (0.2, 0.7)


def test_digits_section_facts():
    """"the 1,797 real digits", "88.9% of real test images are classified with probability above 0.9", and the
    87.7% of ODE samples is the quality table's ODE row."""
    from glass_fast import zoo

    text = section("A real model: digits")
    stated_all = int(re.search(r"to the ([0-9,]+) real digits", text).group(1).replace(",", ""))
    assert len(zoo.real_digits("all")[0]) == stated_all
    ode, real = re.search(r"([0-9.]+)% of ODE samples and ([0-9.]+)% of real test images", text).groups()
    x, _ = zoo.real_digits("test")
    assert round(100 * zoo.confident_rate(x), 1) == float(real)
    ode_row = re.search(r"^\| ODE \(Euler\) \| [0-9.]+ \| [0-9.]+ \| ([0-9.]+) \|", text, re.M).group(1)
    assert float(ode_row) == float(ode) / 100


def test_inpainting_table_originals_row():
    """The inpainting table's "held-out originals" row is the classifier on the example's 200 held-out digits."""
    text = section("A real model: digits")
    agree, log_p = re.search(r"^\| held-out originals \| ([0-9.]+) \| (-?[0-9.]+) \|", text, re.M).groups()
    per_digit = int(re.search(r"the top half of (\d+) held-out digits \((\d+) per digit\)", text).group(2))
    example = load_example("digits_inpaint")
    images, labels = example.held_out(per_digit)
    assert len(images) == 10 * per_digit
    got = example.score(images, labels)
    assert (f"{got[0]:.3f}", f"{got[1]:.3f}") == (agree, log_p)


def test_backend_tables_match_the_ops():
    """The Backends table's ops exist; GLASS_FAST_BACKEND's values and the auto order are the package's."""
    from glass_fast import ops
    from glass_fast.ops import _backend

    text = section("Backends")
    op_names = {n for row in re.findall(r"^\| (`.*?) \|", text, re.M) for n in re.findall(r"`(\w+)`", row)}
    assert {"fused_step", "fused_step_", "resample_indices", "gather_particles_"} <= op_names
    for name in op_names:
        assert callable(getattr(ops, name, None)), f"README's Backends table names ops.{name}"
    env_row = re.search(r"^\| `GLASS_FAST_BACKEND` \| (.*) \|$", section("Environment variables"), re.M).group(1)
    assert re.findall(r"`(\w+)`", env_row) == list(_backend.BACKENDS)
    order = re.search(r"picks (\w+), then (\w+), then (\w+) for CUDA tensors and (\w+), then (\w+) for\s+CPU", text)
    assert order.groups()[:3] == _backend._PREFERENCE["cuda"] and order.groups()[3:] == _backend._PREFERENCE["cpu"]


def _script_commands():
    """(argv prefix, [--flags]) of every ``python ...`` command the README shows outside the FLUX section."""
    text = re.sub(r"\n## FLUX.*?(?=\n## )", "\n", README, flags=re.S)
    found = {}
    for target, rest in re.findall(r"`python3? (-m\s+glass_fast[\w.]+|\w+/\w+\.py)([^`]*)`", text):
        found.setdefault(re.sub(r"\s+", " ", target), set()).update(re.findall(r"(--[\w-]+)", rest))
    return sorted((target, sorted(flags)) for target, flags in found.items() if flags)


@pytest.mark.parametrize("target, flags", _script_commands())
def test_script_commands_take_their_flags(target, flags):
    """Each README command's flags are in its ``--help`` (the commands themselves take minutes)."""
    res = subprocess.run([sys.executable, *target.split(), "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for flag in flags:
        assert re.search(rf"(^|\s){re.escape(flag)}\b", res.stdout), f"`python {target} {flag}`: not in --help"


def test_script_commands_found():
    targets = [t for t, _ in _script_commands()]
    assert {"-m glass_fast.zoo.train", "benchmarks/bench_steering.py", "examples/digits_inpaint.py"} <= set(targets)


def test_example_script_docstrings_match_their_parsers():
    """The usage lines in each example's docstring use flags its parser defines."""
    for name in ("digits_inpaint", "flux_fk_glass"):
        source = (ROOT / "examples" / f"{name}.py").read_text()
        doc = ast.get_docstring(ast.parse(source))
        used = set(re.findall(r"(--[\w-]+)", doc))
        defined = set(re.findall(r"add_argument\(\"(--[\w-]+)\"", source))
        assert used and used <= defined, (name, sorted(used - defined))


@pytest.mark.parametrize("argv, needle", [
    (["--per-digit", "1000"], "--per-digit 1000: the held-out split has only"),
    (["--out", "FILE"], "is a file; give a folder for the grid"),
])
def test_inpainting_example_refuses_bad_arguments_in_one_line(tmp_path, capsys, argv, needle):
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a == "FILE" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        load_example("digits_inpaint").main(argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("flag", [["--size", "128"], ["--offload"]])
def test_flux_example_refuses_options_tiny_would_ignore(capsys, flag):
    with pytest.raises(SystemExit) as exc:
        load_example("flux_fk_glass").main(["--tiny", "--device", "cpu", *flag])
    assert exc.value.code == 2
    assert f"{flag[0]} applies to --model runs, not to --tiny" in capsys.readouterr().err.strip().splitlines()[-1]


def test_repository_paths_in_the_readme_exist():
    """Every repository file the README names (scripts, kernels, images, results) is there; bench_out/ is what
    ``glass-fast bench --out bench_out`` writes."""
    paths = set(re.findall(r"(?<![\w/.-])((?:[\w-]+/)+[\w.-]+\.(?:py|md|cuh|h|cu|sh|png|cpp))", README))
    assert {"csrc/cuda/kernels.cuh", "docs/images/digits_steering.png", "benchmarks/RESULTS.md"} <= paths
    missing = [p for p in sorted(paths) if not p.startswith("bench_out/") and not (ROOT / p).is_file()]
    assert not missing, f"README names {missing}, which the repository does not have"
