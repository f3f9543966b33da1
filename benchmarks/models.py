"""Random-weight networks for overhead benchmarks: a small MLP and a DiT-style transformer."""
import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * 1000.0 * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLP(nn.Module):
    """fn(x [B, d], t [B]) -> [B, d]."""

    def __init__(self, dim: int = 64, hidden: int = 512, depth: int = 3):
        super().__init__()
        layers, width = [], dim + 32
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, timestep_embedding(t, 32).to(x.dtype)], dim=-1))


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.ada = nn.Linear(width, 6 * width)  # adaLN-style modulation from the time embedding

    def forward(self, h, c):
        s1, b1, g1, s2, b2, g2 = self.ada(c)[:, None].chunk(6, dim=-1)
        a = self.norm1(h) * (1 + s1) + b1
        b, n, w = a.shape
        q, k, v = self.qkv(a).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        h = h + g1 * self.proj(a)
        return h + g2 * self.mlp(self.norm2(h) * (1 + s2) + b2)


class DiT(nn.Module):
    """DiT-S/2-like: latents [B, 4, 32, 32] -> 2x2 patches -> 256 tokens of width 384, 12 blocks (~33M params)."""

    def __init__(self, channels: int = 4, size: int = 32, patch: int = 2, width: int = 384, depth: int = 12,
                 heads: int = 6):
        super().__init__()
        self.channels, self.size, self.patch = channels, size, patch
        self.embed = nn.Conv2d(channels, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, width) * 0.02)
        self.time = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(depth))
        self.out = nn.Linear(width, patch * patch * channels)

    def forward(self, x, t):
        b, p, g = x.shape[0], self.patch, self.size // self.patch
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        c = self.time(timestep_embedding(t, 256).to(x.dtype))
        for blk in self.blocks:
            h = blk(h, c)
        h = self.out(h).reshape(b, g, g, self.channels, p, p)
        return h.permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
