"""PNG figures for the digits examples (matplotlib with the Agg backend; nothing is shown on screen).

- :func:`save_sample_grid`: rows of 8x8 digit samples, one row per method.
- :func:`save_reward_vs_nfe`: reward against model calls, one line per method.
- :func:`save_ks_vs_nfe`: KS statistic against model calls, one line per inner solver.

Every function takes plain numbers/tensors and a path, writes the PNG and returns the path.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window, also without a display
    import matplotlib.pyplot as plt

    return plt


def _prepare(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


def save_sample_grid(rows: Mapping[str, torch.Tensor], path: str, *, max_per_row: int = 16,
                     title: str | None = None, captions: Mapping[str, str] | None = None) -> str:
    """Save a grid of digit images, one labelled row per entry.

    Args:
        rows: name -> images [N, 1, 8, 8] in [-1, 1] (values outside are clipped for display).
        path: output PNG path (folders are created).
        max_per_row: show at most this many images per row.
        title: figure title.
        captions: optional name -> short text shown under the row label (e.g. a score).

    Returns:
        ``path``.
    """
    if not rows:
        raise ValueError("rows is empty; pass at least one name -> images entry")
    for name, images in rows.items():   # reshaped to 8x8, [N, 3, 8, 8] would show as 3N images
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1:] != (1, 8, 8):
            got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"rows[{name!r}] has {got}; expected images [N, 1, 8, 8]")
    if isinstance(max_per_row, bool) or not isinstance(max_per_row, int) or max_per_row < 1:
        raise ValueError(f"max_per_row must be an integer >= 1, got {max_per_row!r}")
    if not any(len(images) for images in rows.values()):
        raise ValueError("rows hold no images; pass at least one image [1, 1, 8, 8]")
    plt = _pyplot()
    n_cols = min(max_per_row, max(int(v.shape[0]) for v in rows.values()))
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(0.62 * n_cols + 1.9, 0.7 * len(rows) + 0.5),
                             squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        imgs = images.detach().float().cpu().reshape(-1, 8, 8).clamp(-1, 1)
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(imgs):
                ax.imshow(imgs[c].numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        label = name if not captions or name not in captions else f"{name}\n{captions[name]}"
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=1.8 / (0.62 * n_cols + 1.9), right=0.99, wspace=0.08, hspace=0.12)
    _prepare(path)
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def _line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, *, xlabel: str,
               ylabel: str, title: str | None, logx: bool, logy: bool, hline: tuple[float, str] | None = None) -> str:
    if not series:
        raise ValueError("series is empty; pass at least one name -> (x values, y values) entry")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r} has {len(xs)} x values but {len(ys)} y values")
        ax.plot(list(xs), list(ys), marker="o", markersize=4, label=name)
    if hline is not None:
        ax.axhline(hline[0], color="gray", linestyle="--", linewidth=1, label=hline[1])
    if logx:
        ax.set_xscale("log")
        # Label the measured call counts themselves rather than powers of ten.
        ticks = []
        for t in sorted({float(x) for xs, _ in series.values() for x in xs}):
            if ticks and t <= 1.1 * ticks[-1]:   # one label, the larger, for nearly equal budgets (394 and 400)
                ticks[-1] = t
            else:
                ticks.append(t)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _prepare(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_reward_vs_nfe(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, *,
                       ylabel: str = "mean reward", title: str | None = None) -> str:
    """Save reward against model calls (NFE).

    Args:
        series: method name -> (NFE values, reward values), equal lengths.
        path: output PNG path.
        ylabel: y-axis label.
        title: figure title.

    Returns:
        ``path``.
    """
    return _line_plot(series, path, xlabel="model calls (NFE)", ylabel=ylabel, title=title, logx=True, logy=False)


def save_ks_vs_nfe(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, *,
                   title: str | None = None, critical: float | None = None) -> str:
    """Save Kolmogorov-Smirnov statistic against model calls, log-log.

    Args:
        series: solver name -> (NFE values, KS values), equal lengths.
        path: output PNG path.
        title: figure title.
        critical: optional KS critical value, drawn as a dashed line (below it: indistinguishable from exact).

    Returns:
        ``path``.
    """
    return _line_plot(series, path, xlabel="model calls (NFE)", ylabel="KS statistic", title=title,
                      logx=True, logy=True, hline=None if critical is None else (critical, "critical value (0.1%)"))
