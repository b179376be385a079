"""A W&B Report for a sweep, built with W&B's own reports library (`wandb-workspaces`).

    python -m analysis dashboard --sweep NAME [--entity E] [--project P] [--dry-run]
        [--runs-dir runs | --from-wandb ENTITY/PROJECT]

The report is a live view of the sweep's W&B runs (group NAME, job type not "report", role "train": the
comparison's runs, not the pretraining runs nor the analysis report's own run):

1. Accuracy vs training images, per dataset: one run set per (model, pretraining), with test accuracy and the
   selected checkpoint's validation accuracy against the training images (log scale), and against the
   pretraining images when the sweep varies them.
2. Accuracy by cell: bars of the cell means with their standard error over seeds, runs grouped by cell
   (dataset, model, pretraining, pretraining size, training fraction).
3. Robustness and calibration by cell: mean corruption accuracy, patch-shuffle accuracy, ECE, NLL.
4. Cost by cell: parameters, FLOPs per image, training images/s, wall time; test accuracy against training FLOPs.
5. Runs: the runs table grouped by cell, with the columns that matter pinned.

The (model, pretraining) run sets come from the sweep's runs (`--runs-dir`, with its sweep.json, or
`--from-wandb`). `--dry-run` prints the report's outline and saves nothing (no network); otherwise the
report is saved to ENTITY/PROJECT (default: `--from-wandb`'s, else WANDB_ENTITY and WANDB_PROJECT or
vit-vs-cnn) and its URL printed. The statistics with intervals stay in `results/SWEEP/report.md`.
wandb-workspaces (and so wandb) is imported only here, when a report is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pandas as pd

from analysis.collect import REPORT_JOB_TYPE, Collection
from analysis.outputs import models_in_order
from common.wandb_mode import project as default_project

CELL = ("dataset", "model", "pretraining", "pretrain_size", "train_fraction")  # the keys of one cell
RUN_COLUMNS = ("run:state", "config:dataset.value", "config:model.value", "config:pretraining.value",
               "config:pretrain_size.value", "config:train_fraction.value", "config:seed.value", "summary:n_train",
               "summary:selected/val/acc1", "summary:test/acc1", "summary:improving_at_end", "summary:wall_time_s")
ROBUSTNESS = {"Mean corruption accuracy": "corrupt/mean_acc1", "Patch-shuffle accuracy": "shuffle/acc1",
              "Test ECE (lower is better)": "test/ece", "Test NLL (lower is better)": "test/nll"}
COST = {"Parameters": "params", "Forward FLOPs per image": "flops_per_image",
        "Training images/s": "train_images_per_s", "Wall time (s)": "wall_time_s"}


class DashboardError(ValueError):
    """The dashboard cannot be built as asked (e.g. no entity); str() is one line."""


class SaveError(RuntimeError):
    """W&B did not save the report; str() is one line."""


def where(entity: str | None, project: str | None, from_wandb: str | None) -> tuple[str, str]:
    """The report's ENTITY and PROJECT: as given, else `--from-wandb`'s, else WANDB_ENTITY and WANDB_PROJECT
    (or vit-vs-cnn).

    Raises:
        DashboardError: no entity anywhere.
    """
    source_entity, _, source_project = (from_wandb or "").partition("/")
    entity = entity or source_entity or os.environ.get("WANDB_ENTITY")
    if not entity:
        raise DashboardError("dashboard: no W&B entity (allowed: --entity E, --from-wandb E/P or WANDB_ENTITY)")
    return entity, project or source_project or default_project()


def curves(collection: Collection) -> dict[str, list[tuple[str, str]]]:
    """{dataset: [(model, pretraining), ...]}: the comparison's curves, from the runs and the sweep's plan,
    CNNs first and scratch first (the report's order)."""
    frames = [collection.runs] + ([collection.expected_runs] if collection.expected_runs is not None else [])
    rows = pd.concat([f[["dataset", "model", "arch", "pretraining", "role"]] for f in frames], ignore_index=True)
    rows = rows[rows["role"].fillna("train") == "train"]
    out: dict[str, list[tuple[str, str]]] = {}
    for dataset in sorted(rows["dataset"].dropna().unique()):
        of_dataset = rows[rows["dataset"] == dataset]
        order = [model for model, _ in models_in_order(of_dataset)]
        pairs = of_dataset[["model", "pretraining"]].drop_duplicates().itertuples(index=False)
        out[str(dataset)] = sorted(((str(m), str(p)) for m, p in pairs),
                                   key=lambda mp: (order.index(mp[0]), mp[1] != "none", mp[1]))
    return out


def build(collection: Collection, sweep: str, entity: str, project: str) -> Any:
    """The W&B Report (a `wandb_workspaces.reports.v2.Report`, not saved) for the sweep's runs."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    def runs_of(*conditions: Any) -> Any:
        return expr.And(expr.Metric("Group") == sweep, expr.Metric("JobType") != REPORT_JOB_TYPE,
                        expr.Config("role") == "train", *conditions)

    def by_cell(name: str, **columns: Any) -> Any:
        return wr.Runset(entity=entity, project=project, name=name, filters=runs_of(),
                         groupby=[f"config.{key}" for key in CELL], **columns)

    def scatter(title: str, x: str, y: str) -> Any:
        return wr.ScatterPlot(title=title, x=wr.SummaryMetric(x), y=wr.SummaryMetric(y), log_x=True)

    def bars(panels: dict[str, str]) -> list[Any]:
        return [wr.BarPlot(title=f"{title} (mean ± s.e. over seeds)", metrics=[wr.SummaryMetric(metric)],
                           groupby_aggfunc="mean", groupby_rangefunc="stderr") for title, metric in panels.items()]

    varies_pretrain_size = collection.runs["pretrain_size"].dropna().nunique() > 1
    blocks: list[Any] = [
        wr.P(f"The runs of sweep {sweep} (W&B group {sweep}): a ViT against a CNN trained under one recipe. "
             "Every run's checkpoint is selected on validation (selected/val/acc1); the test set is evaluated "
             "once, at the end. Intervals and statistical tests are in results/" + sweep + "/report.md "
             "(python -m analysis report). Made by python -m analysis dashboard."),
        wr.H2("Accuracy vs training images, by model and pretraining"),
    ]
    for dataset, pairs in curves(collection).items():
        panels = [scatter(f"{dataset}: test accuracy vs training images", "n_train", "test/acc1"),
                  scatter(f"{dataset}: selected validation accuracy vs training images", "n_train",
                          "selected/val/acc1")]
        if varies_pretrain_size:
            panels.append(scatter(f"{dataset}: test accuracy vs pretraining images", "pretrain_size", "test/acc1"))
        runsets = [wr.Runset(entity=entity, project=project, name=f"{model} · {pretraining}",
                             filters=runs_of(expr.Config("dataset") == dataset, expr.Config("model") == model,
                                             expr.Config("pretraining") == pretraining))
                   for model, pretraining in pairs]
        blocks += [wr.H3(dataset), wr.PanelGrid(runsets=runsets, panels=panels)]
    blocks += [
        wr.H2("Accuracy by cell"),
        wr.PanelGrid(runsets=[by_cell("by cell")],
                     panels=bars({"Test accuracy": "test/acc1", "Selected validation accuracy": "selected/val/acc1",
                                  "Training-subset accuracy": "train/acc1"})),
        wr.H2("Robustness and calibration"),
        wr.PanelGrid(runsets=[by_cell("by cell")], panels=bars(ROBUSTNESS)),
        wr.H2("Cost"),
        wr.PanelGrid(runsets=[by_cell("by cell")],
                     panels=[*bars(COST), scatter("Test accuracy vs training FLOPs", "train_flops", "test/acc1")]),
        wr.H2("Runs, grouped by cell"),
        wr.PanelGrid(runsets=[by_cell("runs", pinned_columns=list(RUN_COLUMNS[:7]),
                                      visible_columns=list(RUN_COLUMNS[7:]))],
                     panels=[wr.RunComparer(diff_only="split")]),
    ]
    return wr.Report(entity=entity, project=project, title=f"vit-vs-cnn: sweep {sweep}"[:128], width="fluid",
                     description=f"ViT vs CNN, sweep {sweep}: accuracy, robustness and cost by cell.", blocks=blocks)


def outline(report: Any) -> str:
    """The report as text: its blocks, each panel grid's run sets (filters, grouping) and panels."""
    lines = [f"W&B report for {report.entity}/{report.project}: {report.title}"]
    for block in report.blocks:
        runsets: Iterable[Any] = getattr(block, "runsets", ())
        if runsets:
            for runset in runsets:
                grouped = f"; grouped by {', '.join(runset.groupby)}" if runset.groupby else ""
                lines.append(f"    run set {runset.name!r}: {runset.filters}{grouped}")
            lines += [f"    {type(panel).__name__}: {getattr(panel, 'title', None) or ''}".rstrip()
                      for panel in block.panels]
        else:
            lines.append(f"{type(block).__name__}: {getattr(block, 'text', '')}")
    return "\n".join(lines)


def save(report: Any) -> str:
    """Save the report to W&B (needs network and credentials); returns its URL.

    Raises:
        SaveError: W&B refused or could not be reached.
    """
    try:
        report.save()
    except Exception as exc:  # noqa: BLE001 - wandb raises many kinds; one line says which
        raise SaveError(f"dashboard: W&B did not save the report: {type(exc).__name__}: {exc}".splitlines()[0]
                           ) from None
    return str(report.url)
