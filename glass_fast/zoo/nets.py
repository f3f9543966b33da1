"""Network architectures of the shipped digit models (plain PyTorch, small enough for a CPU).

- :class:`DigitsVelocityNet`: a residual MLP over the 64 pixels with a sinusoidal time embedding,
  predicting the flow-matching velocity u = z - eps of the linear path x_t = t z + (1 - t) eps.
- :class:`DigitClassifier`: a small conv net; its penultimate layer is the feature space of the
  Frechet distance.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of a time in [0, 1].

    Args:
        t: times [B].
        dim: even number of features.
        max_period: longest period, in units of t / 1000 (t is scaled by 1000 so unit-interval times
            spread over the frequencies like integer diffusion steps would).

    Returns:
        [B, dim] embedding (cos half, then sin half).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _ResBlock(nn.Module):
    def __init__(self, width: int, temb: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.time = nn.Linear(temb, width)
        self.fc2 = nn.Linear(width, width)
        # Start each block as the identity so the deep residual stack trains stably from step one.
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        a = F.silu(self.fc1(self.norm(h)) + self.time(temb))
        return h + self.fc2(a)


class DigitsVelocityNet(nn.Module):
    """Velocity field u(x, t) for 8x8 digits in [-1, 1] (t=0 noise, t=1 data).

    Args:
        width: hidden width of the residual MLP.
        depth: number of residual blocks.
        temb: width of the time embedding.
    """

    def __init__(self, width: int = 256, depth: int = 4, temb: int = 128):
        super().__init__()
        self.config = {"width": width, "depth": depth, "temb": temb}
        self.temb_dim = temb
        self.time_mlp = nn.Sequential(nn.Linear(temb, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(_ResBlock(width, temb) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Args: x [B, 1, 8, 8], t [B] (or a scalar). Returns: velocity [B, 1, 8, 8]."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        temb = self.time_mlp(sinusoidal_embedding(t, self.temb_dim).to(x.dtype))
        h = self.inp(x.reshape(b, 64))
        for block in self.blocks:
            h = block(h, temb)
        return self.out(F.silu(self.out_norm(h))).reshape(x.shape)


class DigitClassifier(nn.Module):
    """Ten-way classifier of 8x8 digits in [-1, 1]; inputs are clamped to that range first.

    Args:
        features: width of the penultimate layer (the Frechet feature space).
    """

    def __init__(self, features: int = 64):
        super().__init__()
        self.config = {"features": features}
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
        )
        self.fc = nn.Linear(64 * 16, features)
        self.head = nn.Linear(features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [N, 1, 8, 8]. Returns: penultimate features [N, features]."""
        # Generated samples can overshoot the data range slightly; the classifier only saw [-1, 1].
        h = self.conv(x.clamp(-1.0, 1.0))
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [N, 1, 8, 8]. Returns: logits [N, 10]."""
        return self.head(self.features(x))
