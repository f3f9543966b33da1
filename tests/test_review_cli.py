"""The command line refuses what it would ignore or crash on, before any sampling; bench options reach the tables."""
import os

import pytest

from glass_fast.cli import _parse, main


@pytest.fixture(autouse=True)
def _keep_thread_count():
    # Parsing sets torch's thread count for the process; the tests after these should not see it changed.
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# Small settings and a temporary folder, so that a check that is missing runs a short job instead.
SMALL = ["--transitions", "2", "--inner-steps", "2", "--quiet"]


def one_error_line(capsys, argv, out) -> str:
    assert main([argv[0], *SMALL, "--out", str(out), *argv[1:]]) == 2  # argv's own values win
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    assert lines[0].startswith("glass-fast: error: ")
    return lines[0]


def test_more_threads_than_cpus_is_refused(capsys, tmp_path):
    # 20,000 threads crashed in the OpenMP runtime; thousands ran a 50-call sample for minutes.
    cpus = os.cpu_count() or 1
    assert _parse(["demo", "--threads", str(cpus)]).threads == cpus
    line = one_error_line(capsys, ["sample", "--threads", str(cpus + 1)], tmp_path)
    assert f"--threads must be an integer in [1, {cpus}] (the CPU count), got {cpus + 1}" in line


def test_device_without_a_generator_is_refused(capsys, tmp_path):
    # The meta device passed the device check and failed with a traceback at the sampler's generator.
    line = one_error_line(capsys, ["sample", "--device", "meta"], tmp_path)
    assert "--device 'meta' cannot be used here" in line


def test_bench_quality_table_needs_two_samples(capsys, tmp_path):
    # A Frechet distance needs two samples; n = 1 used to sample every row first, then fail naming "feats_a".
    line = one_error_line(capsys, ["bench", "--table", "quality", "--n", "1"], tmp_path)
    assert "--n must be at least 2 for the quality table (a Frechet distance needs two samples), got 1" in line
    assert _parse(["bench", "--table", "steering", "--n", "1"]).n == 1   # the steering table does not use it


@pytest.mark.parametrize("argv, needle", [
    (["steer", "--method", "fks-sde", "--rho", "0.3"], "--rho does not apply to --method fks-sde"),
    (["steer", "--method", "bon-ode", "--rho", "ddpm"], "--rho does not apply to --method bon-ode"),
    (["steer", "--method", "fks-ode", "--solver", "midpoint"], "--solver midpoint does not apply to --method fks-ode"),
    (["steer", "--method", "bon-sde", "--solver", "heun"], "--solver heun does not apply to --method bon-sde"),
    (["steer", "--method", "bon-glass", "--potential", "max"], "--potential does not apply to --method bon-glass"),
    (["steer", "--method", "beam-glass", "--lmbda", "2"], "--lmbda does not apply to --method beam-glass"),
    (["bench", "--table", "quality", "--n", "16", "--rho", "0.2"], "--rho does not apply to --table quality"),
    (["bench", "--table", "accuracy", "--ks-samples", "100", "--solver", "heun"],
     "--solver heun does not apply to --table accuracy"),
])
def test_options_a_command_would_ignore_are_refused(capsys, tmp_path, argv, needle):
    assert needle in one_error_line(capsys, argv, tmp_path)


def test_options_are_accepted_where_they_are_used():
    assert _parse(["steer", "--method", "fks-glass", "--rho", "0.3", "--solver", "midpoint"]).rho == 0.3
    assert _parse(["steer", "--method", "fks-glass-guided", "--potential", "max", "--lmbda", "2"]).lmbda == 2
    assert _parse(["steer", "--method", "fks-sde", "--potential", "add", "--lmbda", "0.5"]).potential == "add"
    assert _parse(["steer", "--method", "fks-ode", "--solver", "euler"]).solver == "euler"
    assert _parse(["bench", "--table", "accuracy", "--rho", "0.2"]).rho == 0.2
    assert _parse(["bench", "--table", "all", "--rho", "0.2", "--solver", "heun"]).solver == "heun"
    assert _parse(["demo", "--rho", "ddpm", "--lmbda", "2"]).rho == "ddpm"
    # The defaults, left out, stand for themselves in the settings.
    from glass_fast.cli import _settings

    s = _settings(_parse(["steer", "--method", "bon-sde"]))
    assert (s.rho, s.solver, s.potential, s.lmbda) == (0.4, "euler", "diff", 1.0)


def test_bench_accuracy_table_follows_rho_transitions_and_seed(monkeypatch, tmp_path):
    import glass_fast.accuracy as acc

    seen = []

    def fake_table(**kwargs):
        seen.append(kwargs)
        return {"interior": {"sde": {2: 0.5}}, "final": {"sde": {2: 0.5}}, "critical": 0.1, "n": kwargs["n"]}

    monkeypatch.setattr(acc, "accuracy_table", fake_table)
    assert main(["bench", "--table", "accuracy", "--ks-samples", "300", "--rho", "0.7", "--transitions", "3",
                 "--seed", "5", "--out", str(tmp_path), "--quiet"]) == 0
    assert seen == [dict(n=300, rho=0.7, transitions=3, seed=5)]
    assert "rho = 0.7, 3 transitions" in (tmp_path / "bench.md").read_text()


def test_accuracy_table_seed_and_transitions():
    from glass_fast.accuracy import accuracy_table

    kw = dict(calls=(2,), n=200, methods=("sde",))
    base = accuracy_table(**kw)
    assert accuracy_table(seed=0, **kw) == base                   # seed 0 is the table as it always was
    assert accuracy_table(seed=1, **kw)["interior"] != base["interior"]
    assert accuracy_table(seed=1, **kw) == accuracy_table(seed=1, **kw)
    with pytest.raises(ValueError, match="transitions must be an integer >= 2 .* got 1"):
        accuracy_table(transitions=1, **kw)   # was max() of an empty list
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        accuracy_table(seed=-1, **kw)


def test_bench_accuracy_needs_two_transitions(capsys, tmp_path):
    argv = ["bench", "--table", "accuracy", "--ks-samples", "100", "--transitions", "1"]
    line = one_error_line(capsys, argv, tmp_path)
    assert "--transitions must be at least 2 for the accuracy table" in line


@pytest.mark.parametrize("argv, needle", [
    (["--threads", "0"], "--threads"),
    (["--flow-steps", "0"], "--flow-steps"),
    (["--classifier-epochs", "0"], "--classifier-epochs"),
    (["--width", "0"], "--width"),
    (["--depth", "-1"], "--depth"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--seed", "-1"], "--seed"),
])
def test_train_refuses_bad_arguments_before_writing(tmp_path, capsys, argv, needle):
    # --flow-steps 0 used to train and write the classifier, then fail with a traceback (replacing the
    # shipped files without --out); --width 0 trained and saved a network of empty layers.
    from glass_fast.zoo import train

    with pytest.raises(SystemExit) as exc:
        train.main(["--out", str(tmp_path / "w"), "--flow-steps", "1", "--classifier-epochs", "1", *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_run_that_goes_non_finite_ends_with_one_line(capsys, tmp_path):
    # The guidance scale is lmbda: at 1e30 the guided denoiser overflows. The library's FloatingPointError
    # names where; it used to end the command with a traceback.
    assert main(["steer", "--method", "fks-glass-guided", "--lmbda", "1e30", "--groups", "2", *SMALL,
                 "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glass-fast: error: the model returned NaN or Inf"), err


def test_reward_names_integer_images():
    import torch

    from glass_fast.zoo import digit_log_probs, digit_reward

    # Raw 0..16 pixels as integers: the message named a dtype= argument the caller never gave.
    for fn in (digit_log_probs, digit_reward(3)):
        with pytest.raises(TypeError, match="x must be floating images in \\[-1, 1\\] .*, got torch.int64"):
            fn(torch.zeros(2, 1, 8, 8, dtype=torch.long))


def test_sample_grid_refuses_what_it_would_misdraw(tmp_path):
    import torch

    from glass_fast.plots import save_sample_grid

    path = str(tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"rows\['a'\] has shape \(2, 3, 8, 8\); expected images \[N, 1, 8, 8\]"):
        save_sample_grid({"a": torch.zeros(2, 3, 8, 8)}, path)   # was drawn as six images
    with pytest.raises(ValueError, match="max_per_row must be an integer >= 1, got 0"):
        save_sample_grid({"a": torch.zeros(2, 1, 8, 8)}, path, max_per_row=0)
    with pytest.raises(ValueError, match="rows hold no images"):
        save_sample_grid({"a": torch.zeros(0, 1, 8, 8)}, path)
    # One empty row among others is a blank row.
    assert save_sample_grid({"a": torch.zeros(0, 1, 8, 8), "b": torch.zeros(2, 1, 8, 8)}, path) == path


def test_a_run_too_large_for_memory_ends_with_one_line(capsys, tmp_path):
    # 10^12 samples of 64 floats: the allocator refuses at once; this was a traceback.
    assert main(["sample", "--n", str(10**12), *SMALL, "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glass-fast: error: out of memory ("), err
    assert lines[0].endswith("lower --n, --groups or --particles")


def test_bench_refuses_a_repeated_digit(capsys, tmp_path):
    # --digits 1,1,2 ran digit 1 twice and weighed it twice in the "mean over digits" of the summary.
    argv = ["bench", "--table", "steering", "--groups", "2", "--particles", "2", "--digits", "1,1,2"]
    assert "--digits lists 1 more than once; give each digit once" in one_error_line(capsys, argv, tmp_path)


def test_train_names_an_output_folder_it_cannot_make(tmp_path, capsys):
    from glass_fast.zoo import train

    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(SystemExit) as exc:   # was a FileExistsError traceback
        train.main(["--out", str(taken), "--flow-steps", "1", "--classifier-epochs", "1"])
    assert exc.value.code == 2
    assert f"--out {str(taken)!r} is a file" in capsys.readouterr().err


def test_consecutive_seeds_draw_unrelated_streams():
    """Seed s + 1's starting noise is not seed s's sampler noise (with torch seeds s and s + 1 it was); seed 0
    keeps torch seeds 0 and 1."""
    import torch
    from glass_fast.zoo.experiments import make_noise
    streams = []
    for s in range(3):
        noise, gen = make_noise((64,), s, "cpu", torch.float32)
        streams += [noise, torch.randn(64, generator=gen)]
    for i in range(len(streams)):
        for j in range(i):
            assert not torch.equal(streams[i], streams[j]), (i, j)
    assert torch.equal(streams[0], torch.randn(64, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(streams[1], torch.randn(64, generator=torch.Generator().manual_seed(1)))
