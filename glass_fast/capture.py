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

from .transitions import execute


class _PlanView:
    """The fields ``execute`` reads, over caller-owned tensors (a plain class, so torch.compile traces it)."""

    def __init__(self, kinds, coefs, times, first_denoised, init):
        self.kinds, self.coefs, self.times = kinds, coefs, times
        self.first_denoised, self.init, self.host_times = first_denoised, init, None


# dynamo keeps compiled code, and its recompile limit (8 by default), per code object. Sharing one code object
# among all transitions would let a serving loop's ninth batch shape fall back to eager silently; one per
# call site would recompile for every new Sampler. So: one code object per transition signature.
_CODE_BY_SIGNATURE: dict = {}


def compile_transition(model, kinds: tuple[str, ...], signature=(), **compile_kwargs):
    """torch.compile of one transition (model calls and fused steps) for plans with these stage kinds.

    ``compile_kwargs`` go to torch.compile (mode, backend, fullgraph, ...); shapes are static.
    ``signature``: hashable description of the inputs (shapes, dtype, device); transitions with the same
    signature, stage kinds and compile arguments share compiled code across Samplers.

    Returns:
        fn(plan, x, noise, denoised, first_output) -> (x_next, finite), with ``plan`` any DevicePlan of these
        kinds and ``denoised`` / ``first_output`` as in ``execute``.
    """
    def transition(x, noise, coefs, times, first_denoised, init, denoised, first_output):
        return execute(model, _PlanView(kinds, coefs, times, first_denoised, init), x, noise, denoised=denoised,
                       first_output=first_output)

    key = (tuple(kinds), signature, repr(sorted(compile_kwargs.items())))
    code = _CODE_BY_SIGNATURE.setdefault(key, transition.__code__.replace())
    transition = types.FunctionType(code, transition.__globals__, transition.__name__, transition.__defaults__,
                                    transition.__closure__)
    compiled = torch.compile(transition, **{"dynamic": False, **compile_kwargs})

    def run(plan, x, noise, denoised, first_output):
        return compiled(x, noise, plan.coefs, plan.times, plan.first_denoised, plan.init, denoised, first_output)

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
