"""Generation from noise: a time grid and one transition per interval, planned up front.

``Sampler`` is the reusable core: it plans every transition of a grid once (float64, host), moves the rows to
the device once, and steps a state through transition k. ``sample``, FK steering and capture all build on it.
"""
from __future__ import annotations

import numbers

import torch

from .capture import GraphedTransition, compile_transition
from .model import FlowModel
from .ops._checks import FLOAT_DTYPES
from .plan import check_calls, check_rho_form, check_sigmabar0, check_solver, glass_plan, ode_plan, resolve_rho, sde_plan, steps_per_call
from .transitions import (DevicePlan, FiniteGuard, check_denoised, check_first_output, check_rows, check_state,
                          draw_noise, execute, stage_labels, state_overflow)

METHODS = ("glass", "ode", "sde", "plugin")


def time_grid(transitions: int) -> torch.Tensor:
    """Uniform grid 0 = t_0 < ... < t_K = 1 in float64."""
    return torch.linspace(0.0, 1.0, transitions + 1, dtype=torch.float64)


def check_grid(grid) -> torch.Tensor:
    """A transition grid as float64 on the host: 1-D, at least two times, finite, strictly increasing, in
    [0, 1] (ValueError naming what is wrong). It may start after 0 (continuing from a partly noised state,
    e.g. image-to-image) and end before 1 (a partial run)."""
    try:
        g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"grid must be a 1-D sequence or Tensor of times, got {type(grid).__name__}") from None
    if g.dim() != 1 or g.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least two times (one transition), got shape {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()) or not bool(torch.all(g[1:] > g[:-1])):
        raise ValueError(f"grid must hold finite, strictly increasing times, got {g.tolist()}")
    if float(g[0]) < 0.0 or float(g[-1]) > 1.0:
        raise ValueError(f"grid times must lie in [0, 1] (0 noise, 1 data), got {float(g[0])} .. {float(g[-1])}")
    return g


DEFAULT_TRANSITIONS = 5


def transition_grid(transitions: int | None, grid) -> torch.Tensor:
    """The transition grid, float64: ``grid`` (checked, see ``check_grid``) or the uniform grid of
    ``transitions`` intervals (DEFAULT_TRANSITIONS when neither is given). Given both, they must agree:
    a grid sets the number of transitions, and a different ``transitions`` would otherwise be ignored."""
    if grid is None:
        return time_grid(DEFAULT_TRANSITIONS if transitions is None else check_calls(transitions, "transitions"))
    grid = check_grid(grid)
    if transitions is not None and transitions != len(grid) - 1:
        raise ValueError(f"transitions={transitions!r} disagrees with grid, which has {len(grid) - 1} transitions: "
                         f"pass grid alone (it sets the number of transitions)")
    return grid


def check_sampler_options(method: str, transitions: int | None, inner_steps: int, solver: str, compile,
                          cuda_graph, rho=None, sigmabar0=1.0) -> None:
    """Validate the options every Sampler takes (raises ValueError naming the argument), before any planning.
    ``transitions`` None: the grid's count (or DEFAULT_TRANSITIONS)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if transitions is not None:
        check_calls(transitions, "transitions")
    check_calls(inner_steps, "inner_steps")
    check_solver(solver)
    if method in ("glass", "ode"):
        steps_per_call(inner_steps, solver)
    if method in ("glass", "plugin") and rho is not None:
        check_rho_form(rho)
    # Options of other kernels are refused rather than silently ignored.
    if method in ("ode", "sde") and rho is not None:
        raise ValueError(f"rho={rho!r} is the GLASS / plug-in kernels' correlation; method={method!r} takes none "
                         f"(leave rho unset)")
    check_sigmabar0(sigmabar0)
    if method in ("ode", "sde") and sigmabar0 != 1.0:
        raise ValueError(f"sigmabar0={sigmabar0!r} is the GLASS inner flow's start; method={method!r} takes "
                         f"none (leave it at 1.0)")
    if method in ("sde", "plugin") and solver != "euler":
        raise ValueError(f"solver={solver!r}: method={method!r} steps with Euler(-Maruyama) only; the solver "
                         f"applies to 'glass' and 'ode'")
    if compile not in (None, False, True) and not isinstance(compile, (str, dict)):
        raise ValueError(f"compile must be None, a bool, a torch.compile mode string or a dict of torch.compile "
                         f"arguments, got {compile!r}")
    if compile and cuda_graph:
        raise ValueError("choose one of compile= and cuda_graph= (compile='reduce-overhead' also uses CUDA graphs)")
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")


def check_eager_guidance(guidance, compile, cuda_graph) -> None:
    """Guidance runs eagerly: refused with compile= or cuda_graph= (ValueError), before any model call."""
    if guidance is not None and (compile or cuda_graph):
        raise ValueError("guidance is not supported with compile= or cuda_graph=: run it eagerly")


def default_rho(method: str):
    """rho when none is given: 0.4 for GLASS (the paper's setting), rho_DDPM for the one-step plug-in kernel,
    which with a constant rho does not sample the data however fine the grid."""
    return "ddpm" if method == "plugin" else 0.4


def check_hooks(guidance, callback, project=None) -> None:
    """guidance, callback and project are None or callables (TypeError naming the argument)."""
    if guidance is not None and not callable(guidance):
        raise TypeError(f"guidance must be None or callable(model, y, t, t_host, out) -> out (e.g. RewardGuidance), "
                        f"got {type(guidance).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or callable(k, t, x, x0), got {type(callback).__name__}")
    if project is not None and not callable(project):
        raise TypeError(f"project must be None or callable(k, t, x) -> x, got {type(project).__name__}")


def projected(project, k: int, t: float, x: torch.Tensor, guard: FiniteGuard | None) -> torch.Tensor:
    """``project(k, t, x)``, the state a transition reached at t = grid[k] as the caller's hook maps it
    (e.g. inpainting's latent blending), checked to keep x's shape, dtype and device. A NaN or Inf it brings
    in is flagged on ``guard`` as the hook's (no host read here)."""
    y = project(k, t, x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
        got = (f"{tuple(y.shape)} {y.dtype} on {y.device}" if isinstance(y, torch.Tensor) else type(y).__name__)
        raise ValueError(f"project must return the state's shape, dtype and device ({tuple(x.shape)} {x.dtype} on "
                         f"{x.device}), got {got} at grid index {k} (t={t:.4f})")
    if guard is not None:
        guard.note(y, f"project returned NaN or Inf at grid index {k} (t={t:.4f})")
    return y


def follow(project, rows: torch.Tensor):
    """The ``project`` hook for states that descend from ``rows`` (row i of the new states is a copy of row
    ``rows[i]``: resampling, beam selection). A hook holding per-row data (``Inpaint``: each row's noise path)
    has a ``gather(rows)`` method returning the hook re-bound to the new rows; any other hook is kept."""
    gather = getattr(project, "gather", None)
    return gather(rows) if callable(gather) else project


class _InTurn:
    """project hooks applied one after the other, re-bound together by ``follow``."""

    def __init__(self, hooks: list):
        self.hooks = hooks

    def __call__(self, k: int, t: float, x: torch.Tensor) -> torch.Tensor:
        for hook in self.hooks:
            x = hook(k, t, x)
        return x

    def gather(self, rows: torch.Tensor) -> "_InTurn":
        return _InTurn([follow(hook, rows) for hook in self.hooks])


def in_turn(*hooks):
    """One project hook applying ``hooks`` (None ones skipped) in order; None if there are none."""
    hooks = [hook for hook in hooks if hook is not None]
    return None if not hooks else hooks[0] if len(hooks) == 1 else _InTurn(hooks)


def _versions(*tensors: torch.Tensor) -> tuple:
    """The tensors' version counters (bumped by every in-place edit; no host sync), to catch a hook editing
    what it was only shown. Inference tensors keep none (None: not checked)."""
    return tuple(None if t.is_inference() else t._version for t in tensors)


class Sampler:
    """Every transition of one sampling run, planned once.

    Args:
        model: the FlowModel.
        method: "glass" | "ode" | "sde" | "plugin" (one-step GLASS kernel).
        transitions: number of intervals of the uniform grid on [0, 1] (default 5; with ``grid``, leave it
            unset or give the grid's count).
        inner_steps: model calls per transition (the plug-in kernel always makes one).
        rho, solver, sigmabar0: GLASS settings (solver also applies to "ode"). rho None: 0.4 for "glass",
            "ddpm" for "plugin" (the one-step kernel samples the data only with rho_DDPM).
        device, dtype: where the state lives and its dtype (float32, float64, float16 or bfloat16). ``run`` and
            ``step`` also take the other dtypes planned alike: any but float64 for a non-float64 ``dtype`` (the
            coefficients are float64 for float64 states, float32 for the rest).
        grid: optional Tensor[K+1] (or sequence) of increasing times in [0, 1], replacing the uniform grid; a
            grid starting after 0 continues from a partly noised state (see ``check_grid``).
        compile: None / False (eager), True, a torch.compile mode ("reduce-overhead",
            "max-autotune-no-cudagraphs", ...) or a dict of torch.compile arguments: each transition, model
            calls included, runs compiled.
        cuda_graph: capture one whole transition as a CUDA graph (per state shape) and replay it for every
            transition. The network must be capturable (no host synchronisation inside).
        max_batch: split every model call into chunks of at most this many rows (None: no split).

    A Sampler is reusable: keep it to serve many batches of the same shape (graphs and compiled code are built
    on first use and kept).
    """

    def __init__(self, model: FlowModel, *, method: str = "glass", transitions: int | None = None,
                 inner_steps: int = 10,
                 rho=None, solver: str = "euler", sigmabar0: float = 1.0, device=None, dtype=torch.float32,
                 grid: torch.Tensor | None = None, compile=None, cuda_graph: bool = False,
                 max_batch: int | None = None):
        check_sampler_options(method, transitions, inner_steps, solver, compile, cuda_graph, rho, sigmabar0)
        rho = default_rho(method) if rho is None else rho
        inner_steps = int(inner_steps)   # NumPy integers pass the checks above
        if not isinstance(model, FlowModel):
            raise TypeError(f"model must be a glass_fast.FlowModel, got {type(model).__name__}")
        # Float8 is floating too, but no sampler op takes it (check_state refuses such a state at run time).
        if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be a floating torch.dtype (the state's): float32, float64, float16 or "
                             f"bfloat16, got {dtype!r}")
        self.model = model if max_batch is None else model.with_max_batch(max_batch)
        self.method = method
        self.compiled = bool(compile)
        self.compile_kwargs = ({"mode": compile} if isinstance(compile, str) else
                               dict(compile) if isinstance(compile, dict) else {})
        self.cuda_graph = bool(cuda_graph)
        self._runners: dict = {}
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        model = self.model
        self.grid = transition_grid(transitions, grid)
        self.plans = []
        for k in range(len(self.grid) - 1):
            t, tn = self.grid[k], self.grid[k + 1]
            if method in ("glass", "plugin"):
                calls = 1 if method == "plugin" else inner_steps
                sol = "euler" if method == "plugin" else solver
                plan = glass_plan(model, t, tn, resolve_rho(rho, model.schedule, t, tn), calls, sol, sigmabar0)
            elif method == "ode":
                plan = ode_plan(model, t, tn, inner_steps, solver)
            else:
                plan = sde_plan(model, t, tn, inner_steps)
            self.plans.append(DevicePlan(plan, self.device, dtype))
        self.intervals = [f"transition {k} (t={float(self.grid[k]):.4f} -> {float(self.grid[k + 1]):.4f})"
                          for k in range(len(self.plans))]
        self.labels = [stage_labels(p, f"{span}, ") for p, span in zip(self.plans, self.intervals)]

    @property
    def transitions(self) -> int:
        return len(self.plans)

    @property
    def calls(self) -> int:
        """Model calls of a full run (per state)."""
        return sum(len(p.kinds) for p in self.plans)

    def _runner(self, k: int, x: torch.Tensor, noise: torch.Tensor, handed: str | None):
        """The compiled or captured transition for plan k's shape (built on first use); ``handed``: what
        replaces its first model call (see ``GraphedTransition``)."""
        plan = self.plans[k]
        # The rows' shape too: a grid may mix shared rows [S, 6] and per-sample ones [S, B, 6] (a rho callable
        # returning a float for some transitions), which a captured graph's static buffers cannot both take.
        key = (plan.kinds, tuple(plan.coefs.shape), plan.init is None, handed, tuple(x.shape), x.dtype, x.device)
        if key not in self._runners:
            if self.cuda_graph:
                pool = next(iter(self._runners.values())).graph.pool() if self._runners else None
                self._runners[key] = GraphedTransition(self.model, plan, x, noise, handed, pool=pool)
            else:
                self._runners[key] = compile_transition(self.model, plan.kinds, signature=key, **self.compile_kwargs)
        return self._runners[key]

    def _check_state(self, x: torch.Tensor, generator, guidance, project) -> None:
        """x lives where the coefficients were planned (device, and float64 or not: the coefficients are
        float64 for float64 states, float32 for every other dtype); the hooks and the generator are usable,
        and guidance runs eagerly."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a floating Tensor[B, ...], got {type(x).__name__}")
        # The rows' device, where "cuda" has become an index: the stage loop runs its ops unchecked.
        planned = self.plans[0].coefs.device
        if x.device != planned or (x.dtype == torch.float64) != (self.dtype == torch.float64):
            raise ValueError(f"x is {x.dtype} on {x.device} but this Sampler was planned for {self.dtype} on "
                             f"{planned}: build it with device=x.device, dtype=x.dtype")
        check_state(self.model, x, generator)
        check_hooks(guidance, None, project)
        check_eager_guidance(guidance, self.compiled, self.cuda_graph)

    def predict(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transition k's first model call at the states x [N, ...] (at grid[k]), made ahead of the transition.

        Returns:
            (output, x0): the network's raw output, and the x0-prediction D_{grid[k]}(x) in x's dtype. Hand
            the output to ``step(k, x, first_output=output)``: the transition then runs exactly as if it had
            made the call (guidance included), so reading x0 on the way (a reward, a preview) costs no model
            call and changes nothing.
        """
        self._check_index(k)
        self._check_state(x, None, None, None)
        check_rows(self.plans[k], x)
        return self._predict(k, x)

    def _predict(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plans[k]
        out = self.model(x, plan.times[0])
        return out, self.model.denoised_from(x, plan.host_times[0], out)

    def _check_index(self, k) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k < self.transitions:
            raise ValueError(f"k must be a transition index in [0, {self.transitions}), got {k!r}")

    def step(self, k: int, x: torch.Tensor, *, generator=None, denoised=None, guard=None, guidance=None,
             project=None, first_output=None):
        """Transition k: x at grid[k] -> a state at grid[k+1].

        Args:
            x: [N, ...] states at grid[k]. denoised: D_{grid[k]}(x) if already known (saves one model call);
                with ``guidance``, the guided one the first stage would use: it replaces that stage's model
                call and its guidance.
            first_output: the raw output of the first model call from ``predict(k, x)`` (saves that call; the
                stage runs on it as on its own call, guidance included). At most one of denoised and
                first_output.
            guard: a FiniteGuard collecting non-finite model outputs, a float16 state that overflowed and a
                ``project`` result holding NaN or Inf (checked by the caller after the loop). Without one,
                none of these is checked.
            guidance: reward guidance hook (eager only).
            project: optional fn(k + 1, grid[k+1], x_next) -> x_next applied to the state reached (see ``run``).
        """
        self._check_index(k)
        self._check_state(x, generator, guidance, project)
        check_denoised(denoised, x)
        check_first_output(first_output, denoised, x, self.model)
        check_rows(self.plans[k], x)
        return self._step(k, x, generator, denoised, guard, guidance, project, first_output)

    def _step(self, k: int, x: torch.Tensor, generator, denoised, guard, guidance, project, first_output=None):
        """``step`` on arguments already checked (``_check_state``, ``check_denoised``, ``check_rows``);
        ``first_output``: see ``execute``."""
        plan = self.plans[k]
        noise = draw_noise(plan, x, generator)
        if self.cuda_graph or self.compiled:
            handed = "denoised" if denoised is not None else "output" if first_output is not None else None
            runner = self._runner(k, x, noise, handed)
            x_next, finite = runner(plan, x, noise, denoised, first_output)
            # Replayed graphs and compiled code do not run the model's counter: one call per stage,
            # less the first when it was handed in.
            self.model.calls += len(plan.kinds) - (handed is not None)
            if self.compiled:
                # Compiled code may replay CUDA graphs ("reduce-overhead") whose outputs the next call
                # overwrites; the state outlives the call, so it is copied out.
                x_next, finite = x_next.clone(), finite.clone()
        else:
            x_next, finite = execute(self.model, plan, x, noise, denoised=denoised, guidance=guidance,
                                     first_output=first_output)
        if guard is not None:
            labels = self.labels[k] if guidance is None else [
                f"{label} (its output after guidance: the guidance's reward gradient may be the cause)"
                for label in self.labels[k]]
            guard.extend(finite, labels)
            # Finite model outputs can still leave a non-finite state: a float16 state is carried in float32
            # and rounded back once, which overflows beyond 65504. Flagged after the model's flags, so a NaN
            # the model returned is named first. States with float32's range (bfloat16 too) skip the extra
            # pass, which shows in small-network overhead: the outputs would have to overflow float32 first.
            if x_next.dtype == torch.float16:
                guard.note(x_next, state_overflow(self.intervals[k], x_next))
        if project is not None:
            x_next = projected(project, k + 1, float(self.grid[k + 1]), x_next, guard)
        return x_next

    @torch.no_grad()
    def run(self, x: torch.Tensor, *, generator=None, guidance=None, callback=None, project=None) -> torch.Tensor:
        """All transitions from ``x`` at grid[0]; returns the state at grid[-1].

        Runs without autograd, as diffusers' pipelines do: a network whose parameters require gradients would
        otherwise keep every call's activations alive until the run ends (reward guidance takes its own gradients).

        Args:
            generator: randomness of the stochastic transitions. guidance: reward guidance hook (eager only).
            callback: optional fn(k, t, x, x0) called at every grid time t = grid[k] before transition k, with
                the state x and its x0-prediction x0 = D_t(x). That prediction comes from the transition's first
                model call, handed in, so watching costs no model calls. x is the run's own state: copy it to keep
                it and do not edit it in place (RuntimeError; map the state with ``project``); x0 is the
                callback's to keep or edit.
            project: optional fn(k, t, x) -> x applied after every transition to the state x it reached at
                t = grid[k] (k >= 1; not to the start state), returning the state to go on from, of the same
                shape, dtype and device: a constraint such as inpainting's blending of known content, noised to
                t, into the state. It runs eagerly between transitions (also with compile= or cuda_graph=).
        """
        self._check_state(x, generator, guidance, project)
        check_hooks(None, callback)
        for plan in self.plans:
            check_rows(plan, x)
        guard = FiniteGuard(x.device)
        guard.check_input(x, "the initial state (noise)")
        for k in range(self.transitions):
            out = None
            if callback is not None:
                # Handed to the transition as the raw output, the prediction leaves the samples unchanged bit
                # for bit (handed in as D_t(x) rounded to a half-precision state, it would not).
                out, d = self._predict(k, x)
                guard.note(d, f"the x0-prediction for callback, the model's output at {self.labels[k][0]} "
                              f"converted to D_t(x) in the state's dtype {x.dtype}, holds NaN or Inf")
                # x0 is a conversion of the output handed on, not the output itself: only x needs guarding.
                before = _versions(x)
                callback(k, float(self.grid[k]), x, d)
                if _versions(x) != before:
                    raise RuntimeError(f"callback modified x in place at grid index {k} "
                                       f"(t={float(self.grid[k]):.4f}): it is the state the run goes on from, so "
                                       f"the run would silently change; watch a copy (x.clone()), or map the "
                                       f"state with project=")
            x = self._step(k, x, generator, None, guard, guidance, project, first_output=out)
        guard.raise_if_bad()
        return x


def sample(model: FlowModel, noise: torch.Tensor, *, method: str = "glass", transitions: int | None = None,
           inner_steps: int = 10, rho=None, solver: str = "euler", generator: torch.Generator | None = None,
           sigmabar0: float = 1.0, guidance=None, compile=None, cuda_graph: bool = False,
           max_batch: int | None = None, callback=None, grid=None, project=None) -> torch.Tensor:
    """Generate data from noise with ``transitions`` transitions of ``inner_steps`` model calls each.

    Args:
        model: the FlowModel.
        noise: [B, ...] draws from N(0, I) (the state at t = 0).
        method: "glass" | "ode" | "sde" | "plugin".
        transitions, inner_steps: grid size and model calls per transition (transitions * inner_steps calls).
        rho, solver, sigmabar0: see ``glass_transition``; solver also selects the ODE solver. rho None: 0.4
            ("glass"), "ddpm" ("plugin").
        generator: randomness for GLASS / SDE / plug-in transitions.
        guidance: optional reward guidance (``glass_fast.RewardGuidance``).
        compile, cuda_graph, max_batch: see ``Sampler``. To reuse compiled code or graphs across calls, keep a
            ``Sampler`` and call its ``run``.
        callback: optional fn(k, t, x, x0) at every grid time before transition k, with the state and its
            x0-prediction (no extra model calls; see ``Sampler.run``).
        grid: optional increasing times in [0, 1] replacing the uniform grid (see ``Sampler``); ``noise`` is
            then the state at grid[0] and the result the state at grid[-1].
        project: optional fn(k, t, x) -> x applied to the state after every transition (see ``Sampler.run``).
    Returns:
        [B, ...] samples at t = 1 (at grid[-1]).

    Example:
        >>> x = sample(model, torch.randn(64, 2), method="glass", transitions=5, inner_steps=10)
    """
    check_state(model, noise, generator, "noise")
    check_hooks(guidance, callback, project)
    check_eager_guidance(guidance, compile, cuda_graph)
    sampler = Sampler(model, method=method, transitions=transitions, inner_steps=inner_steps, rho=rho,
                      solver=solver, sigmabar0=sigmabar0, device=noise.device, dtype=noise.dtype, compile=compile,
                      cuda_graph=cuda_graph, max_batch=max_batch, grid=grid)
    return sampler.run(noise, generator=generator, guidance=guidance, callback=callback, project=project)
