"""Do runs agree? Aligns the loss curves of two or more runs by step and checks every pair against a tolerance.

    python scripts/compare_runs.py outputs/qwen3_{sdpa,flex,varlen}

A RUN is a train.py output dir (its metrics.jsonl), a W&B offline run (wandb/offline-run-* folder or its .wandb
file) or wandb:ENTITY/PROJECT/RUN_ID. Prints, per pair, max and mean |loss difference| over the whole run and per
window of steps; writes a PNG of the curves with a panel of the differences. Exit code 0: every pair is within
the tolerance; 1: a pair exceeds it (or has a non-finite difference); 2: bad input. docs/compare.md has more.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from matplotlib.figure import Figure  # the object API needs no pyplot backend, so no display

from recipes.cli import nonnegative_float, nonnegative_int, positive_int
from recipes.errors import UserError
from recipes.run.runs import WANDB_API_PREFIX, Run, load_run

# 1.5 × the noise floor measured on 2×H100 (docs/results/gpu-proof): two varlen runs of configs/qwen3_varlen.toml,
# same seed and data, differing only in kernel non-determinism, had max |Δloss| 0.235 and mean 0.0205 over 400 steps.
DEFAULT_MAX_TOLERANCE = 0.35
DEFAULT_MEAN_TOLERANCE = 0.03
DEFAULT_WINDOWS = 10  # without --window, the aligned steps are cut into this many windows


@dataclass
class Window:
    first_step: int
    last_step: int
    steps: int  # aligned steps inside the window
    max_abs_diff: float | None
    mean_abs_diff: float | None


@dataclass
class PairResult:
    a: str
    b: str
    steps: int  # aligned steps compared
    max_abs_diff: float | None  # over finite differences; None if there is none
    max_at_step: int | None
    mean_abs_diff: float | None
    nonfinite_steps: list[int]  # steps where either loss is NaN or infinite
    passed: bool
    windows: list[Window] = field(default_factory=list)
    aligned: dict[int, float] = field(default_factory=dict, repr=False)  # step -> |diff|, for the plot


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="train.py output dir, W&B offline-run-* folder or .wandb file, or "
                             "wandb:ENTITY/PROJECT/RUN_ID")
    parser.add_argument("--metric", default="loss",
                        help="the logged value to compare: loss (default), val_loss ([eval] interval), or any other")
    parser.add_argument("--tolerance", type=nonnegative_float, default=DEFAULT_MAX_TOLERANCE,
                        help=f"largest |loss difference| allowed at any step (default {DEFAULT_MAX_TOLERANCE}: "
                             "1.5 × the measured noise floor)")
    parser.add_argument("--mean-tolerance", type=nonnegative_float, default=DEFAULT_MEAN_TOLERANCE,
                        help=f"largest mean |loss difference| over the run (default {DEFAULT_MEAN_TOLERANCE}: "
                             "1.5 × the measured noise floor)")
    parser.add_argument("--window", type=positive_int, metavar="N",
                        help=f"window length in steps for the per-window table (default: {DEFAULT_WINDOWS} windows)")
    parser.add_argument("--skip-steps", type=nonnegative_int, default=0, metavar="K",
                        help="ignore steps 1..K (e.g. early warmup) in the checks; the plot still shows them")
    parser.add_argument("--labels", help="comma-separated names, one per RUN (default: each run's [model] attention)")
    parser.add_argument("--png", type=Path, help="where to write the plot (default: compare.png next to the first RUN)")
    parser.add_argument("--json", type=Path, help="also write the results table as JSON here")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two RUNs to compare")
    if args.labels is not None and len(args.labels.split(",")) != len(args.runs):
        parser.error(f"--labels has {len(args.labels.split(','))} names for {len(args.runs)} RUNs; give one per RUN")
    return args


def unique_labels(runs: list[Run]) -> None:
    """Two runs of the same backend (the noise-floor measurement) get their folder names added to tell them apart."""
    for label in {run.label for run in runs}:
        twins = [run for run in runs if run.label == label]
        if len(twins) > 1:
            for run in twins:
                run.label = f"{label} ({Path(run.source.removeprefix(WANDB_API_PREFIX)).name})"
    if len({run.label for run in runs}) < len(runs):
        raise UserError("two RUNs have the same label; name them with --labels a,b,...")


def losses(run: Run, metric: str) -> dict[int, float]:
    values = {row["step"]: float(row[metric]) for row in run.rows if row.get(metric) is not None}
    if not values:
        hint = ("set [eval] interval in its config" if metric == "val_loss"
                else "pass a run that logged at least one step")
        raise UserError(f"{run.source}: no '{metric}' logged; {hint}")
    return values


def window_bounds(steps: list[int], window: int | None) -> list[tuple[int, int]]:
    """First and last step of each window over the sorted aligned steps. The default length is a multiple of
    the logging interval, so that every window holds about the same number of logged steps."""
    first, last = steps[0], steps[-1]
    interval = math.gcd(*(b - a for a, b in zip(steps, steps[1:]))) or 1
    length = window or interval * max(1, math.ceil(len(steps) / DEFAULT_WINDOWS))
    return [(start, min(start + length - 1, last)) for start in range(first, last + 1, length)]


def summarize(diffs: dict[int, float]) -> tuple[float | None, int | None, float | None]:
    """Max |diff|, its step, and mean |diff| over the finite differences."""
    finite = {step: diff for step, diff in diffs.items() if math.isfinite(diff)}
    if not finite:
        return None, None, None
    at_step = max(finite, key=finite.get)
    return finite[at_step], at_step, sum(finite.values()) / len(finite)


def compare_pair(a: Run, b: Run, metric: str, skip_steps: int, max_tolerance: float,
                 mean_tolerance: float) -> PairResult:
    loss_a, loss_b = losses(a, metric), losses(b, metric)
    steps = sorted(step for step in loss_a.keys() & loss_b.keys() if not skip_steps or step > skip_steps)
    if not steps:
        raise UserError(f"{a.source} and {b.source} share no logged step after --skip-steps {skip_steps}; "
                        "compare runs of the same config and log_every")
    diffs = {step: abs(loss_a[step] - loss_b[step]) for step in steps}
    max_diff, at_step, mean_diff = summarize(diffs)
    nonfinite = [step for step, diff in diffs.items() if not math.isfinite(diff)]
    passed = not nonfinite and max_diff <= max_tolerance and mean_diff <= mean_tolerance
    return PairResult(a.label, b.label, len(steps), max_diff, at_step, mean_diff, nonfinite, passed, aligned=diffs)


def add_windows(pairs: list[PairResult], window: int | None) -> None:
    """Windows on one step grid for every pair, so the table's rows line up."""
    bounds = window_bounds(sorted(set().union(*(pair.aligned for pair in pairs))), window)
    for pair in pairs:
        for start, end in bounds:
            inside = {step: diff for step, diff in pair.aligned.items() if start <= step <= end}
            max_diff, _, mean_diff = summarize(inside)
            pair.windows.append(Window(start, end, len(inside), max_diff, mean_diff))


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def verdict(pair: PairResult, args: argparse.Namespace) -> str:
    if pair.passed:
        return "ok"
    reasons = [f"{len(pair.nonfinite_steps)} non-finite steps" if pair.nonfinite_steps else "",
               "max" if pair.max_abs_diff is not None and pair.max_abs_diff > args.tolerance else "",
               "mean" if pair.mean_abs_diff is not None and pair.mean_abs_diff > args.mean_tolerance else ""]
    return "EXCEEDS " + ", ".join(reason for reason in reasons if reason)


def print_report(runs: list[Run], pairs: list[PairResult], args: argparse.Namespace) -> None:
    print(f"{args.metric}: {len(runs)} runs; tolerance max |diff| <= {args.tolerance:g}, "
          f"mean |diff| <= {args.mean_tolerance:g}"
          + (f"; steps <= {args.skip_steps} skipped" if args.skip_steps else ""))
    width = max(len(run.label) for run in runs)
    for run in runs:
        steps = [row["step"] for row in run.rows]
        print(f"  {run.label:<{width}}  {len(steps)} logged steps ({steps[0]}-{steps[-1]})  {run.source}")
    names = [f"{pair.a} vs {pair.b}" for pair in pairs]
    width = max(len(name) for name in names)
    print(f"\n{'pair':<{width}}  {'steps':>6}  {'max|diff|':>9}  {'at step':>7}  {'mean|diff|':>10}  verdict")
    for name, pair in zip(names, pairs):
        print(f"{name:<{width}}  {pair.steps:>6}  {number(pair.max_abs_diff):>9}  "
              f"{'-' if pair.max_at_step is None else pair.max_at_step:>7}  {number(pair.mean_abs_diff):>10}  "
              f"{verdict(pair, args)}")
    print("\nmax |diff| per window (* = above --tolerance):")
    columns = [max(len(name), 10) for name in names]
    print(f"{'steps':<13}" + "  ".join(f"{name:>{column}}" for name, column in zip(names, columns)))
    for row, window in enumerate(pairs[0].windows):
        if not any(pair.windows[row].steps for pair in pairs):
            continue  # a --window shorter than the logging interval
        cells = []
        for pair, column in zip(pairs, columns):
            value = pair.windows[row].max_abs_diff
            mark = "*" if value is not None and value > args.tolerance else " "
            cells.append(f"{number(value) + mark:>{column}}")
        print(f"{f'{window.first_step}-{window.last_step}':<13}" + "  ".join(cells))


def plot(runs: list[Run], pairs: list[PairResult], args: argparse.Namespace, path: Path) -> None:
    figure = Figure(figsize=(10, 7), layout="constrained")
    curves, differences = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for run in runs:
        loss = losses(run, args.metric)
        curves.plot(sorted(loss), [loss[step] for step in sorted(loss)], label=run.label, linewidth=1)
    curves.set_ylabel(args.metric)
    curves.legend()
    verdict = "agree" if all(pair.passed for pair in pairs) else "DISAGREE"
    curves.set_title(f"{args.metric} per run: {verdict} "
                     f"(max |Δ| ≤ {args.tolerance:g}, mean |Δ| ≤ {args.mean_tolerance:g})")
    for pair in pairs:
        steps = sorted(pair.aligned)
        differences.plot(steps, [pair.aligned[step] for step in steps], label=f"{pair.a} vs {pair.b}", linewidth=1)
    if args.tolerance > 0:
        differences.axhline(args.tolerance, color="red", linestyle="--", linewidth=1, label="--tolerance")
    if args.skip_steps:
        first_step = min(min(losses(run, args.metric)) for run in runs)
        differences.axvspan(first_step, args.skip_steps, color="grey", alpha=0.2, label="skipped")
    if any(diff > 0 for pair in pairs for diff in pair.aligned.values()):
        # Log scale: fp32 runs differ by ~1e-6 and bf16 runs by ~1e-2; a linear axis would flatten one of them.
        differences.set_yscale("log", nonpositive="clip")
    differences.set_ylabel(f"|Δ{args.metric}|")
    differences.set_xlabel("step")
    differences.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def default_png(first_source: str) -> Path:
    if first_source.startswith(WANDB_API_PREFIX):
        return Path("compare.png")
    return Path(first_source).resolve().parent / "compare.png"


def write_json(path: Path, runs: list[Run], pairs: list[PairResult], args: argparse.Namespace) -> None:
    table = {
        "metric": args.metric,
        "tolerance": {"max_abs_diff": args.tolerance, "mean_abs_diff": args.mean_tolerance},
        "skip_steps": args.skip_steps,
        "runs": [{"label": run.label, "source": run.source, "steps": len(run.rows)} for run in runs],
        "pairs": [{key: value for key, value in asdict(pair).items() if key != "aligned"} for pair in pairs],
        "passed": all(pair.passed for pair in pairs),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [load_run(source) for source in args.runs]
        if args.labels is not None:
            for run, label in zip(runs, args.labels.split(",")):
                run.label = label
        unique_labels(runs)
        pairs = [compare_pair(a, b, args.metric, args.skip_steps, args.tolerance, args.mean_tolerance)
                 for a, b in itertools.combinations(runs, 2)]
    except UserError as error:
        print(f"compare_runs.py: error: {error}", file=sys.stderr)
        return 2
    add_windows(pairs, args.window)
    print_report(runs, pairs, args)
    png = args.png or default_png(args.runs[0])
    try:
        plot(runs, pairs, args, png)
        print(f"\nwrote {png}")
        if args.json:
            write_json(args.json, runs, pairs, args)
            print(f"wrote {args.json}")
    except OSError as error:
        print(f"compare_runs.py: error: cannot write {error.filename}: {error.strerror}; "
              "pass a writable --png/--json path",
              file=sys.stderr)
        return 2
    failed = [f"{pair.a} vs {pair.b}" for pair in pairs if not pair.passed]
    agree = "the pair agrees" if len(pairs) == 1 else f"all {len(pairs)} pairs agree"
    print(f"result: {'exceeds tolerance: ' + ', '.join(failed) if failed else agree}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
