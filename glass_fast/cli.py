"""``glass-fast``: the digits demo, sampling, steering and the miniature paper tables from the command line.

    glass-fast                      # = glass-fast demo: steer toward a 3, compare with baselines, write PNGs
    glass-fast sample --method glass --n 64
    glass-fast steer --digit 7 --method fks-glass --particles 8
    glass-fast bench --table all --out bench_out

Bad arguments exit with status 2 and one line on stderr (no traceback); so do options that the chosen method or
table would ignore. A run that fails (non-finite values, out of memory) exits with status 1 and one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from .cli_args import (UsageError, digit, ks_samples, make_out, nonneg_float, positive, rho, seed,
                       threads)
from .plan import steps_per_call
from .sampling import default_rho

PROG = "glass-fast"
COMMANDS = ("demo", "sample", "steer", "bench")
DTYPES = ("float32", "float64", "bfloat16", "float16")
SAMPLE_METHODS = ("glass", "ode", "sde", "plugin")
STEER_METHODS = ("fks-glass", "fks-glass-guided", "fks-sde", "fks-ode", "bon-glass", "bon-sde", "bon-ode", "beam-glass")
EXAMPLES = """examples:
  glass-fast                                    same as glass-fast demo
  glass-fast demo --digit 7                     steer toward a 7 with every method, write demo_out/demo.png
  glass-fast sample --method glass --n 64       plain samples and quality metrics
  glass-fast steer --method fks-glass --digit 7 one steering method
  glass-fast bench --out bench_out              the README's digits tables (minutes)
  glass-fast COMMAND --help                     the options of one command"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage block; one line is enough
        raise UsageError(message)


# ------------------------------------------------------------------------------------------- arguments
def _common(p: argparse.ArgumentParser, *, out: str) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="sampler dtype (default: float32)")
    g.add_argument("--seed", type=seed, default=0, help="random seed (default: 0)")
    g.add_argument("--transitions", type=positive("--transitions"), default=5, help="transitions (default: 5)")
    g.add_argument("--inner-steps", type=positive("--inner-steps"), default=10,
                   help="model calls per transition (default: 10)")
    g.add_argument("--rho", type=rho, default=None,
                   help="GLASS correlation: a number in [-1, 1] or 'ddpm' (default: 0.4; 'ddpm' for --method plugin)")
    g.add_argument("--solver", default="euler", choices=("euler", "midpoint", "heun"),
                   help="GLASS inner solver / ODE solver (default: euler)")
    g.add_argument("--out", default=out, help=f"output folder (default: {out})")
    g.add_argument("--quiet", action="store_true", help="no progress bars, print only the results")
    g.add_argument("--threads", type=threads, default=1,
                   help="CPU threads for torch (default: 1; the digits model is so small that more threads "
                        "mostly add synchronisation)")


def _particles(p):
    p.add_argument("--particles", type=positive("--particles"), default=8,
                   help="particles per group for best-of-N / FK steering / beam search (default: 8)")


def _steer_options(p):
    _particles(p)
    p.add_argument("--digit", type=digit, default=3, help="target digit 0..9 (default: 3)")
    p.add_argument("--groups", type=positive("--groups"), default=16, help="outputs per method (default: 16)")
    p.add_argument("--lmbda", type=nonneg_float("--lmbda"), default=None,
                   help="FK reward temperature; 1 targets p(x | digit) exactly (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="GLASS Flows on the small digits model shipped with glass_fast: sample, steer "
                                 "toward a digit, reproduce the README's tables. Without a command: demo.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{demo,sample,steer,bench}")

    p = sub.add_parser("demo", help="steer toward a digit with every method at equal model calls (default)")
    _steer_options(p)
    _common(p, out="demo_out")

    p = sub.add_parser("sample", help="plain sampling; prints quality metrics, writes a grid")
    p.add_argument("--method", default="glass", choices=SAMPLE_METHODS, help="sampler (default: glass)")
    p.add_argument("--n", type=positive("--n"), default=64, help="number of samples (default: 64)")
    _common(p, out="out")

    p = sub.add_parser("steer", help="one steering run; prints rewards, writes a grid")
    p.add_argument("--method", default="fks-glass", choices=STEER_METHODS,
                   help="fks-*: FK steering, bon-*: best-of-N, beam-glass: beam search, over GLASS / SDE / ODE "
                        "transitions; fks-glass-guided adds reward guidance (default: fks-glass)")
    p.add_argument("--potential", default=None, choices=("diff", "max", "add", "immediate"),
                   help="FK potential (default: diff)")
    _steer_options(p)
    _common(p, out="out")

    p = sub.add_parser("bench", help="the miniature paper tables (markdown) and plots")
    p.add_argument("--table", default="all", choices=("quality", "steering", "accuracy", "all"),
                   help="which table (default: all)")
    p.add_argument("--n", type=positive("--n"), default=2000, help="samples per method, quality table (default: 2000)")
    p.add_argument("--groups", type=positive("--groups"), default=64,
                   help="outputs per method and digit, steering table (default: 64)")
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9",
                   help="comma-separated target digits, steering table (default: 0,1,...,9)")
    p.add_argument("--lmbda", type=nonneg_float("--lmbda"), default=None,
                   help="FK reward temperature, steering table (default: 1)")
    _particles(p)
    p.add_argument("--ks-samples", type=ks_samples, default=20000,
                   help="samples per KS estimate, accuracy table (default: 20000)")
    _common(p, out="bench_out")
    return parser


def _parse(argv) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        raise UsageError(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)} "
                         f"(or give options only, for the demo)")
    # No subcommand (only options): the demo is the default job.
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["demo"] + argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        if str(exc).startswith("unrecognized arguments") and argv[0] in COMMANDS:
            raise UsageError(f"{exc} ({PROG} {argv[0]} --help lists its options)") from None
        raise
    args.argv = argv
    _check_device(args.device)
    _check_unused(args)
    _check_inner_steps(args)
    _check_table_sizes(args)
    if getattr(args, "digits", None) is not None:
        try:
            args.digits = [digit(d.strip()) for d in args.digits.split(",") if d.strip()]
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--digits: {exc}") from None
        if not args.digits:
            raise UsageError("--digits must list at least one digit 0..9")
        twice = sorted({d for d in args.digits if args.digits.count(d) > 1})
        if twice:   # a repeated digit would run twice and weigh twice in the means over digits
            raise UsageError(f"--digits lists {', '.join(map(str, twice))} more than once; give each digit once")
    args.torch_dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    return args


def _check_device(name: str) -> None:
    if name == "cpu":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device; use e.g. cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r} is not available here (torch sees no CUDA device); use cpu")
    try:  # a device torch knows by name may still be missing (cuda:7 on one GPU, mps without Metal)
        torch.empty(1, device=device)
        torch.Generator(device=device)  # the samplers draw their noise there (meta has no generator)
    except (RuntimeError, AssertionError) as exc:
        # torch's first sentence says why; the rest (dispatch-key lists) is noise on a command line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:300]
        raise UsageError(f"--device {name!r} cannot be used here ({reason}); use cpu"
                         + (" or cuda" if torch.cuda.is_available() else "")) from None


def _uses_solver(args) -> bool:
    """Whether --solver reaches a GLASS or ODE sampler in this command (SDE, plug-in and KS runs ignore it)."""
    if args.command == "sample":
        return args.method in ("glass", "ode")
    if args.command == "steer":
        return "glass" in args.method   # ODE proposals in steering always use Euler (run_steering_method)
    return args.command == "demo" or args.table in ("steering", "all")


def _check_unused(args) -> None:
    """Refuse an option given explicitly where this command ignores it: a run without it would look like one
    with it. (The demo uses every option; for ``sample`` the library refuses rho and solvers a method lacks.)"""
    if args.command == "steer":
        where, no_rho, no_solver = f"--method {args.method}", "it has no GLASS transitions", "its steps are Euler"
        uses_rho = "glass" in args.method
    elif args.command == "bench":
        where, no_rho = f"--table {args.table}", "its rows fix rho and the solver"
        no_solver = no_rho if args.table == "quality" else "it compares every GLASS solver"
        uses_rho = args.table != "quality"
    else:
        return
    unused = []
    if args.rho is not None and not uses_rho:
        unused.append(("--rho", no_rho))
    if args.solver != "euler" and not _uses_solver(args):
        unused.append((f"--solver {args.solver}", no_solver))
    if args.command == "steer" and not args.method.startswith("fks"):
        unused += [(f"--{name}", "best-of-N and beam search keep the highest rewards")
                   for name in ("potential", "lmbda") if getattr(args, name) is not None]
    if unused:
        option, why = unused[0]
        raise UsageError(f"{option} does not apply to {where} ({why}); leave it out")


def _check_table_sizes(args) -> None:
    if args.command != "bench":
        return
    if args.table in ("quality", "all") and args.n < 2:
        raise UsageError(f"--n must be at least 2 for the quality table (a Frechet distance needs two samples), "
                         f"got {args.n}")
    if args.table in ("accuracy", "all") and args.transitions < 2:
        raise UsageError(f"--transitions must be at least 2 for the accuracy table (its interior transitions), "
                         f"got {args.transitions}")


def _check_inner_steps(args) -> None:
    solvers = [args.solver] if _uses_solver(args) else []
    if args.command == "bench" and args.table in ("quality", "all"):
        solvers.append("midpoint")  # the quality table has a GLASS-midpoint row at the same model calls
    for solver in solvers:
        try:
            steps_per_call(args.inner_steps, solver)
        except ValueError:
            raise UsageError(f"--inner-steps must be even with the {solver} solver (2 model calls per step), "
                             f"got {args.inner_steps}") from None


# ------------------------------------------------------------------------------------------- commands
def _settings(args, **overrides):
    from .zoo.experiments import Settings

    kw = dict(transitions=args.transitions, inner_steps=args.inner_steps,
              rho=default_rho("glass") if args.rho is None else args.rho, solver=args.solver,
              particles=args.particles, lmbda=1.0 if getattr(args, "lmbda", None) is None else args.lmbda,
              potential=getattr(args, "potential", None) or "diff")
    kw.update(overrides)
    return Settings(**kw)


def _say(args, text: str) -> None:
    print(text, flush=True)


def _write(args, name: str, text: str) -> str:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, name)
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


def cmd_demo(args) -> None:
    """Steer toward ``--digit`` with FK over GLASS and every baseline at equal model calls."""
    from .plots import save_sample_grid
    from .zoo.experiments import STEERING_LABELS, steering_comparison
    from .zoo.report import steering_table

    settings = _settings(args)
    if not args.quiet:
        _say(args, f"steering {args.groups} groups x {settings.particles} particles toward digit {args.digit}, "
                   f"{settings.transitions} transitions x {settings.inner_steps} model calls, rho={settings.rho}, "
                   f"solver={settings.solver}, lambda={settings.lmbda}")
    rows, best = steering_comparison(args.digit, settings, groups=args.groups, seed=args.seed, device=args.device,
                                     dtype=args.torch_dtype, progress=not args.quiet)
    table = steering_table(rows)
    _say(args, table)
    _write(args, "demo.md", table)
    captions = {STEERING_LABELS[m]: f"success {r['success']:.2f}" for m, r in zip(best, rows)}
    grid = save_sample_grid({STEERING_LABELS[m]: x for m, x in best.items()}, os.path.join(args.out, "demo.png"),
                            title=f"best of each group, steering toward {args.digit}", captions=captions)
    if not args.quiet:
        _say(args, f"wrote {grid}")


def cmd_sample(args) -> None:
    """Plain sampling with one method; quality metrics against the real digits."""
    import glass_fast

    from .plots import save_sample_grid
    from .zoo import class_diversity, confident_rate, digits_flow_model, frechet_to_real
    from .zoo.experiments import make_noise

    model = digits_flow_model(args.device, args.torch_dtype)
    noise, dev_gen = make_noise((args.n, 1, 8, 8), args.seed, args.device, args.torch_dtype)
    start = time.perf_counter()
    x = glass_fast.sample(model, noise, method=args.method, transitions=args.transitions,
                          inner_steps=args.inner_steps, rho=args.rho, solver=args.solver, generator=dev_gen)
    seconds = time.perf_counter() - start
    calls = args.transitions * (1 if args.method == "plugin" else args.inner_steps)
    fd = frechet_to_real(x, split="all") if args.n >= 2 else float("nan")
    _say(args, f"method={args.method} samples={args.n} model calls={calls} seconds={seconds:.2f} "
               f"frechet={fd:.2f} diversity={class_diversity(x):.2f} confident={confident_rate(x):.3f}")
    os.makedirs(args.out, exist_ok=True)
    torch.save(x.float().cpu(), os.path.join(args.out, "samples.pt"))
    rows = {f"{i * 16}-{min(args.n, (i + 1) * 16) - 1}": x[i * 16:(i + 1) * 16] for i in range(min(4, -(-args.n // 16)))}
    path = save_sample_grid(rows, os.path.join(args.out, "samples.png"), title=f"{args.method}, {calls} model calls")
    if not args.quiet:
        _say(args, f"wrote {path} and samples.pt")


def cmd_steer(args) -> None:
    """One steering method; per-group best outputs and the particles of the first groups."""
    from .plots import save_sample_grid
    from .zoo import digit_log_probs, digits_flow_model
    from .zoo.experiments import make_noise, run_steering_method

    settings = _settings(args)
    model = digits_flow_model(args.device, args.torch_dtype)
    noise, gen = make_noise((args.groups, settings.particles, 1, 8, 8), args.seed, args.device, args.torch_dtype)
    start = time.perf_counter()
    best, nfe = run_steering_method(args.method, model, args.digit, noise, settings, gen)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logp = digit_log_probs(best.float())
    success = float((logp.argmax(-1) == args.digit).float().mean())
    _say(args, f"method={args.method} digit={args.digit} groups={args.groups} particles={settings.particles} "
               f"model calls/output={nfe:.0f} mean log p={float(logp[:, args.digit].mean()):.3f} "
               f"success={success:.3f} seconds={seconds:.2f}")
    path = save_sample_grid({"best per group": best}, os.path.join(args.out, "steer.png"),
                            title=f"{args.method} toward {args.digit}")
    if not args.quiet:
        _say(args, f"wrote {path}")


def cmd_bench(args) -> None:
    """The miniature paper tables (markdown in OUT/bench.md) and their plots."""
    from .plots import save_ks_vs_nfe, save_reward_vs_nfe, save_sample_grid
    from .zoo import experiments as ex
    from .zoo import report

    settings = _settings(args)
    progress = not args.quiet
    parts = []
    common = dict(seed=args.seed, device=args.device, dtype=args.torch_dtype, progress=progress)
    if args.table in ("quality", "all"):
        rows, samples = ex.sampler_quality(settings, n=args.n, **common)
        rows.append(ex.real_reference_row())
        parts.append(f"### Plain samplers at {settings.calls} model calls ({args.n} samples each)\n\n"
                     + report.quality_table(rows)
                     + "\n\nFrechet distance to all 1,797 real digits in the classifier's 64 penultimate features; "
                       "the real-digit row has only 359 images, and a smaller set is biased upward, so it is a "
                       "rough floor. Class diversity: exp(entropy) of the predicted-class histogram.")
        save_sample_grid({k: v[:16] for k, v in samples.items()}, os.path.join(args.out, "quality_samples.png"),
                         title=f"plain samplers, {settings.calls} model calls, same noise")
    if args.table in ("steering", "all"):
        rows = []
        for d in args.digits:
            r, best = ex.steering_comparison(d, settings, groups=args.groups, **common)
            rows += r
            if d == args.digits[0]:
                save_sample_grid({ex.STEERING_LABELS[m]: x for m, x in best.items()},
                                 os.path.join(args.out, f"steering_{d}.png"), title=f"steering toward {d}")
        parts.append(f"### Steering, {settings.particles} particles x {settings.calls} model calls, "
                     f"{args.groups} outputs per digit and method (lambda = {settings.lmbda})\n\n"
                     + report.steering_summary(rows)
                     + "\n\nOutput per group: the highest-reward particle (flow baseline: one ODE sample). Frechet "
                       "distance to the real images of the target digit (all splits), from the outputs of each "
                       "method and digit."
                     + "\n\nMean log p(target) per target digit:\n\n" + report.steering_per_digit(rows)
                     + "\n\nSuccess rate per target digit:\n\n" + report.steering_per_digit(rows, "success"))
        # Reward against total model calls, averaged over the digits: the same sampler, 1/4x .. 2x the particles.
        series, k = {}, settings.particles
        for kk in sorted({max(1, k // 4), max(1, k // 2), k, 2 * k}):
            if kk == k:
                r = rows  # already measured above, same seeds
            else:
                r = []
                for d in args.digits:
                    r += ex.steering_comparison(d, dataclasses.replace(settings, particles=kk), groups=args.groups,
                                                methods=ex.STEERING_METHODS[1:], **common)[0]
            for method in dict.fromkeys(row["method"] for row in r):
                vals = [row["log_prob"] for row in r if row["method"] == method]
                xs, ys = series.setdefault(method, ([], []))
                xs.append(next(row["nfe"] for row in r if row["method"] == method))
                ys.append(sum(vals) / len(vals))
        order = [ex.STEERING_LABELS[m] for m in ex.STEERING_METHODS]  # same colours as everywhere else
        series = {m: tuple(zip(*sorted(zip(*series[m])))) for m in order if m in series}
        digits = "0-9" if sorted(args.digits) == list(range(10)) else ",".join(str(d) for d in args.digits)
        parts.append(f"Mean log p(target) over digits {digits} against total model calls per output "
                     f"({settings.calls} per particle, particles = calls / {settings.calls}):\n\n"
                     + report.curve_table(series))
        save_reward_vs_nfe(series, os.path.join(args.out, "reward_vs_nfe.png"), ylabel="mean log p(target)",
                           title=f"steering, mean over digits {digits}\n{settings.calls} calls per particle, "
                                 f"{max(1, k // 4)}-{2 * k} particles per group")
    if args.table in ("accuracy", "all"):
        try:
            from .accuracy import accuracy_table, format_table
        except ImportError:
            parts.append("(accuracy-per-model-call table not available in this version)")
        else:
            acc = accuracy_table(n=args.ks_samples, rho=settings.rho, transitions=args.transitions, seed=args.seed)
            parts.append(f"### Accuracy per model call (Gaussian mixture, KS to the exact transition; rho = "
                         f"{settings.rho}, {args.transitions} transitions)\n\n"
                         + format_table(acc))
            series = {m: (list(v), list(v.values())) for m, v in acc["interior"].items()}
            save_ks_vs_nfe(series, os.path.join(args.out, "ks_vs_nfe.png"),
                           title="worst interior transition: KS vs model calls", critical=acc["critical"])
    text = "\n\n".join(parts) + f"\n\nProduced by `glass-fast {' '.join(args.argv)}` ({_machine()})."
    _say(args, text)
    _write(args, "bench.md", text)


def _machine() -> str:
    import platform

    return f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s)"


COMMAND_FUNCTIONS = {"demo": cmd_demo, "sample": cmd_sample, "steer": cmd_steer, "bench": cmd_bench}


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    """Entry point of ``glass-fast`` / ``python -m glass_fast``. Returns the exit status."""
    try:
        args = _parse(argv)
        run = COMMAND_FUNCTIONS[args.command]
        make_out(args.out)
        start = time.perf_counter()
        run(args)
        if not args.quiet:
            print(f"done in {time.perf_counter() - start:.1f}s; outputs in {os.path.abspath(args.out)}")
        return 0
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        # Library argument checks name the argument and what is allowed; show that line only.
        print(f"{PROG}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        # A run that went non-finite (e.g. a huge --lmbda as the guidance scale): the library names where.
        print(f"{PROG}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        # Too large a run for the machine: one line saying so (torch's CPU allocator raises a RuntimeError)
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        reason = (str(exc).strip().splitlines() or [""])[0]
        reason = reason[max(reason.find("can't allocate"), 0):].split(". ")[0]   # CUDA's: its first sentence
        print(f"{PROG}: error: out of memory ({reason}); lower --n, --groups or --particles", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
