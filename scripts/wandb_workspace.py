"""Save a W&B workspace view (or a report) that overlays the attention backends' runs of one group.

    pip install wandb-workspaces        # optional: only this script needs it
    python scripts/wandb_workspace.py --entity ENTITY [--project PROJECT] [--group GROUP] [--report]

One line per run of the group (train.py names runs <flavor>-<attention>-<mask>), x axis = step, no smoothing,
a panel per metric that train.py logs, loss first. Needs W&B credentials (WANDB_API_KEY or `wandb login`) and
network access; offline runs must be synced first (docs/wandb.md). Exit code 2: missing package, argument,
credentials or network, with one line saying which.
"""

from __future__ import annotations

import argparse
import os
import sys

from recipes.errors import first_line

PANELS = ("loss", "grad_norm", "lr", "tokens_per_sec_per_gpu", "mfu", "mfu_torchtitan", "peak_memory_gib")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--entity", default=os.environ.get("WANDB_ENTITY"), help="W&B user or team (default: $WANDB_ENTITY)"
    )
    parser.add_argument(
        "--project",
        default=os.environ.get("WANDB_PROJECT", "qwen3-fsdp-recipes"),
        help="W&B project (default: $WANDB_PROJECT, else qwen3-fsdp-recipes as in [metrics])",
    )
    parser.add_argument(
        "--group",
        default=os.environ.get("WANDB_RUN_GROUP", "qwen3-backends"),
        help="the run group holding one run per backend (default: $WANDB_RUN_GROUP, else "
        "qwen3-backends as in configs/qwen3_{sdpa,flex,varlen}.toml)",
    )
    parser.add_argument("--name", default="Attention backends", help="title of the view or report")
    parser.add_argument(
        "--report", action="store_true", help="save a report (shareable page) instead of a workspace view"
    )
    args = parser.parse_args(argv)
    if not args.entity:
        parser.error("--entity is required (or set $WANDB_ENTITY): the W&B user or team that owns the project")
    return args


def line_plots(reports) -> list:
    return [
        reports.LinePlot(title=f"{metric} per backend", x="Step", y=[metric], smoothing_type="none")
        for metric in PANELS
    ]


def build_workspace(entity: str, project: str, group: str, name: str):
    import wandb_workspaces.reports.v2 as reports
    import wandb_workspaces.workspaces as workspaces

    return workspaces.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[workspaces.Section(name=f"group {group}", panels=line_plots(reports), is_open=True)],
        settings=workspaces.WorkspaceSettings(x_axis="Step", smoothing_type="none"),
        runset_settings=workspaces.RunsetSettings(filters=[workspaces.Metric("Group") == group]),
    )


def build_report(entity: str, project: str, group: str, name: str):
    import wandb_workspaces.expr as expr
    import wandb_workspaces.reports.v2 as reports

    runs = reports.Runset(entity=entity, project=project, name=group, filters=[expr.Metric("Group") == group])
    return reports.Report(
        entity=entity,
        project=project,
        title=name,
        description=f"Runs of group {group}: the same config on each attention backend.",
        blocks=[
            reports.P(
                "Curves that lie on top of each other agree; scripts/compare_runs.py gives the numbers "
                "(per pair, against the spread of a repeat) and tags each run proof:AGREE or proof:DISAGREE."
            ),
            reports.PanelGrid(runsets=[runs], panels=line_plots(reports)),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import wandb_workspaces  # noqa: F401  (optional dependency: checked here to give the install line)
    except ImportError:
        print(
            "wandb_workspace.py: error: wandb_workspaces is not installed; pip install wandb-workspaces",
            file=sys.stderr,
        )
        return 2
    import wandb

    view = (build_report if args.report else build_workspace)(args.entity, args.project, args.group, args.name)
    try:
        # Logging in first: wandb_workspaces turns a login failure inside save() into a bare Exception.
        wandb.Api()
        view.save()
    except (wandb.errors.Error, OSError) as error:
        print(
            f"wandb_workspace.py: error: could not save to W&B ({first_line(error)}); "
            "set WANDB_API_KEY (or `wandb login`) and network access",
            file=sys.stderr,
        )
        return 2
    print(view.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
