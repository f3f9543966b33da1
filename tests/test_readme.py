"""The README's CPU example and the FLUX example script run as written."""
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Example (runs on CPU)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md example", "exec"), scope)
    res, x, log_p = scope["res"], scope["x"], scope["log_p"]
    assert res.best.shape == (8, 2) and res.nfe == 50
    # Two equal modes at x = +-2: the plain sample is balanced, the reward pulls FK to the right-hand one.
    assert abs(float(x[:, 0].mean())) < 0.3
    assert float((res.samples[..., 0] > 0).double().mul(res.weights).sum(-1).mean()) > 0.9
    assert log_p.shape == (256,) and torch.isfinite(log_p).all()
    assert capsys.readouterr().out.count("\n") == 2


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
