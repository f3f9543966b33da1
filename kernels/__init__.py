"""Triton kernels of glass_fast (installed as ``glass_fast.kernels``); launched via ``glass_fast.ops``."""
