"""Command-line values of ``glass-fast`` and ``python -m glass_fast.zoo.train``, checked while parsing.

Each parser names the option, the value and what is allowed (argparse shows its message in one line).
"""
from __future__ import annotations

import argparse
import os

MAX_SEED = 2**62 - 1  # torch seeds are 64-bit; a run uses torch seeds 2 seed and 2 seed + 1 (make_noise)
MIN_KS_SAMPLES = 100  # below this the asymptotic KS critical value is meaningless


class UsageError(Exception):
    """A bad command-line value; reported as one line, exit status 2."""


def positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {value}")
        return value
    return parse


def digit(text):
    if text not in [str(d) for d in range(10)]:
        raise argparse.ArgumentTypeError(f"--digit must be one of 0..9, got {text!r}")
    return int(text)


def rho(text):
    if text == "ddpm":
        return "ddpm"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rho must be 'ddpm' or a number in [-1, 1], got {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--rho must be 'ddpm' or a number in [-1, 1], got {value}")
    return value


def nonneg_float(name):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {text!r}") from None
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {text}")
        return value
    return parse


def seed(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer in [0, {MAX_SEED}], got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"--seed must be an integer in [0, {MAX_SEED}], got {value}")
    return value


def threads(text):
    value = positive("--threads")(text)
    cpus = os.cpu_count() or 1
    if value > cpus:  # more threads than CPUs only wait on each other (thousands crash the OpenMP runtime)
        raise argparse.ArgumentTypeError(f"--threads must be an integer in [1, {cpus}] (the CPU count), got {value}")
    return value


def ks_samples(text):
    value = positive("--ks-samples")(text)
    if value < MIN_KS_SAMPLES:
        raise argparse.ArgumentTypeError(f"--ks-samples must be an integer >= {MIN_KS_SAMPLES}, got {value}")
    return value


def make_out(path: str) -> None:
    """Create the output folder before the run, so that a bad --out fails before minutes of sampling."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path!r} is a file; give a folder (created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {path!r} cannot be created ({exc.strerror}); give a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path!r} is not writable; give a writable folder")
