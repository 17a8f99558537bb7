"""Do runs agree? Compares the loss curves of two or more runs of one config against the spread of a repeat.

    python scripts/compare_runs.py outputs/backends-DATE/qwen3_{sdpa,sdpa_repeat,flex,varlen} [--png compare.png]

A RUN is a train.py output dir (its metrics.jsonl and config.toml), a W&B offline run (wandb/offline-run-* folder
or its .wandb file) or wandb:ENTITY/PROJECT/RUN_ID. Every pair gets three statistics, none of which one chaotic
step decides:
  early  max |Δloss| over the first --early-steps compared steps, before two trajectories drift apart (on a warm
         start, where every run continues one checkpoint, this is the decisive test)
  late   largest |mean Δloss| over windows of --window steps after the early ones (a steady bias)
  val    largest |Δval_loss| at the steps both runs evaluated
Two runs whose config.toml agree in everything but naming, logging and saving are repeats: their spread is the
floor, and each tolerance is --margin × the floor, at least the resolution of the runs' dtype. Without a repeat the
verdict is uncalibrated and uses measured constants. Prints AGREE or DISAGREE with the pair, the statistic and the
tolerance; exit code 0 (AGREE), 1 (DISAGREE) or 2 (bad input). docs/compare.md has the rule and why.
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

from recipes.cli import ArgumentParser, nonnegative_float, nonnegative_int, positive_int
from recipes.errors import UserError
from recipes.run.outputs import DEFINES_RUN
from recipes.run.runs import WANDB_API_PREFIX, Run, load_run

STATISTICS = {"early": "early max|Δloss|", "late": "late max|mean Δloss|", "val": "max|Δval_loss|"}
# Two samples of one noise differ in their maximum by up to ~2× (1×H200: repeats 0.24-0.35, honest pairs 0.14-0.49).
MARGIN = 3.0
# The smallest tolerance, for repeats that come out bit-identical (deterministic kernels, CPU): honest backends
# differ by ~1e-6 in fp32 (CPU) and by <= 1.6e-4 over the first 60 steps of a bf16 warm start (1×H200); the
# mutations in recipes/qwen3/mutation.py move the early loss by >= 4e-3 (fp32, debug model).
RESOLUTION = {"float32": 1e-4, "bfloat16": 2e-3}
# Without a repeat (uncalibrated): bf16 from scratch on 1×H200, small flavor, every pair over steps 1-40 <= 4.2e-3,
# 50-step signed means <= 0.035, val_loss spread at step 400 0.019; fp32 honest pairs differ by ~1e-6.
UNCALIBRATED = {
    "float32": {"early": 1e-4, "late": 1e-4, "val": 1e-4},
    "bfloat16": {"early": 1e-2, "late": 5e-2, "val": 5e-2},
}
DEFAULT_DTYPE = "bfloat16"  # for runs that recorded no config: the dtype of the GPU comparison configs
# Sections that only name, watch, evaluate or save a run: two runs that agree in every other key are repeats.
BOOKKEEPING = ("job", "metrics", "checkpoint", "eval")
DEFAULT_EARLY_STEPS = 20
DEFAULT_WINDOW = 50
LINE_STYLES = ("-", "--", ":", "-.")


@dataclass
class Window:
    first_step: int
    last_step: int
    steps: int
    mean_diff: float | None  # signed mean of loss(a) - loss(b) over the window's finite differences


@dataclass
class PairResult:
    a: str
    b: str
    repeat: bool  # the two runs share their config (all but BOOKKEEPING): their spread is the floor
    steps: int  # loss steps compared
    val_points: int  # val_loss points compared
    values: dict[str, float | None]  # statistic -> value; None where it has nothing to compare
    at_step: dict[str, int | None]  # statistic -> the step (early, val) or the window's first step (late)
    nonfinite_steps: list[int]
    windows: list[Window] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # statistics above their tolerance, "nonfinite"
    diffs: dict[int, float] = field(default_factory=dict, repr=False)  # step -> loss(a) - loss(b), for the plot


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="train.py output dir, W&B offline-run-* folder or .wandb file, or wandb:ENTITY/PROJECT/RUN_ID",
    )
    parser.add_argument(
        "--early-steps",
        type=positive_int,
        default=DEFAULT_EARLY_STEPS,
        metavar="K",
        help=f"compared steps in the early test (default {DEFAULT_EARLY_STEPS})",
    )
    parser.add_argument(
        "--window",
        type=positive_int,
        default=DEFAULT_WINDOW,
        metavar="N",
        help=f"window length in steps for the late means (default {DEFAULT_WINDOW})",
    )
    parser.add_argument(
        "--margin",
        type=nonnegative_float,
        default=MARGIN,
        help=f"tolerance = margin × the repeats' floor (default {MARGIN:g})",
    )
    parser.add_argument(
        "--skip-steps",
        type=nonnegative_int,
        default=0,
        metavar="K",
        help="leave steps 1..K out of every statistic (e.g. a history the runs share)",
    )
    parser.add_argument("--labels", help="comma-separated names, one per RUN (default: each run's [model] attention)")
    parser.add_argument(
        "--eval-matrix",
        type=Path,
        metavar="JSON",
        help="eval_matrix.py --json output for the runs' start checkpoint: its verdict joins this one",
    )
    parser.add_argument("--png", type=Path, help="write the plot here (nothing is written without it)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="record the verdict in each run dir's W&B run (summary proof/*, tag proof:AGREE|DISAGREE)",
    )
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two RUNs to compare")
    if args.labels is not None and len(args.labels.split(",")) != len(args.runs):
        parser.error(f"--labels has {len(args.labels.split(','))} names for {len(args.runs)} RUNs; give one per RUN")
    return args


def unique_labels(runs: list[Run]) -> None:
    """Two runs of the same backend (a repeat) get their folder names added to tell them apart."""
    for label in {run.label for run in runs}:
        twins = [run for run in runs if run.label == label]
        if len(twins) > 1:
            for run in twins:
                run.label = f"{label} ({Path(run.source.removeprefix(WANDB_API_PREFIX)).name})"
    if len({run.label for run in runs}) < len(runs):
        raise UserError("two RUNs have the same label; name them with --labels a,b,...")


def flat(config: dict) -> dict[str, object]:
    return {
        f"{section}.{key}": value
        for section, values in config.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


def check_same_run(a: Run, b: Run) -> None:
    """Refuses two runs whose recorded configs differ in a key that defines the run (outputs.DEFINES_RUN)."""
    keys_a, keys_b = flat(a.config), flat(b.config)
    for key in sorted(DEFINES_RUN & keys_a.keys() & keys_b.keys()):
        if keys_a[key] != keys_b[key]:
            raise UserError(
                f"{a.source} and {b.source} are different runs ({key}: {keys_a[key]!r} vs "
                f"{keys_b[key]!r}); compare runs of one config that differ in the attention backend only"
            )


def is_repeat(a: Run, b: Run) -> bool:
    def essence(run: Run) -> dict:
        return {key: value for key, value in flat(run.config).items() if key.split(".")[0] not in BOOKKEEPING}

    return bool(a.config) and essence(a) == essence(b)


def series(run: Run, metric: str, skip_steps: int) -> dict[int, float]:
    return {
        row["step"]: float(row[metric])
        for row in run.rows
        if row.get(metric) is not None and (not skip_steps or row["step"] > skip_steps)
    }


def compare_pair(a: Run, b: Run, args: argparse.Namespace) -> PairResult:
    loss_a, loss_b = series(a, "loss", args.skip_steps), series(b, "loss", args.skip_steps)
    steps = sorted(loss_a.keys() & loss_b.keys())
    if not steps:
        raise UserError(
            f"{a.source} and {b.source} share no logged loss step after --skip-steps {args.skip_steps}; "
            "compare runs of the same config and log_every"
        )
    diffs = {step: loss_a[step] - loss_b[step] for step in steps}
    val_a, val_b = series(a, "val_loss", args.skip_steps), series(b, "val_loss", args.skip_steps)
    val_diffs = {step: val_a[step] - val_b[step] for step in sorted(val_a.keys() & val_b.keys())}
    nonfinite = sorted({step for step, diff in (*diffs.items(), *val_diffs.items()) if not math.isfinite(diff)})
    finite = {step: diff for step, diff in diffs.items() if math.isfinite(diff)}

    values, at_step = {}, {}
    early = {step: abs(finite[step]) for step in steps[: args.early_steps] if step in finite}
    values["early"], at_step["early"] = largest(early)
    late_steps = steps[args.early_steps :]
    windows = []
    for start in range(late_steps[0], late_steps[-1] + 1, args.window) if late_steps else ():
        inside = [finite[step] for step in late_steps if start <= step < start + args.window and step in finite]
        if inside:
            windows.append(
                Window(start, min(start + args.window - 1, late_steps[-1]), len(inside), sum(inside) / len(inside))
            )
    values["late"], at_step["late"] = largest({w.first_step: abs(w.mean_diff) for w in windows})
    values["val"], at_step["val"] = largest({step: abs(d) for step, d in val_diffs.items() if math.isfinite(d)})
    return PairResult(
        a.label, b.label, is_repeat(a, b), len(steps), len(val_diffs), values, at_step, nonfinite, windows, diffs=diffs
    )


def largest(values: dict[int, float]) -> tuple[float | None, int | None]:
    if not values:
        return None, None
    step = max(values, key=values.get)
    return values[step], step


@dataclass
class Tolerances:
    dtype: str
    calibrated: bool
    floor: dict[str, float]  # statistic -> the largest value among the repeat pairs
    limit: dict[str, float]  # statistic -> tolerance
    repeats: list[str]  # the repeat pairs, "a vs b"

    margin: float = MARGIN

    def why(self, statistic: str) -> str:
        if not self.calibrated:
            return f"uncalibrated: the constant UNCALIBRATED[{self.dtype!r}][{statistic!r}]"
        return (
            f"{self.margin:g} × the repeats' floor {self.floor[statistic]:.2e}, at least "
            f"{RESOLUTION[self.dtype]:g} for {self.dtype}"
        )


def calibrate(runs: list[Run], pairs: list[PairResult], margin: float) -> Tolerances:
    dtypes = {flat(run.config).get("training.dtype") for run in runs} - {None}
    dtype = dtypes.pop() if dtypes else DEFAULT_DTYPE  # one dtype: it defines the run
    repeats = [pair for pair in pairs if pair.repeat]
    if not repeats:
        return Tolerances(dtype, False, {}, dict(UNCALIBRATED[dtype]), [])
    floor = {
        stat: max((pair.values[stat] for pair in repeats if pair.values[stat] is not None), default=0.0)
        for stat in STATISTICS
    }
    limit = {stat: max(margin * floor[stat], RESOLUTION[dtype]) for stat in STATISTICS}
    return Tolerances(dtype, True, floor, limit, [f"{pair.a} vs {pair.b}" for pair in repeats], margin)


def judge(pairs: list[PairResult], tolerances: Tolerances) -> None:
    for pair in pairs:
        pair.failed = (["nonfinite"] if pair.nonfinite_steps else []) + [
            stat for stat in STATISTICS if pair.values[stat] is not None and pair.values[stat] > tolerances.limit[stat]
        ]


def read_eval_matrix(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        table = json.loads(path.read_text())
        return {key: table[key] for key in ("agree", "max_spread", "tolerance", "rows")}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"--eval-matrix {path}: not an eval_matrix.py --json table ({error}); "
            "pass the file eval_matrix.py --json wrote"
        ) from None


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def reasons(pair: PairResult, tolerances: Tolerances) -> list[str]:
    out = [
        f"{len(pair.nonfinite_steps)} non-finite steps (first {pair.nonfinite_steps[0]})"
        if stat == "nonfinite"
        else f"{STATISTICS[stat]} {pair.values[stat]:.2e} at step {pair.at_step[stat]} > {tolerances.limit[stat]:.2e} "
        f"({tolerances.why(stat)})"
        for stat in pair.failed
    ]
    return out


def verdict_lines(pairs: list[PairResult], tolerances: Tolerances, eval_matrix: dict | None) -> tuple[bool, list[str]]:
    failed = [pair for pair in pairs if pair.failed]
    matrix_failed = eval_matrix is not None and not eval_matrix["agree"]
    lines = []
    for pair in failed:
        lines.append(f"DISAGREE: {pair.a} vs {pair.b}: " + "; ".join(reasons(pair, tolerances)))
    if matrix_failed:
        lines.append(
            f"DISAGREE: eval matrix at the start checkpoint: the backends' spread "
            f"{eval_matrix['max_spread']:.2e} > {eval_matrix['tolerance']:.0e}"
        )
    if not lines:
        floor = (
            f"floor from {', '.join(tolerances.repeats)}"
            if tolerances.calibrated
            else "UNCALIBRATED: no repeat among the runs; constants UNCALIBRATED[" + repr(tolerances.dtype) + "]"
        )
        matrix = "" if eval_matrix is None else f"; eval matrix spread {eval_matrix['max_spread']:.2e}"
        nearest = max(
            ((pair, stat) for pair in pairs for stat in STATISTICS if pair.values[stat] is not None),
            key=lambda item: item[0].values[item[1]] / tolerances.limit[item[1]],
        )
        pair, stat = nearest
        lines.append(
            f"AGREE: all {len(pairs)} pairs within tolerance ({floor}){matrix}; nearest: {pair.a} vs "
            f"{pair.b} {STATISTICS[stat]} {pair.values[stat]:.2e} <= {tolerances.limit[stat]:.2e} "
            f"({tolerances.why(stat)})"
        )
    return not lines[0].startswith("DISAGREE"), lines


def print_report(
    runs: list[Run], pairs: list[PairResult], tolerances: Tolerances, args: argparse.Namespace, eval_matrix: dict | None
) -> None:
    skipped = f"; steps <= {args.skip_steps} left out" if args.skip_steps else ""
    print(
        f"{len(runs)} runs ({tolerances.dtype}): early = first {args.early_steps} compared steps, late = means over "
        f"{args.window}-step windows after them{skipped}"
    )
    width = max(len(run.label) for run in runs)
    for run in runs:
        loss = series(run, "loss", 0)
        val = series(run, "val_loss", 0)
        span = f"{min(loss)}-{max(loss)}" if loss else "none"
        print(f"  {run.label:<{width}}  {len(loss)} loss steps ({span}), {len(val)} val_loss points  {run.source}")
    names = [f"{pair.a} vs {pair.b}" + (" [repeat]" if pair.repeat else "") for pair in pairs]
    width = max(len(name) for name in names)
    print(f"\n{'pair':<{width}}  {'steps':>5}  {'early':>8}  {'late':>8}  {'val':>8}  verdict")
    for name, pair in zip(names, pairs):
        cells = "  ".join(f"{number(pair.values[stat]):>8}" for stat in STATISTICS)
        verdict = "ok" if not pair.failed else "FAILS " + ", ".join(pair.failed)
        print(f"{name:<{width}}  {pair.steps:>5}  {cells}  {verdict}")
    limits = ", ".join(f"{stat} {tolerances.limit[stat]:.2e}" for stat in STATISTICS)
    if tolerances.calibrated:
        print(
            f"\ntolerance = {args.margin:g} × the floor of {', '.join(tolerances.repeats)}, at least "
            f"{RESOLUTION[tolerances.dtype]:g} ({tolerances.dtype}): {limits}"
        )
    else:
        print(
            f"\nuncalibrated: no repeat among the runs (two runs of one config, e.g. train_backends.sh's "
            f"qwen3_sdpa_repeat); tolerances are the constants UNCALIBRATED[{tolerances.dtype!r}] in "
            f"compare_runs.py: {limits}"
        )
    if eval_matrix is not None:
        print(
            f"eval matrix (the start checkpoint under every backend): spread {eval_matrix['max_spread']:.2e}, "
            f"tolerance {eval_matrix['tolerance']:.0e}: {'agree' if eval_matrix['agree'] else 'DISAGREE'}"
        )


def plot(
    runs: list[Run], pairs: list[PairResult], tolerances: Tolerances, agree: bool, path: Path, args: argparse.Namespace
) -> Figure:
    """Top: each run's loss (lines) and val_loss (markers). Bottom: |Δloss| of every run against the first, in
    that run's colour, over the repeat's spread (grey band) and the early tolerance (dashed)."""
    figure = Figure(figsize=(11, 7), layout="constrained")
    curves, differences = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    colours = {run.label: f"C{index % 10}" for index, run in enumerate(runs)}
    styles = {run.label: LINE_STYLES[index % len(LINE_STYLES)] for index, run in enumerate(runs)}
    for run in runs:
        loss, val = series(run, "loss", 0), series(run, "val_loss", 0)
        curves.plot(
            sorted(loss),
            [loss[s] for s in sorted(loss)],
            color=colours[run.label],
            linestyle=styles[run.label],
            linewidth=1.2,
            label=run.label,
        )
        if val:
            curves.plot(
                sorted(val),
                [val[s] for s in sorted(val)],
                color=colours[run.label],
                linestyle="none",
                marker="o",
                markerfacecolor="none",
                markersize=6,
            )
    curves.set_ylabel("loss (lines), val_loss (circles)")
    curves.set_title(
        f"{'AGREE' if agree else 'DISAGREE'}" + ("" if tolerances.calibrated else " (uncalibrated: no repeat)")
    )
    curves.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")

    reference = runs[0].label
    against = {pair.b if pair.a == reference else pair.a: pair for pair in pairs if reference in (pair.a, pair.b)}
    positive = [abs(d) for pair in against.values() for d in pair.diffs.values() if math.isfinite(d) and d != 0]
    bottom = min(positive + [tolerances.limit["early"]]) / 10
    for pair in pairs:  # the repeats' spread, behind everything
        if pair.repeat:
            steps = sorted(pair.diffs)
            differences.fill_between(
                steps,
                bottom,
                [max(abs(pair.diffs[s]), bottom) for s in steps],
                color="0.85",
                zorder=0,
                label=f"repeat spread ({pair.a} vs {pair.b})",
            )
    first = min(min(pair.diffs) for pair in pairs)
    early_end = max(sorted(pair.diffs)[: args.early_steps][-1] for pair in pairs)
    differences.hlines(
        tolerances.limit["early"],
        first,
        early_end,
        colors="black",
        linestyles="--",
        zorder=1,
        label=f"early tolerance {tolerances.limit['early']:.1e}",
    )
    for label, pair in against.items():
        steps = sorted(pair.diffs)
        # zeros (bit-identical steps) sit on the axis floor: a log axis has no 0
        differences.plot(
            steps,
            [max(abs(pair.diffs[s]), bottom) for s in steps],
            color=colours[label],
            linestyle=styles[label],
            linewidth=1.2,
            zorder=2,
            label=f"{label} vs {reference}",
        )
    differences.set_yscale("log")  # fp32 runs differ by ~1e-6, bf16 runs by ~1e-2: one axis shows both
    differences.set_ylim(bottom=bottom / 2)
    differences.set_ylabel(f"|Δloss| (log; 0 at {bottom:.0e})")
    differences.set_xlabel("step")
    differences.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return figure


def results(
    runs: list[Run],
    pairs: list[PairResult],
    tolerances: Tolerances,
    agree: bool,
    lines: list[str],
    args: argparse.Namespace,
    eval_matrix: dict | None,
) -> dict:
    return {
        "verdict": "AGREE" if agree else "DISAGREE",
        "reasons": lines,
        "calibrated": tolerances.calibrated,
        "dtype": tolerances.dtype,
        "margin": args.margin,
        "early_steps": args.early_steps,
        "window": args.window,
        "skip_steps": args.skip_steps,
        "floor": tolerances.floor,
        "tolerance": tolerances.limit,
        "repeats": tolerances.repeats,
        "runs": [
            {
                "label": run.label,
                "source": run.source,
                "loss_steps": len(series(run, "loss", 0)),
                "val_loss_points": len(series(run, "val_loss", 0)),
            }
            for run in runs
        ],
        "pairs": [{key: value for key, value in asdict(pair).items() if key != "diffs"} for pair in pairs],
        "eval_matrix": eval_matrix,
        "passed": agree,
    }


def record_in_wandb(runs: list[Run], table: dict) -> list[str]:
    """Adds the verdict to the W&B run of every run dir that logged one (it resumes the run by the id the folder
    recorded; offline, that is one more offline-run-* folder of the same run, merged by `wandb sync`)."""
    from recipes.config import load_config
    from recipes.metrics import start_wandb

    recorded = []
    for run in runs:
        folder = Path(run.source)
        if not (folder / "wandb_run_id").is_file() or not (folder / "config.toml").is_file():
            continue
        wandb_run = start_wandb(load_config(str(folder / "config.toml"), source=str(folder / "config.toml")), folder)
        if wandb_run is None:
            continue
        wandb_run.summary.update(
            {
                "proof/verdict": table["verdict"],
                "proof/calibrated": table["calibrated"],
                "proof/reason": table["reasons"][0],
            }
        )
        wandb_run.tags = tuple(wandb_run.tags or ()) + (f"proof:{table['verdict']}",)
        wandb_run.finish()
        recorded.append(str(folder))
    return recorded


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [load_run(source) for source in args.runs]
        if args.labels is not None:
            for run, label in zip(runs, args.labels.split(",")):
                run.label = label
        unique_labels(runs)
        for run in runs:
            if not series(run, "loss", 0):
                raise UserError(f"{run.source}: no 'loss' logged; pass a run that logged at least one step")
        for a, b in itertools.combinations(runs, 2):
            check_same_run(a, b)
        pairs = [compare_pair(a, b, args) for a, b in itertools.combinations(runs, 2)]
        eval_matrix = read_eval_matrix(args.eval_matrix)
    except UserError as error:
        print(f"compare_runs.py: error: {error}", file=sys.stderr)
        return 2
    tolerances = calibrate(runs, pairs, args.margin)
    judge(pairs, tolerances)
    agree, lines = verdict_lines(pairs, tolerances, eval_matrix)
    print_report(runs, pairs, tolerances, args, eval_matrix)
    table = results(runs, pairs, tolerances, agree, lines, args, eval_matrix)
    try:
        if args.png:
            plot(runs, pairs, tolerances, agree, args.png, args)
            print(f"\nwrote {args.png}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(table, indent=2) + "\n")
            print(f"wrote {args.json}")
    except OSError as error:
        print(
            f"compare_runs.py: error: cannot write {error.filename}: {error.strerror}; pass a writable --png/--json "
            "path",
            file=sys.stderr,
        )
        return 2
    if args.wandb:
        recorded = record_in_wandb(runs, table)
        print(f"W&B: verdict recorded in {len(recorded)} runs (summary proof/verdict, tag proof:{table['verdict']})")
    print("\n" + "\n".join(lines))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
