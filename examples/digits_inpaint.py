#!/usr/bin/env python3
"""Inpainting with the shipped digits model: keep the top half of held-out digits, regenerate the bottom half.

    python examples/digits_inpaint.py --out inpaint          # CPU, under 10 seconds
    python examples/digits_inpaint.py --per-digit 2 --out x  # seconds

Every image's top four rows are kept (``glass_fast.Inpaint`` as the ``project`` hook blends them, noised to
the state's time along the run's noise, into the state after every transition); the bottom four rows are
generated. Rows of the table, 50 model calls per output (5 transitions x 10 inner steps) and per particle:
ODE completions, GLASS completions, and FK steering over GLASS toward the image's own label (K particles per
image, one output drawn by weight: a draw of p(completion | top half, label)). The shipped classifier then
reads each completed image: "agree" is how often it reads the original digit, log p its log-probability.
The kept half is checked to be the original's exactly. Writes a grid: originals, kept halves, completions.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import glass_fast as gf
from glass_fast.plots import save_sample_grid
from glass_fast.zoo import digits_flow_model
from glass_fast.zoo.data import real_digits
from glass_fast.zoo.models import digit_log_probs

KEEP_ROWS = 4   # the top half of an 8 x 8 digit
LABELS = {"ode": "ODE", "glass": "GLASS", "fks-glass": "FK steering over GLASS"}


def held_out(per_digit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_digit`` held-out images of every digit, [10 * per_digit, 1, 8, 8], and their labels."""
    images, labels = zip(*(real_digits("test", d) for d in range(10)))
    if min(len(x) for x in images) < per_digit:
        raise ValueError(f"per_digit={per_digit}: the held-out split has only {min(len(x) for x in images)} images "
                         f"of its rarest digit")
    return torch.cat([x[:per_digit] for x in images]), torch.cat([y[:per_digit] for y in labels])


def generate_mask() -> torch.Tensor:
    """[1, 1, 8, 8]: 1 on the rows to generate (bottom half), 0 on the kept rows."""
    mask = torch.ones(1, 1, 8, 8)
    mask[..., :KEEP_ROWS, :] = 0
    return mask


def complete(model, images, labels, method: str, particles: int, seed: int, transitions: int,
             inner_steps: int) -> torch.Tensor:
    """One completion per image: a plain sampler ("ode", "glass") or FK steering over GLASS ("fks-glass")."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(transitions=transitions, inner_steps=inner_steps)
    if method != "fks-glass":
        noise = torch.randn(images.shape, generator=g)
        return gf.sample(model, noise, method=method, generator=g, project=gf.Inpaint(model.schedule, images,
                                                                                       generate_mask(), noise), **kw)
    n = images.shape[0]
    noise = torch.randn((n, particles) + tuple(images.shape[1:]), generator=g)
    rows = labels.repeat_interleave(particles)

    def own_label(x):   # log p(label of the row's image | x), rows group-major as fk_steering lays them out
        return digit_log_probs(x).gather(1, rows[:, None])[:, 0]
    project = gf.Inpaint(model.schedule, images.repeat_interleave(particles, dim=0), generate_mask(), noise)
    res = gf.fk_steering(model, own_label, noise, method="glass", generator=g, project=project, **kw)
    return res.select(generator=g)


def score(x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(fraction the classifier reads as the label, mean log p(label | x))."""
    log_p = digit_log_probs(x)
    return float((log_p.argmax(-1) == labels).float().mean()), float(log_p.gather(1, labels[:, None]).mean())


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-digit", type=_positive, default=20, help="held-out images per digit (default 20)")
    p.add_argument("--particles", type=_positive, default=8, help="FK particles per image (default 8)")
    p.add_argument("--transitions", type=_positive, default=5)
    p.add_argument("--inner-steps", type=_positive, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="digits_inpaint", help="folder for the grid (default digits_inpaint)")
    args = p.parse_args(argv)
    # Bad arguments end here in one line, before any sampling.
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} is a file; give a folder for the grid")
    try:
        images, labels = held_out(args.per_digit)
    except ValueError as exc:
        p.error(f"--per-digit {args.per_digit}: {str(exc).split(': ', 1)[1]}")
    with torch.no_grad():
        return run(args, images, labels)


def run(args, images: torch.Tensor, labels: torch.Tensor) -> int:
    model = digits_flow_model()
    keep = generate_mask() == 0
    rows = {"original": images, "kept half": torch.where(keep, images, torch.full_like(images, -1.0))}
    table = [("held-out originals", *score(images, labels))]
    for method in ("ode", "glass", "fks-glass"):
        out = complete(model, images, labels, method, args.particles, args.seed, args.transitions,
                       args.inner_steps)
        if not torch.equal(out[keep.expand_as(out)], images[keep.expand_as(images)]):
            raise AssertionError(f"{method}: the kept half differs from the original")
        rows[LABELS[method]] = out
        table.append((LABELS[method], *score(out, labels)))
    calls = args.transitions * args.inner_steps
    print(f"{len(images)} held-out digits, top {KEEP_ROWS} rows kept; {calls} model calls per output "
          f"(fks-glass: per particle, {args.particles} particles)")
    print("| completion | agree | mean log p(label) |\n|---|---|---|")
    for name, agree, log_p in table:
        print(f"| {name} | {agree:.3f} | {log_p:.3f} |")
    os.makedirs(args.out, exist_ok=True)
    path = save_sample_grid({k: v[::max(1, args.per_digit)] for k, v in rows.items()},
                                     os.path.join(args.out, "digits_inpaint.png"),
                                     title="bottom half regenerated (one image per digit)")
    print(f"grid: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
