"""The README's CPU example runs as written."""
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
