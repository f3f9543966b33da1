"""Per-element ops used between model calls. Reference implementations live in ``reference``."""
from .reference import fused_step, NUM_COEFS

__all__ = ["fused_step", "NUM_COEFS"]
