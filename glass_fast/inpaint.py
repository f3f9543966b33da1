"""Inpainting by blending: after every transition, the state outside the region to generate is replaced by the
known data noised to the state's time along the run's own noise, x_t = alpha_t z + sigma_t eps (as diffusers'
inpainting pipelines do). A ``project`` hook for ``sample``, ``Sampler.run`` and the steering functions.
"""
from __future__ import annotations

import copy
import math

import torch

from .schedules import Schedule


class Inpaint:
    """The hook x <- mask * x + (1 - mask) * (alpha_t image + sigma_t noise) at every grid time t after the start.

    Args:
        schedule: the model's schedule (its alpha_t, sigma_t noise the known data).
        image: the known data z, broadcastable to the state [N, ...] (e.g. [1, ...]: one image for all rows).
        mask: 1 (True) where content is generated, 0 (False) where ``image`` is kept; bool, or floating with
            values in [0, 1] (soft edges blend); broadcastable to the state.
        noise: the run's start noise, [N, ...] (or steering's [B, K, ...], read as [B * K, ...]): the known part
            follows the same noise path. A state of m x N rows (beam-search children: each row repeated m times
            in place) uses each noise row m times. With [B, K, ...] noise, one image (or mask) per group is
            [B, 1, ...]: a [B, ...] one broadcasts as for any tensor, against the K axis (one per particle index).

    The blend is a heuristic, not conditioning: it leaves the generated region's law exact only where it does not
    depend on the known one. At t = 1 (alpha_1 = 1, sigma_1 = 0) the known region is ``image`` exactly, in the
    state's dtype.

    Example:
        >>> noise = torch.randn(8, 2)
        >>> keep_first = gf.Inpaint(model.schedule, torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]), noise)
        >>> x = gf.sample(model, noise, project=keep_first)   # x[:, 0] == 2
    """

    def __init__(self, schedule: Schedule, image: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a glass_fast Schedule (the model's), got {type(schedule).__name__}")
        for name, value in (("image", image), ("mask", mask), ("noise", noise)):
            # A bool mask is kept as given (converted where it is placed), so that refilling it in place is seen.
            allowed = "a floating or bool Tensor" if name == "mask" else "a floating Tensor"
            if not isinstance(value, torch.Tensor) or not (value.is_floating_point()
                                                           or name == "mask" and value.dtype == torch.bool):
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"{name} must be {allowed}, got {got}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} holds NaN or Inf")
        if noise.dim() < 2 or noise.numel() == 0:
            raise ValueError(f"noise must be the run's start noise [N, ...], non-empty, got shape {tuple(noise.shape)}")
        if bool(((mask < 0) | (mask > 1)).any()):
            raise ValueError(f"mask must hold values in [0, 1] (1: generate, 0: keep image), got values in "
                             f"[{float(mask.min()):g}, {float(mask.max()):g}]")
        layouts = [tuple(noise.shape)] + ([(noise.shape[0] * noise.shape[1],) + tuple(noise.shape[2:])]
                                          if noise.dim() > 2 else [])
        for name, value in (("image", image), ("mask", mask)):
            if not any(_broadcasts(value.shape, shape) for shape in layouts):
                rows = f" nor to its rows {layouts[1]}" if len(layouts) > 1 else ""
                raise ValueError(f"{name} of shape {tuple(value.shape)} broadcasts neither to the noise "
                                 f"{layouts[0]}{rows}")
        self.schedule, self.image, self.mask, self.noise = schedule, image, mask, noise
        self._order = None   # the noise row (and per-row image / mask) each state row descends from; None: its own
        self._placed: dict = {}   # (state shape, device, dtype) -> (noise, image, mask) there, made once
        self._stamps = None       # the tensors' storage and version when _placed was filled

    def gather(self, rows: torch.Tensor) -> "Inpaint":
        """This hook for states whose row i descends from row ``rows[i]`` of the current ones (FK resampling,
        beam selection): each row keeps following its ancestor's noise path (and per-row image and mask), so
        that resampling with equal weights leaves the law of the run unchanged. ``self`` is not modified."""
        out = copy.copy(self)
        rows = rows.to(torch.int64)
        out._order = rows if self._order is None else self._order.to(rows.device)[rows]
        out._placed, out._stamps = {}, None
        return out

    def __call__(self, k: int, t: float, x: torch.Tensor) -> torch.Tensor:
        # A time off the path would blend with alpha_t, sigma_t the schedule never takes (linear: sigma < 0 past 1).
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"Inpaint: t must be a time in [0, 1] (0 noise, 1 data), got {t!r}")
        # A state row holds one noise row ([N, ...]) or one of steering's [B, K, ...] particles, as many numbers in
        # any shape (a flat state of image noise): never parts of two noise rows.
        row, shape = math.prod(x.shape[1:]), self.noise.shape
        if row not in (math.prod(shape[1:]), math.prod(shape[2:]) if len(shape) > 2 else None) \
                or x.shape[0] % (self.noise.numel() // row):
            raise ValueError(f"Inpaint: the state {tuple(x.shape)} does not match the noise {tuple(self.noise.shape)} "
                             f"(rows of the same shape, or a multiple of them)")
        # A noise buffer (or image, mask) refilled in place since the last call is read anew; an inference tensor
        # keeps no write count, so with one the data is placed anew on every call.
        stamps = tuple(_stamp(v) for v in (self.noise, self.image, self.mask))
        if None in stamps or stamps != self._stamps:
            self._placed, self._stamps = {}, stamps
        key = (tuple(x.shape), x.device, x.dtype)
        if key not in self._placed:
            self._placed[key] = self._place(x)
        noise, image, mask = self._placed[key]
        known = torch.add(image * float(self.schedule.alpha(t)), noise, alpha=float(self.schedule.sigma(t)))
        # lerp is exact at both ends: the kept region is ``known``, the generated one x, bit for bit.
        return torch.lerp(known, x, mask.expand_as(x))

    def _place(self, x: torch.Tensor) -> tuple:
        """(noise, image, mask) for the state x, on its device and in its dtype: laid out as rows of x's shape,
        following ``gather``'s order, each row repeated for states of m x N rows (beam children, value draws)."""
        rows = (self.noise.numel() // math.prod(x.shape[1:]),) + tuple(x.shape[1:])
        noise = self.noise.reshape(rows)
        placed = []
        for name, v in (("image", self.image), ("mask", self.mask)):
            if not _broadcasts(v.shape, rows):
                if not _broadcasts(v.shape, self.noise.shape):
                    raise ValueError(f"Inpaint: {name} {tuple(v.shape)} broadcasts neither to the state's rows "
                                     f"{rows} nor to the noise {tuple(self.noise.shape)}")
                v = v.expand(self.noise.shape).reshape(rows)   # e.g. one image per group of [B, K, ...] noise
            placed.append(v)
        image, mask = placed
        per_row = [v.dim() == len(rows) and v.shape[0] == rows[0] > 1 for v in (noise, image, mask)]
        out = []
        for v, row_wise in zip((noise, image, mask), per_row):
            if row_wise:
                if self._order is not None:
                    v = v[self._order.to(v.device)]
                v = v.repeat_interleave(x.shape[0] // rows[0], dim=0)
            out.append(v.to(device=x.device, dtype=x.dtype))
        return tuple(out)


def _stamp(t: torch.Tensor) -> tuple | None:
    """Where ``t``'s data lives and how often it was written in place; None for an inference tensor (no count)."""
    return None if t.is_inference() else (t.data_ptr(), t._version)


def _broadcasts(shape, to) -> bool:
    """``shape`` broadcasts to ``to`` without growing it: every trailing size is 1 or ``to``'s. (Plain Python:
    torch.broadcast_shapes's first call in a process imports sympy, about 0.4 s.)"""
    return len(shape) <= len(to) and all(s in (1, n) for s, n in zip(reversed(shape), reversed(to)))
