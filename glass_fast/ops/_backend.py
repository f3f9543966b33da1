"""The backend switch: which implementation runs an op on a given device.

One environment variable picks it, ``GLASS_FAST_BACKEND``:

==========  ==================================================================================
auto        (default) CUDA tensors: cuda extension, else Triton, else reference.
            CPU tensors: cpp extension, else reference. Falling back is logged once.
cuda        the CUDA kernels of ``glass_fast._C`` (CUDA tensors only)
triton      the Triton kernels in ``glass_fast.kernels`` (CUDA tensors; CPU tensors only under
            ``TRITON_INTERPRET=1``, which the tests use)
cpp         the C++ CPU kernels of ``glass_fast._C`` (CPU tensors only)
reference   plain PyTorch (``glass_fast.ops.reference``), any device
==========  ==================================================================================

An explicitly requested backend that cannot run raises ``BackendUnavailableError`` saying why.
``set_backend`` / ``use_backend`` override the variable (tests, notebooks). The override is one per
process, not per thread: a ``use_backend`` block in one thread changes the backend of the others too.

The choice is made per call from the device *type* only, never from tensor values, and under
``torch.compile`` it is evaluated once while tracing (a compiled function keeps the backend it was
traced with).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os

import torch

ENV_VAR = "GLASS_FAST_BACKEND"
BACKENDS = ("auto", "cuda", "triton", "cpp", "reference")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}

logger = logging.getLogger("glass_fast.ops")

_override: str | None = None
_ext: tuple[bool, str] | None = None
_triton: tuple[bool, str] | None = None
_logged: set = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, not installed, wrong device)."""


def requested_backend(override: str | None = None) -> str:
    """The backend asked for: ``set_backend``'s override, else ``GLASS_FAST_BACKEND``, else "auto"."""
    override = _override if override is None else override
    name = override if override is not None else os.environ.get(ENV_VAR, "")
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Override ``GLASS_FAST_BACKEND`` for this process; ``None`` returns to the variable.

    Args:
        name: one of auto | cuda | triton | cpp | reference, or None.
    """
    global _override
    if name is not None and not isinstance(name, str):
        raise TypeError(f"backend={name!r} is not a backend name; allowed: None or one of "
                        f"{', '.join(BACKENDS)}")
    if name is not None and name.strip().lower() not in BACKENDS:
        raise ValueError(f"backend={name!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    _override = None if name is None else name.strip().lower()


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager form of ``set_backend``, e.g. ``with use_backend("cpp"): ...``."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def _extension() -> tuple[bool, str]:
    """(loaded, reason-if-not) for glass_fast._C; loading it registers torch.ops.glass_fast.*."""
    global _ext
    if _ext is None:
        try:
            importlib.import_module("glass_fast._C")
        except ImportError as exc:
            _ext = (False, f"the compiled extension glass_fast._C is not importable ({exc}); build it "
                           "with `pip install --no-build-isolation -e .` without GLASS_FAST_NO_EXT=1")
        else:
            from . import _library
            _library.register_extension_fakes()
            _ext = (True, "")
    return _ext


def _triton_status() -> tuple[bool, str]:
    global _triton
    if _triton is None:
        try:
            importlib.import_module("triton")
        except ImportError as exc:
            _triton = (False, f"triton is not installed ({exc})")
        else:
            _triton = (True, "")
    return _triton


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device_type`` ("cpu", "cuda"), or None if it can."""
    if backend == "reference":
        return None
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            return why
        if device_type == "cuda":
            return None
        if device_type == "cpu" and _interpret():
            return None
        return (f"the triton backend runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 "
                f"set before triton kernels are first used); got device type {device_type!r}")
    want = "cpu" if backend == "cpp" else "cuda"
    if device_type != want:
        return f"the {backend} backend runs on {want} tensors only; got device type {device_type!r}"
    ok, why = _extension()
    if not ok:
        return why
    if backend == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "glass_fast::fused_step", "CUDA"):
        return ("glass_fast._C was built without CUDA kernels (torch.version.cuda was None or CUDA_HOME "
                "was missing at build time); rebuild on a CUDA machine, e.g. benchmarks/build_cuda.sh")
    return None


def resolve_backend(device_type: str) -> str:
    """The backend that runs an op on tensors of ``device_type`` ("cpu", "cuda", ...).

    Raises:
        BackendUnavailableError: an explicitly requested backend cannot run on this device type.
    """
    # Reading the module global here lets torch.compile guard on it: set_backend / use_backend
    # retrace a compiled function. The environment variable is read once per trace.
    return _resolve(_override, device_type)


def _resolve(override: str | None, device_type: str) -> str:
    name = requested_backend(override)
    if name != "auto":
        why = unavailable_reason(name, device_type)
        if why is not None:
            source = ENV_VAR if override is None else "set_backend/use_backend"
            raise BackendUnavailableError(f"backend {name!r} (from {source}) cannot run: {why}")
        return name
    prefs = _PREFERENCE.get(device_type, ("reference",))
    for cand in prefs:
        why = unavailable_reason(cand, device_type)
        if why is None:
            if cand != prefs[0] and (device_type, cand) not in _logged:
                _logged.add((device_type, cand))
                logger.warning("glass_fast.ops: backend %r unavailable for %s tensors (%s); using %r",
                               prefs[0], device_type, unavailable_reason(prefs[0], device_type), cand)
            return cand
    return "reference"


def available_backends(device_type: str | None = None) -> list[str]:
    """Backends that can run now.

    Args:
        device_type: "cpu" or "cuda" to ask about one device type; None lists every backend that runs
            on some device here (cuda needs a visible GPU).
    Returns:
        names in the order of ``BACKENDS`` (cuda, triton, cpp, reference; not auto's preference, which
        on CPU tensors is cpp, then reference), "reference" always included.
    """
    if device_type is not None:
        return [b for b in BACKENDS[1:] if unavailable_reason(b, device_type) is None]
    types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS[1:] if any(unavailable_reason(b, t) is None for t in types)]


# torch.compile runs _resolve at trace time and bakes its result into the graph (what
# torch.compiler.assume_constant_result does, by setting this attribute). Setting it directly keeps
# `import glass_fast` from importing the compiler stack (and with it triton) at import time.
_resolve._dynamo_marked_constant = True
