"""Whole transitions, model calls included, as compiled code or replayed CUDA graphs.

A transition is a pure function of (state, noise, plan rows): ``transitions.execute``. Every transition of a
grid has the same stage kinds and the same tensor shapes, only the plan rows differ, so ONE compiled function
or ONE captured graph serves them all: the rows are copied into static buffers before each replay (device to
device, no host synchronisation). Noise is drawn with the caller's generator outside the graph, so captured
runs consume the generator exactly like eager runs and reproduce them from a seed.
"""
from __future__ import annotations

import types

import torch

from . import ops
from .transitions import execute


class _PlanView:
    """The fields ``execute`` reads, over caller-owned tensors (a plain class, so torch.compile traces it)."""

    def __init__(self, kinds, coefs, times, first_denoised, init):
        self.kinds, self.coefs, self.times = kinds, coefs, times
        self.first_denoised, self.init, self.host_times = first_denoised, init, None


# dynamo keeps compiled code, and its recompile limit (8 by default), per code object. Sharing one code object
# among all transitions would let a serving loop's ninth batch shape fall back to eager silently; one per
# call site would recompile for every new Sampler. So: code objects per transition signature, a list of them,
# newest last: models that trace differently (a constant in the network, another architecture) share one
# until it is full, then the next model starts a new one (see ``run``).
_CODE_BY_SIGNATURE: dict = {}


def _full(code) -> bool:
    """Whether dynamo keeps as many compiled variants of ``code`` as its recompile limit allows."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as entries
    except ImportError:   # a torch without it: never full, so no new code object (only the count is fixed)
        return False
    return len(entries(code)) >= torch._dynamo.config.recompile_limit


def compile_transition(model, kinds: tuple[str, ...], signature=(), **compile_kwargs):
    """torch.compile of one transition (model calls and fused steps) for plans with these stage kinds.

    ``compile_kwargs`` go to torch.compile (mode, backend, fullgraph, ...); shapes are static.
    ``signature``: hashable description of the inputs (shapes, dtype, device); transitions with the same
    signature, stage kinds and compile arguments share compiled code across Samplers (and models: dynamo's
    guards tell them apart).

    Returns:
        fn(plan, x, noise, denoised, first_output) -> (x_next, finite), with ``plan`` any DevicePlan of these
        kinds and ``denoised`` / ``first_output`` as in ``execute``. It leaves ``model.calls`` as it was (the
        caller counts the transition's calls) and runs without autograd unless the ops are the reference
        ones, the only differentiable ones.
    """
    def transition(x, noise, coefs, times, first_denoised, init, denoised, first_output):
        return execute(model, _PlanView(kinds, coefs, times, first_denoised, init), x, noise, denoised=denoised,
                       first_output=first_output)

    def compiled_on(code):
        fn = types.FunctionType(code, transition.__globals__, transition.__name__, transition.__defaults__,
                                transition.__closure__)
        return code, torch.compile(fn, **{"dynamic": False, **compile_kwargs})

    # Imported here, not with the module: ``import glass_fast`` does not load the compiler stack.
    from torch._dynamo.exc import FailOnRecompileLimitHit

    key = (tuple(kinds), signature, repr(sorted(compile_kwargs.items())))
    codes = _CODE_BY_SIGNATURE.setdefault(key, [transition.__code__.replace()])
    current = [compiled_on(codes[-1])]

    def newer_code() -> bool:
        """Move to the newest code object (starting one if this one is full); False if already there."""
        code = current[0][0]
        if code is codes[-1] and _full(code):
            codes.append(transition.__code__.replace())
        if code is codes[-1]:
            return False
        current[0] = compiled_on(codes[-1])
        return True

    def call(args):
        try:
            return current[0][1](*args)
        except FailOnRecompileLimitHit:
            # fullgraph=True: raised, before any of the transition ran, where dynamo would otherwise run it
            # eagerly (see ``run``). A full code object is this sharing's limit, not the caller's: compile anew.
            if not newer_code():
                raise
            return current[0][1](*args)

    def run(plan, x, noise, denoised, first_output):
        args = (x, noise, plan.coefs, plan.times, plan.first_denoised, plan.init, denoised, first_output)
        calls, version = model.calls, None if x.is_inference() else x._version
        if torch.is_grad_enabled() and ops.resolve_backend(x.device.type) != "reference":
            # Only the reference ops have derivatives: autograd traced through the others fails to compile
            # (eagerly they run forward, and only a backward raises), so the transition runs without it.
            with torch.no_grad():
                x_next, finite = call(args)
        else:
            x_next, finite = call(args)
        if model.calls != calls:
            # A model call ran outside compiled code (only there does FlowModel count itself): dynamo ran part
            # or all of the transition eagerly, as it does, with a logged warning only, for a code object
            # holding recompile_limit variants (this one, or a frame of the network's after a graph break).
            # The caller counts every call of the transition: undo the model's count.
            model.calls = calls
            newer_code()   # compiled again from the next call on, where this code object was full
        if version is not None and x._version != version:
            # What FlowModel checks eagerly on the state's version counter, which traced code cannot read: a
            # network editing its input in place, here the caller's state (a converted copy is the network's).
            raise RuntimeError("the network modified its input x in place; it is the sampler's state, which that "
                               "corrupts: compute out of place (or work on x.clone() inside the network)")
        return x_next, finite

    return run


class GraphedTransition:
    """One transition captured as a CUDA graph over static buffers, replayed for any plan of the same shape.

    Args:
        model: the FlowModel (its network is captured too: it must be capturable, i.e. no host syncs).
        plan: a DevicePlan giving the stage kinds and buffer shapes.
        x: [B, ...] example state; noise: [draws, B, ...] example noise.
        handed: None, or what replaces the first stage's model call in the captured variant: "denoised"
            (D_t(x), in x's dtype) or "output" (the call's raw output, in the network's dtype).
        pool: optional graph memory pool shared between graphs.
    """

    def __init__(self, model, plan, x: torch.Tensor, noise: torch.Tensor, handed: str | None, pool=None,
                 warmup: int = 2):
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors, got a state on {x.device}")
        # On x's device (its side stream and graph: the current device may be another GPU), and without
        # autograd: a captured graph replays forward only, and recorded history would keep its activations.
        with torch.cuda.device(x.device), torch.no_grad():
            self._capture(model, plan, x, noise, handed, pool, warmup)

    def _capture(self, model, plan, x, noise, handed, pool, warmup):
        self.kinds = plan.kinds
        self.buf = _PlanView(plan.kinds, plan.coefs.clone(), plan.times.clone(), plan.first_denoised.clone(),
                              None if plan.init is None else plan.init.clone())
        self.x, self.noise = x.clone(), noise.clone()
        self.denoised = x.clone() if handed == "denoised" else None
        self.first_output = x.to(model.input_dtype(x), copy=True) if handed == "output" else None
        calls = model.calls
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy inits, autotuning, allocator
            for _ in range(warmup):
                execute(model, self.buf, self.x, self.noise, denoised=self.denoised, first_output=self.first_output)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out, self.finite = execute(model, self.buf, self.x, self.noise, denoised=self.denoised,
                                            first_output=self.first_output)
        model.calls = calls  # warm-up and capture are not sampling calls

    def __call__(self, plan, x, noise, denoised, first_output):
        self.buf.coefs.copy_(plan.coefs)
        self.buf.times.copy_(plan.times)
        self.buf.first_denoised.copy_(plan.first_denoised)
        if plan.init is not None:
            self.buf.init.copy_(plan.init)
        self.x.copy_(x)
        self.noise.copy_(noise)
        if self.denoised is not None:
            self.denoised.copy_(denoised)
        if self.first_output is not None:
            self.first_output.copy_(first_output)
        self.graph.replay()
        return self.out.clone(), self.finite.clone()
