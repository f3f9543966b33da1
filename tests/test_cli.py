"""The glass-fast command line, run as a user would: a subprocess per subcommand with tiny settings."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLER = ["--transitions", "2", "--inner-steps", "2", "--quiet"]
TINY = SAMPLER + ["--particles", "2"]  # steering commands (demo, steer, bench)


def run_cli(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "glass_fast", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def assert_ok(res):
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr


def test_demo_writes_table_and_grid(tmp_path):
    res = run_cli("demo", "--groups", "2", "--digit", "7", "--out", str(tmp_path), *TINY)
    assert_ok(res)
    for label in ("flow baseline (ODE)", "BoN-ODE", "BoN-SDE", "BoN-GLASS", "FKS-SDE", "FKS-GLASS"):
        assert f"| {label} |" in res.stdout
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert "FKS-GLASS" in (tmp_path / "demo.md").read_text()


def test_no_subcommand_means_demo():
    from glass_fast.cli import _parse

    assert _parse([]).command == "demo"
    args = _parse(["--digit", "5", "--quiet"])
    assert args.command == "demo" and args.digit == 5 and args.quiet


def test_sample(tmp_path):
    method = "sde"
    res = run_cli("sample", "--method", method, "--n", "8", "--out", str(tmp_path), *SAMPLER)
    assert_ok(res)
    assert f"method={method} samples=8 model calls=4" in res.stdout
    assert (tmp_path / "samples.png").exists() and (tmp_path / "samples.pt").exists()
    # An option the method does not take is refused in one line, not ignored.
    res = run_cli("sample", "--method", method, "--n", "8", "--rho", "ddpm", "--out", str(tmp_path), *SAMPLER)
    assert res.returncode != 0 and "rho='ddpm' is the GLASS / plug-in kernels' correlation" in res.stderr
    assert "Traceback" not in res.stderr


def test_steer(tmp_path):
    res = run_cli("steer", "--method", "fks-glass", "--digit", "0", "--groups", "2", "--solver", "midpoint",
                  "--out", str(tmp_path), *TINY)
    assert_ok(res)
    assert "method=fks-glass digit=0 groups=2 particles=2 model calls/output=8" in res.stdout
    assert (tmp_path / "steer.png").exists()


def test_steer_with_reward_guidance_costs_no_model_calls(tmp_path):
    res = run_cli("steer", "--method", "fks-glass-guided", "--digit", "3", "--groups", "2", "--out", str(tmp_path),
                  *TINY)
    assert_ok(res)
    # The gradient is taken at the denoiser output: the same model calls as unguided FK steering.
    assert "method=fks-glass-guided digit=3 groups=2 particles=2 model calls/output=8" in res.stdout


def test_steer_with_beam_search(tmp_path):
    res = run_cli("steer", "--method", "beam-glass", "--digit", "1", "--groups", "2", "--out", str(tmp_path), *TINY)
    assert_ok(res)
    # 2 particles' budget: 1 beam with 2 children; 1 + 2 transitions x 2 calls x 2 children - 2 model calls.
    assert "method=beam-glass digit=1 groups=2 particles=2 model calls/output=7" in res.stdout
    assert (tmp_path / "steer.png").exists()


def test_bench_writes_every_table_and_plot(tmp_path):
    res = run_cli("bench", "--table", "all", "--n", "16", "--groups", "2", "--digits", "1,2", "--ks-samples", "200",
                  "--out", str(tmp_path), *TINY, timeout=400)
    assert_ok(res)
    text = (tmp_path / "bench.md").read_text()
    assert "Plain samplers" in text and "GLASS (rho = DDPM)" in text and "real digits" in text
    assert "Steering" in text and "FKS-GLASS" in text and "FKS-GLASS + guidance" in text
    for png in ("quality_samples.png", "steering_1.png", "reward_vs_nfe.png"):
        assert (tmp_path / png).stat().st_size > 0


BAD_ARGUMENTS = [
    (["demo", "--particles", "0"], "--particles"),
    (["demo", "--rho", "1.5"], "--rho"),
    (["steer", "--digit", "11"], "--digit"),
    (["sample", "--method", "magic"], "--method"),
    (["demo", "--dtype", "int8"], "--dtype"),
    (["bench", "--digits", "1,x"], "--digits"),
    (["demo", "--no-such-flag"], "--no-such-flag"),
    (["sample", "--n", "many"], "--n"),
    (["demo", "--device", "cuda:7" if not shutil.which("nvidia-smi") else "nonsense"], "--device"),
    (["demo", "--device", "cuda:99"], "'cuda:99'"),
    (["demo", "--device", "mps"], "'mps'"),
    (["frobnicate"], "unknown command 'frobnicate'; choose from demo, sample, steer, bench"),
    (["sample", "--particles", "3"], "glass-fast sample --help"),
    (["demo", "--groups", "-2"], "--groups must be an integer >= 1, got -2"),
    (["steer", "--transitions", "0"], "--transitions must be an integer >= 1, got 0"),
    (["sample", "--inner-steps", "-1"], "--inner-steps must be an integer >= 1, got -1"),
    (["demo", "--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["demo", "--lmbda", "inf"], "--lmbda must be a finite number >= 0, got inf"),
    (["demo", "--lmbda", "-1"], "--lmbda must be a finite number >= 0, got -1"),
    (["demo", "--seed", "-1"], "--seed must be an integer in [0, 4611686018427387903], got -1"),
    (["demo", "--seed", str(2**70)], "--seed must be an integer in [0, "),
    (["bench", "--ks-samples", "5"], "--ks-samples must be an integer >= 100, got 5"),
    (["steer", "--solver", "heun", "--inner-steps", "3"], "--inner-steps must be even with the heun solver"),
    # The quality table has a GLASS-midpoint row whatever --solver says.
    (["bench", "--table", "quality", "--inner-steps", "5"], "--inner-steps must be even with the midpoint solver"),
    (["steer", "--method", "fks-sde", "--potential", "best"], "argument --potential: invalid choice: 'best'"),
    (["bench", "--table", "speed"], "argument --table: invalid choice: 'speed'"),
]


@pytest.mark.parametrize("args, needle", BAD_ARGUMENTS)
def test_bad_arguments_give_one_line_and_status_2(capsys, args, needle):
    from glass_fast.cli import main

    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("glass-fast: error:") and needle in lines[0]
    assert out == ""


@pytest.mark.parametrize("kind", ["file", "unreachable"])
def test_bad_output_folder_is_a_usage_error(tmp_path, capsys, kind):
    from glass_fast.cli import main

    if kind == "file":
        out = tmp_path / "taken"
        out.write_text("")
        needle = f"--out {str(out)!r} is a file"
    else:
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        out = blocker / "sub"  # a folder below a file cannot be created
        needle = f"--out {str(out)!r} cannot be created"
    assert main(["demo", "--out", str(out), *TINY]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"glass-fast: error: {needle}"), lines
    assert not out.is_dir()


def test_solver_checks_apply_only_where_the_solver_is_used():
    from glass_fast.cli import UsageError, _parse

    # The SDE ignores --solver, and the accuracy table sets its own model calls: odd inner steps are fine.
    assert _parse(["sample", "--method", "sde", "--solver", "heun", "--inner-steps", "3"]).inner_steps == 3
    assert _parse(["bench", "--table", "accuracy", "--inner-steps", "3"]).inner_steps == 3
    assert _parse(["steer", "--method", "bon-sde", "--inner-steps", "1"]).inner_steps == 1
    # ODE proposals in steering always integrate with Euler: another --solver is refused (it would be ignored),
    # and odd inner steps are fine.
    assert _parse(["steer", "--method", "fks-ode", "--inner-steps", "5"]).inner_steps == 5
    with pytest.raises(UsageError, match="--solver midpoint does not apply to --method fks-ode"):
        _parse(["steer", "--method", "fks-ode", "--solver", "midpoint", "--inner-steps", "5"])


def test_sample_does_not_take_particles_but_steering_commands_do():
    from glass_fast.cli import _parse

    for command in ("demo", "steer", "bench"):
        assert _parse([command, "--particles", "3"]).particles == 3


def test_help_of_every_command(capsys):
    from glass_fast.cli import COMMANDS, main

    for argv in [["--help"]] + [[c, "--help"] for c in COMMANDS]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: glass-fast" + (f" {argv[0]}" if len(argv) > 1 else ""))
        if len(argv) == 1:
            assert "Without a command: demo" in out and "examples:" in out
        else:
            assert "--out" in out and "--device" in out


def test_bad_argument_in_a_real_process():
    res = run_cli("steer", "--particles", "-3", timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == "glass-fast: error: argument --particles: --particles must be an integer >= 1, got -3"
    assert res.stdout == ""


def test_plots_write_pngs_and_reject_bad_input(tmp_path):
    import torch

    from glass_fast.plots import save_ks_vs_nfe, save_reward_vs_nfe, save_sample_grid

    grid = save_sample_grid({"a": torch.zeros(3, 1, 8, 8), "b": torch.ones(5, 1, 8, 8)}, str(tmp_path / "g" / "grid.png"),
                            captions={"a": "x"})
    line = save_reward_vs_nfe({"m": ([10, 20], [-1.0, -0.5])}, str(tmp_path / "r.png"))
    ks = save_ks_vs_nfe({"euler": ([2, 4], [0.1, 0.05])}, str(tmp_path / "k.png"), critical=0.02)
    for path in (grid, line, ks):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="rows is empty"):
        save_sample_grid({}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="series 'm' has 2 x values but 1 y values"):
        save_reward_vs_nfe({"m": ([1, 2], [0.0])}, str(tmp_path / "y.png"))
