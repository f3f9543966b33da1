"""Reproduce the shipped digit weights: ``python -m glass_fast.zoo.train`` (about 7 minutes on one core).

Writes into ``glass_fast/zoo/weights/`` (or ``--out``):
  digits.safetensors      the 1,797 scikit-learn images (uint8), labels, held-out test mask
  classifier.safetensors  DigitClassifier trained on the train split with noise/shift augmentation
  flow.safetensors        DigitsVelocityNet (EMA weights), flow matching on the train split

Needs scikit-learn (only here: loading the shipped files does not). Seeded end to end; bitwise
reproduction also needs the same torch version and thread count: the shipped files were made with
``--threads 1`` (a few minutes on an idle core; one thread is also the faster choice on a busy machine,
since this network is too small for intra-op parallelism to pay). Other thread counts give weights of the
same quality that differ in the last bits.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..cli_args import UsageError, make_out, positive, seed, threads
from .data import WEIGHTS_DIR, make_test_mask, to_model_range
from .nets import DigitClassifier, DigitsVelocityNet


def build_digits_file(path: str) -> dict:
    """Save scikit-learn's digits as uint8 with a seeded test mask; returns the tensors."""
    from sklearn.datasets import load_digits  # only the training script needs scikit-learn

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.uint8)  # [1797, 8, 8], values 0..16
    labels = torch.tensor(d.target, dtype=torch.uint8)
    tensors = {"images": images, "labels": labels, "test_mask": make_test_mask(len(labels)).to(torch.uint8)}
    save_file(tensors, path, metadata={"source": "sklearn.datasets.load_digits", "range": "0..16"})
    return tensors


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel per axis, filling with background (-1)."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (b,), generator=gen)
    dx = torch.randint(0, 3, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None, :])  # [b, 8]
    cols = (dx[:, None] + torch.arange(8)[None, :])
    idx_b = torch.arange(b)[:, None, None]
    return padded[idx_b, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation so probabilities stay sensible on slightly imperfect generated digits."""
    b = x.shape[0]
    x = _random_shift(x, gen)
    scale = 1.0 + 0.15 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)  # contrast jitter
    x = (x + 1.0) * scale - 1.0
    noise_std = 0.25 * torch.rand(b, 1, 1, 1, generator=gen)
    return (x + noise_std * torch.randn(x.shape, generator=gen)).clamp(-1.0, 1.0)


def train_classifier(x: torch.Tensor, y: torch.Tensor, *, epochs: int = 40, batch: int = 128,
                     seed: int = 0, log=print) -> DigitClassifier:
    """Train :class:`DigitClassifier` on images x [N, 1, 8, 8] in [-1, 1] and labels y [N]."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(net(_augment(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            log(f"classifier epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    return net.eval()


def train_flow(x: torch.Tensor, *, steps: int = 16000, batch: int = 256, seed: int = 0,
               ema_decay: float = 0.999, width: int = 256, depth: int = 4, lr: float = 2e-3, log=print) -> DigitsVelocityNet:
    """Flow matching on x [N, 1, 8, 8]: x_t = t z + (1 - t) eps, regress u = z - eps. Returns the EMA net."""
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    net = DigitsVelocityNet(width=width, depth=depth)
    ema = DigitsVelocityNet(width=width, depth=depth)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        z = x[torch.randint(0, len(x), (batch,), generator=gen)]
        eps = torch.randn(z.shape, generator=gen)
        # Logit-normal times put more training weight on mid times, where the velocity is hardest.
        t = torch.sigmoid(torch.randn(batch, generator=gen))
        tb = t[:, None, None, None]
        xt = tb * z + (1 - tb) * eps
        loss = F.mse_loss(net(xt, t), z - eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - ema_decay)
        if (step + 1) % 1000 == 0:
            log(f"flow step {step + 1}/{steps} loss {loss.item():.4f}")
    return ema.eval()


def _state(net) -> dict:
    return {k: v.detach().contiguous() for k, v in net.state_dict().items()}


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"--lr must be a finite number > 0, got {text!r}")
    return value


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m glass_fast.zoo.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=WEIGHTS_DIR,
                   help="output folder (default: the package's weights/, replacing the shipped files)")
    # Checked while parsing, before any file is written: a bad count found later would fail after the
    # classifier had replaced the shipped one.
    p.add_argument("--seed", type=seed, default=0, help="random seed (default: 0)")
    # The shipped files were made with one thread; another count changes the last bits of the weights.
    p.add_argument("--threads", type=threads, default=1, help="CPU threads (default: 1, as for the shipped files)")
    p.add_argument("--flow-steps", type=positive("--flow-steps"), default=16000,
                   help="flow-matching steps (default: 16000)")
    p.add_argument("--classifier-epochs", type=positive("--classifier-epochs"), default=40,
                   help="classifier epochs (default: 40)")
    p.add_argument("--width", type=positive("--width"), default=256, help="flow network width (default: 256)")
    p.add_argument("--depth", type=positive("--depth"), default=4, help="flow network residual blocks (default: 4)")
    p.add_argument("--lr", type=_learning_rate, default=2e-3, help="flow model peak learning rate (default: 0.002)")
    args = p.parse_args(argv)
    try:
        make_out(args.out)
    except UsageError as exc:
        p.error(str(exc))
    torch.set_num_threads(args.threads)
    start = time.time()
    raw = build_digits_file(os.path.join(args.out, "digits.safetensors"))
    train = ~raw["test_mask"].bool()
    x = to_model_range(raw["images"][train]).unsqueeze(1)
    y = raw["labels"][train].long()
    clf = train_classifier(x, y, epochs=args.classifier_epochs, seed=args.seed)
    save_file(_state(clf), os.path.join(args.out, "classifier.safetensors"),
              metadata={"config": json.dumps(clf.config), "seed": str(args.seed), "threads": str(args.threads)})
    print(f"classifier saved ({time.time() - start:.0f}s)")
    flow = train_flow(x, steps=args.flow_steps, seed=args.seed, width=args.width, depth=args.depth, lr=args.lr)
    save_file(_state(flow), os.path.join(args.out, "flow.safetensors"),
              metadata={"config": json.dumps(flow.config), "seed": str(args.seed), "threads": str(args.threads),
                        "steps": str(args.flow_steps),
                        "prediction": "velocity", "schedule": "linear"})
    print(f"flow model saved ({time.time() - start:.0f}s) to {args.out}")


if __name__ == "__main__":
    main()
