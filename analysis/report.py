"""The sweep report: collect -> stats -> tables -> figures -> `results/SWEEP/report.md`.

`make_report` writes `runs.csv`, `tables/*.md|*.tex`, `figures/*.png|*.pdf`
and `report.md` under `results/SWEEP/`, each atomically. The output depends
only on the runs (and the sweep's `sweep.json`): running it twice gives
byte-identical files. It works on whatever has finished: the Completeness
section lists what the sweep's plan still lacks.

Sections: Setup (what ran), Protocol (how, from the runs' own fields, with one
line of justification each), Completeness (expected vs finished), Findings
(every sentence that states a direction carries its n and interval), Tables,
Figures.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from analysis import ablations, collect, interpret_figures, plots, robustness_report, stats, tables
from analysis.collect import Collection
from analysis.outputs import (condition_key, condition_label, conditions_in_order, fraction_label, models_in_order,
                              si_label, write_outputs)
from analysis.tables import Table
from common import files
from common.schema import PLACEMENT_FIELDS
from common.wandb_mode import project as wandb_project
from common.wandb_mode import resolve as resolve_wandb_mode

MIN_EVALS = 8  # the protocol's fewest validation evaluations to choose a checkpoint from
# Spec fields that describe the net, not the recipe: they may differ between a ViT and a CNN.
NET_FIELDS = ("model", "model_kwargs", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "pos_embed",
              "pool", "class_token", "role")


# --------------------------------------------------------------- formatting
def _value(v: object) -> str:
    """A spec or version value for prose: floats compactly, integers without ".0"."""
    if isinstance(v, float):
        return f"{v:g}" if not v.is_integer() else f"{int(v)}"
    return str(v)


def _values(series: pd.Series) -> list[str]:
    """Distinct non-null values, as text, in natural order."""
    distinct = series.dropna().unique().tolist()
    return [_value(v) for v in sorted(distinct, key=lambda v: (isinstance(v, str), v))]


def _signed(fraction: float) -> str:
    """0.0123 -> "+1.2" (points, with the minus sign "−")."""
    return f"{round(100 * fraction, 1) or 0.0:+.1f}".replace("-", "−")


def _images(n: float) -> str:
    return f"{n:,.0f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def interval_text(row: pd.Series) -> str:
    """How sure a stats row is: "95% CI −12.1 to −5.9, t over n=3 seeds", its n=1 variant, or why none."""
    n = int(row["n"])
    if row["interval"] == "t":
        return f"95% CI {_signed(row['ci_low'])} to {_signed(row['ci_high'])}, t over n={n} seeds"
    if row["interval"] == "test":
        text = f"95% CI {_signed(row['ci_low'])} to {_signed(row['ci_high'])}, {stats.TEST_SAMPLING}"
        return text + ("" if pd.isna(row["p_value"]) else f"; McNemar p = {row['p_value']:.2g}")
    return f"n={n} seed{'s' if n != 1 else ''}, no interval: {row['interval_note']}"


def _has_interval(row: pd.Series) -> bool:
    return row["interval"] in ("t", "test")


def _excludes_zero(row: pd.Series) -> bool:
    return _has_interval(row) and (row["ci_low"] > 0 or row["ci_high"] < 0)


def _in_condition_order(frame: pd.DataFrame, then: list[str]) -> pd.DataFrame:
    """`frame` sorted by dataset, then condition (`condition_key`: scratch first), then the columns `then`."""
    keys = [condition_key(p, s) for p, s in zip(frame["pretraining"], frame["pretrain_size"])]
    rank = {key: i for i, key in enumerate(sorted(set(keys)))}
    keyed = frame.assign(_condition=[rank[key] for key in keys])
    return keyed.sort_values(["dataset", "_condition", *then], kind="mergesort").drop(columns="_condition")


# --------------------------------------------------------------- setup
def setup_section(collection: Collection, sweep: str) -> list[str]:
    """Markdown lines: what was run, what varies, versions, commits, counts."""
    runs = collection.runs
    target = stats.targets(runs)
    counts = stats.status_counts(runs)
    models = models_in_order(target)
    lines = [
        "## Setup", "",
        f"- Sweep: `{sweep}`; profile: {', '.join(_values(runs['profile'])) or 'unknown'}; "
        f"read from {collection.source or 'the runs folder'}",
        f"- Datasets: {', '.join(_values(target['dataset']))}",
        f"- Models: {', '.join(f'{m} ({a})' for m, a in models)}",
        f"- Training fractions: {', '.join(f'{100 * f:g}%' for f in sorted(target['train_fraction'].unique()))}",
        f"- Pretraining: {', '.join(condition_label(p, s) for p, s in conditions_in_order(target))}",
        f"- Seeds: {', '.join(_values(target['seed']))}",
        f"- Runs: {len(target)} ({counts['completed']} completed, {counts['failed']} failed, "
        f"{counts['diverged']} diverged); {len(runs) - len(target)} upstream pretraining runs; "
        f"{len(collection.skipped)} unreadable result.json files skipped",
    ]
    spec_cols = sorted(c for c in runs if c.startswith("spec/") and c.removeprefix("spec/") not in PLACEMENT_FIELDS)
    varying = [c for c in spec_cols if target[c].nunique() > 1]
    fixed = [c for c in spec_cols if target[c].nunique() == 1]
    if varying:
        lines.append("- Spec fields that vary: " + "; ".join(
            f"`{c.removeprefix('spec/')}` ∈ {{{', '.join(_values(target[c]))}}}" for c in varying))
    if fixed:
        lines.append("- Fixed spec fields: " + ", ".join(
            f"`{c.removeprefix('spec/')}`={_values(target[c])[0]}" for c in fixed))
    versions = [c for c in runs if c.startswith("versions/")]
    if versions:
        lines.append("- Versions: " + "; ".join(
            f"{c.removeprefix('versions/')} {', '.join(_values(runs[c]))}" for c in sorted(versions)))
    commits = runs["git_commit"].fillna("unknown").value_counts()
    lines.append("- Git commits: " + ", ".join(
        f"`{c}` ({commits[c]} runs)" for c in sorted(commits.index)))
    bad = target[target["status"] != "completed"]
    if not bad.empty:
        lines += ["", "Runs excluded from the statistics:", "",
                  "| run | model | pretraining | fraction | seed | status | error |", "|---|---|---|---|---|---|---|"]
        for _, r in bad.iterrows():
            error = " ".join(str(r["error"] or "").split())[:120].replace("|", "\\|")
            lines.append(f"| `{r['run_id']}` | {r['model']} | {condition_label(r['pretraining'], r['pretrain_size'])} "
                         f"| {100 * r['train_fraction']:g}% | {r['seed']} | {r['status']} | {error} |")
    if collection.skipped:
        lines += ["", "Unreadable result.json files (skipped):", ""]
        lines += [f"- `{path}`: {reason}" for path, reason in collection.skipped]
    return lines


# --------------------------------------------------------------- protocol
def _recorded(frame: pd.DataFrame, column: str) -> pd.Series:
    """The non-null values of `column` (an empty Series when the column is absent)."""
    return frame[column].dropna() if column in frame else pd.Series(dtype=object)


def _budget_line(target: pd.DataFrame) -> str:
    budgets = target.dropna(subset=["budget_steps"])
    why = ("Why: the ViT paper's subset study trains every subset with the same hyper-parameters and early-stops "
           "on validation (Dosovitskiy et al. 2021, Sec. 4.3), so the curve measures the data, not a budget tied "
           "to its size.")
    if budgets.empty:
        return ("- **Step budget**: not recorded by these runs (result schema before the protocol fields): whether "
                f"every size had the same budget cannot be checked. {why}")
    values = sorted(budgets["budget_steps"].astype(int).unique())
    batch = _values(_recorded(budgets, "spec/batch_size"))
    per = f" of batch {', '.join(batch)}" if batch else ""
    if len(values) == 1:
        text = (f"- **Same step budget at every training size**: {values[0]:,} steps{per}, in all "
                f"{_plural(len(budgets), 'run')} that record it")
        missing = len(target) - len(budgets)
        return text + (f" ({missing} do not)" if missing else "") + f". {why}"
    by_size = budgets.groupby("train_fraction")["budget_steps"].agg(lambda s: sorted(s.astype(int).unique()))
    listed = "; ".join(f"{100 * f:g}%: {', '.join(f'{v:,}' for v in b)}" for f, b in by_size.items())
    return (f"- **Step budget differs between runs** ({listed} steps): the protocol wants one budget at every size; "
            f"where it grows with the size, the curve's shape can follow the budget. {why}")


def _selection_line(target: pd.DataFrame) -> str:
    done = target[target["status"] == "completed"]
    evals = _recorded(done, "n_evals").astype(int)
    why = ("Why: choices are made on a validation split carved from the training data and the test set is "
           "evaluated once, at the end, as in the ViT paper's subset protocol (best validation, early stopping).")
    if evals.empty:
        return f"- **Checkpoint chosen on validation**: the number of evaluations is not recorded by these runs. {why}"
    span = f"{evals.min()}" if evals.min() == evals.max() else f"{evals.min()}–{evals.max()}"
    early = int(_recorded(done, "stopped_early").astype(bool).sum())
    text = (f"- **Checkpoint chosen on validation** (`val/acc1`) among {span} evaluations per run; "
            f"{early} of {_plural(len(done), 'completed run')} stopped early when validation stopped improving")
    few = int((evals < MIN_EVALS).sum())
    if few:
        text += f"; {_plural(few, 'run')} had fewer than {MIN_EVALS} evaluations, a coarse choice"
    return text + f". {why}"


def _flag_line(runs: pd.DataFrame) -> str:
    summary = stats.summarize(runs)
    cells = summary[summary["n"] > 0]
    flagged = cells[cells["flagged"]]
    recorded = len(_recorded(stats.usable(runs), "improving_at_end"))
    why = ("Why: scaling-law practice fits converged points only (Hestness et al. 2017; Kaplan et al. 2020): a point "
           "still improving measures its budget, not its data.")
    if not recorded:
        return ("- **Cells still improving when their budget ended**: not recorded by these runs; no cell is flagged, "
                f"so fits may include under-trained points. {why}")
    if flagged.empty:
        return (f"- **Cells still improving when their budget ended**: none of {_plural(len(cells), 'cell')} "
                f"(every run's best validation came before its last evaluations, or it stopped early). {why}")
    names = ", ".join(f"{r['model']} · {condition_label(r['pretraining'], r['pretrain_size'])} · "
                      f"{100 * r['train_fraction']:g}%" for _, r in flagged.iterrows())
    return (f"- **Cells still improving when their budget ended**: {len(flagged)} of {len(cells)} ({names}); "
            f"marked {tables.FLAG} in the tables and hollow in the figures, and kept out of fits and crossovers. {why}")


def _seed_line(target: pd.DataFrame) -> str:
    both = target.dropna(subset=["data_seed"])
    why = ("Why: data sampling, order and augmentation vary results as much as initialisation does "
           "(Bouthillier et al. 2021), and pairing by seed gives both nets the same subset and order.")
    if both.empty:
        return (f"- **Seeds**: `data_seed` is not recorded, so whether seeds vary the data is unknown; comparisons are "
                f"paired by seed. {why}")
    follow = int((both["data_seed"] == both["seed"]).sum())
    if follow == len(both):
        return (f"- **Seeds vary initialisation and data together** (`data_seed` = `seed` in all {len(both)} runs): "
                f"a cell's spread covers subset, order and augmentation; ViT − CNN and pretraining gains are paired "
                f"by seed. {why}")
    fixed = len(both) - follow
    return (f"- **Seeds**: `data_seed` differs from `seed` in {fixed} of {len(both)} runs that record it: their "
            f"spread covers initialisation only, so intervals understate the data's variance; comparisons are "
            f"paired by seed. {why}")


def _interval_line(runs: pd.DataFrame, source: str) -> str:
    done = stats.usable(runs)
    with_predictions = int(done["predictions_path"].notna().sum()) if "predictions_path" in done else 0
    text = (f"- **Intervals**: 95% Student-t intervals over seeds for n ≥ 2 (of the differences paired by seed for "
            f"ViT − CNN and pretraining gains); at n = 1, {stats.TEST_SAMPLING}: a Wilson interval over the test "
            f"images for an accuracy, and for a difference a paired bootstrap over the test images "
            f"({stats.N_RESAMPLES:,} resamples, seed {stats.SEED}) with an exact McNemar test, from both runs' "
            f"`predictions.npz`. A predictions file is recorded for {with_predictions} of the "
            f"{_plural(len(done), 'run')} with a test accuracy")
    if source.startswith("W&B"):
        text += " (read from W&B: the predictions files stay in the run folders, so n = 1 differences have no interval)"
    return text + (". Why: the t interval keeps its 95% coverage at every n for normal data, while a percentile "
                   "bootstrap over 2–5 seeds covers far less (Hesterberg 2015); McNemar's test is the test for two "
                   "classifiers on one test set (Dietterich 1998).")


def _recipe_line(target: pd.DataFrame) -> str:
    done = target[target["status"] == "completed"]
    recipe = [c for c in done if c.startswith("spec/") and c.removeprefix("spec/") not in (*NET_FIELDS,
                                                                                            *PLACEMENT_FIELDS)]
    vit, cnn = (done[done["arch"] == arch].set_index(stats.PAIR)[recipe] for arch in ("vit", "cnn"))
    pairs = vit.join(cnn, how="inner", lsuffix="|vit", rsuffix="|cnn")
    differing = []
    for col in recipe:
        a, b = pairs[f"{col}|vit"], pairs[f"{col}|cnn"]
        known = a.notna() & b.notna()
        if (a[known].astype(str) != b[known].astype(str)).any():
            differing.append(f"`{col.removeprefix('spec/')}` (ViT {', '.join(_values(a[known]))}; "
                             f"CNN {', '.join(_values(b[known]))})")
    why = ("Why: recipe choices (augmentation, regularisation, schedule) matter most for ViTs on small data "
           "(DeiT, Touvron et al. 2021; AugReg, Steiner et al. 2022), so a per-model recipe would decide the "
           "comparison.")
    if differing:
        return f"- **One recipe for both nets**: paired ViT and CNN runs differ in {'; '.join(differing)}. {why}"
    return (f"- **One recipe for both nets**: every recipe field of the spec is identical between paired ViT and CNN "
            f"runs ({_plural(len(pairs), 'pair')}; the fixed fields are listed under Setup). {why}")


def _precision_line(runs: pd.DataFrame, target: pd.DataFrame) -> list[str]:
    requested = _values(_recorded(target, "spec/precision"))
    resolved = _values(_recorded(target, "precision"))
    hardware = _values(_recorded(target, "hardware"))
    lines = [f"- **Precision**: requested {', '.join(requested) or 'not recorded'}; resolved "
             f"{', '.join(resolved) or 'not recorded'}, once per sweep (bf16 only where the hardware runs it natively, "
             "and on a CPU with native bf16 only where it timed faster on the sweep's nets), so both nets share it. Hardware: " + ("; ".join(hardware) or "not recorded") + ". Why: a precision one net "
             "runs natively and the other emulates, or that differs between paired runs, would measure the "
             "arithmetic, not the nets."]
    bad = stats.precision_mismatches(runs)
    if len(bad):
        pairs = "; ".join(f"{r['vit_model']} {r['vit_precision']} vs {r['cnn_model']} {r['cnn_precision']} "
                          f"({condition_label(r['pretraining'], r['pretrain_size'])}, "
                          f"{100 * r['train_fraction']:g}%, seed {r['seed']})" for _, r in bad.iterrows())
        lines.append(f"- **Warning, fairness violation**: {_plural(len(bad), 'paired run')} differ in resolved "
                     f"precision: {pairs}. Their differences mix the nets with the arithmetic.")
    return lines


def protocol_section(collection: Collection) -> list[str]:
    """Markdown lines: the protocol, as the runs' own fields state it, each with one line of justification."""
    runs = collection.runs
    target = stats.targets(runs)
    return [
        "## Protocol", "",
        _budget_line(target),
        _selection_line(target),
        _flag_line(runs),
        _seed_line(target),
        _interval_line(runs, collection.source),
        f"- **Fits**: test error err(n) = {stats.FORMS[3]} per model and pretraining, on the unflagged cells' "
        f"runs; {stats.FORMS[2]} (c = 0) when the first is not identified. A fit is identified only if it "
        f"converged, no parameter sits on a bound (a ≥ 0, 0 ≤ b ≤ {stats.B_MAX:g}, 0 ≤ c ≤ 1) and the distinct training sizes "
        f"exceed its parameters by at least {stats.MIN_RESIDUAL_DOF}; otherwise it is reported as not identified, "
        "and no curve or crossover is drawn from it. Why: a parameter on its bound, or as many parameters as "
        "sizes, lets the curve pass through the points without saying anything about a law.",
        "- **No extrapolation**: a crossover is searched only between the smallest and the largest training size "
        "both fits cover; beyond them the report says \"no crossover in the measured range\". Why: a fitted law is "
        "evidence only where it has points.",
        _recipe_line(target),
        *_precision_line(runs, target),
    ]


# --------------------------------------------------------------- completeness
def completeness_section(collection: Collection) -> list[str]:
    """Markdown lines: how many expected runs finished, and which cells and seeds are missing, failed or diverged."""
    runs = collection.runs
    lines = ["## Completeness", ""]
    if collection.plan is None:
        counts = stats.status_counts(runs)
        lines.append(f"- {collection.plan_note}. Finished: {len(stats.targets(runs))} fine-tuning runs "
                     f"({counts['completed']} completed, {counts['failed']} failed, {counts['diverged']} diverged) "
                     f"and {_plural(int((runs['role'] == 'pretrain').sum()), 'upstream run')}; missing runs cannot "
                     "be listed.")
        return lines
    plan = collection.plan
    state = collect.plan_status(plan, runs)
    counts = state["state"].value_counts()
    n_train, n_pre = int((state["role"] == "train").sum()), int((state["role"] == "pretrain").sum())
    lines.append(f"- `{collect.PLAN_FILE}` ({plan.file or 'sweep file unknown'}) expects {len(state)} runs "
                 f"({n_train} fine-tuning, {n_pre} upstream pretraining): "
                 + ", ".join(f"{int(counts.get(s, 0))} {s}" for s in ("completed", "failed", "diverged", "missing"))
                 + ".")
    extra = sorted(set(runs["run_id"]) - set(plan.runs["run_id"]))
    if extra:
        lines.append(f"- {_plural(len(extra), 'run')} in the folder {'is' if len(extra) == 1 else 'are'} not in "
                     f"`{collect.PLAN_FILE}` (from another version of the sweep file); the statistics include "
                     f"{'it' if len(extra) == 1 else 'them'}.")
    open_runs = state[state["state"] != "completed"]
    if open_runs.empty:
        lines.append("- Every expected run has completed.")
        return lines
    lines += ["", "| role | dataset | model | pretraining | fraction | missing seeds | failed seeds | diverged seeds |",
              "|---|---|---|---|---|---|---|---|"]
    keys = ["role", "dataset", "model", "pretraining", "pretrain_size", "train_fraction"]
    for key, group in _in_condition_order(open_runs, ["role", "model", "train_fraction"]).groupby(
            keys, dropna=False, sort=False):
        role, dataset, model, pre, size, fraction = key
        seeds = {s: ", ".join(_values(group.loc[group["state"] == s, "seed"])) or "–"
                 for s in ("missing", "failed", "diverged")}
        lines.append(f"| {role} | {dataset} | {model} | {condition_label(pre, size)} | {100 * fraction:g}% | "
                     f"{seeds['missing']} | {seeds['failed']} | {seeds['diverged']} |")
    return lines


# --------------------------------------------------------------- findings
def _where(row: pd.Series, multi: bool) -> str:
    """"At 1% (540 images), scratch" (with the dataset when the sweep has several)."""
    images = "" if pd.isna(row["n_images"]) else f" ({_images(row['n_images'])} images)"
    dataset = f" on {row['dataset']}" if multi else ""
    return (f"At {100 * row['train_fraction']:g}%{images}{dataset}, "
            f"{condition_label(row['pretraining'], row['pretrain_size'])}")


def gap_sentence(row: pd.Series, multi: bool = False) -> str:
    """One paired ViT − CNN difference as a sentence: a direction only with its n and interval."""
    vit, cnn = row["vit_model"], row["cnn_model"]
    where = _where(row, multi)
    flag = (f" ({tables.FLAG} at least one of the two cells was still improving when its budget ended)"
            if row["flagged"] else "")
    diff = f"ViT − CNN {_signed(row['mean'])} points, {interval_text(row)}"
    if not _has_interval(row):
        return f"{where}: {diff}; with no interval, no direction is stated{flag}."
    if round(100 * row["mean"], 1) == 0:
        return f"{where}: {vit} and {cnn} are level ({diff}){flag}."
    leader, other = (vit, cnn) if row["mean"] > 0 else (cnn, vit)
    text = f"{where}: {leader} is ahead of {other} by {abs(100 * row['mean']):.1f} points ({diff})"
    if not _excludes_zero(row):
        text += "; the interval includes 0, so the order is not established"
    elif row["interval"] == "test":
        text += ("; the interval excludes 0 for these test images, but with one seed the variation between seeds "
                 "is not measured")
    else:
        text += "; the interval excludes 0"
    return text + f"{flag}."


def gap_findings(runs: pd.DataFrame, diffs: pd.DataFrame, expected: pd.DataFrame | None) -> Iterable[str]:
    """One sentence per training size of every (condition, ViT, CNN) pair; sizes and conditions without a pair say so.

    The sizes are those with a run or, given `expected` (the plan's runs), expected to have one.
    """
    cells = stats.targets(runs)[stats.CELL]
    multi = cells["dataset"].nunique() > 1
    if expected is not None:
        cells = pd.concat([cells, expected.loc[expected["role"] == "train", stats.CELL]])
    conditions = _in_condition_order(cells[stats.CONDITION].drop_duplicates(), [])
    for _, key in conditions.iterrows():
        cond = stats.select(cells, **key)
        fractions = sorted(cond["train_fraction"].unique())
        models = models_in_order(cond)
        for vit in (m for m, arch in models if arch == "vit"):
            for cnn in (m for m, arch in models if arch == "cnn"):
                pair = stats.select(diffs, vit_model=vit, cnn_model=cnn, **key)
                for fraction in fractions:
                    hit = pair[pair["train_fraction"] == fraction]
                    if len(hit):
                        yield gap_sentence(hit.iloc[0], multi)
                        continue
                    where = (f"{100 * fraction:g}%{f' on {key.dataset}' if multi else ''}, "
                             f"{condition_label(key.pretraining, key.pretrain_size)}")
                    yield f"At {where}: no completed {vit}/{cnn} pair with the same seed yet ({vit} − {cnn} missing)."


def pretraining_findings(gains: pd.DataFrame) -> Iterable[str]:
    """The paired gain of each pretraining over scratch, per model and size, with its n and interval."""
    multi = gains["dataset"].nunique() > 1
    for _, row in _in_condition_order(gains, ["model", "train_fraction"]).iterrows():
        where = _where(row, multi).replace(", ", " with ", 1) + " pretraining"
        gain = f"{_signed(row['mean'])} points over scratch ({interval_text(row)})"
        if not _has_interval(row):
            verdict = "with no interval, no direction is stated"
        elif _excludes_zero(row):
            verdict = "the interval excludes 0"
        else:
            verdict = "the interval includes 0, so no effect is established"
        flag = f" ({tables.FLAG} still improving when its budget ended)" if row["flagged"] else ""
        yield f"{where}: {row['model']} changes by {gain}; {verdict}{flag}."


def upstream_findings(runs: pd.DataFrame) -> Iterable[str]:
    """The upstream pretraining runs' own validation accuracy, and whether they plateaued."""
    for _, up in stats.upstream_summary(runs).iterrows():
        what = f"{up['model']} on {condition_label(up['pretraining'], up['pretrain_size'])} (run `{up['run_id']}`)"
        acc = "not recorded" if pd.isna(up["val_acc1"]) else f"{100 * up['val_acc1']:.1f}%"
        steps = ("" if pd.isna(up["train_steps"]) else
                 f" after {up['train_steps']:,.0f} of {up['budget_steps']:,.0f} steps")
        cost = ("" if pd.isna(up["train_flops"]) else
                f" ({si_label(up['train_flops'], 'FLOPs')} of training, not counted in its fine-tuning runs' FLOPs)")
        if pd.isna(up["improving_at_end"]):
            plateau = "whether it plateaued is not recorded"
        elif up["improving_at_end"]:
            plateau = ("it was still improving when its budget ended: the upstream task is not yet learned, "
                       "so its fine-tuning gains may understate what this pretraining can do")
        else:
            plateau = "it had plateaued (not improving at the end of its budget)"
        status = "" if up["status"] == "completed" else f" [{up['status']}]"
        yield (f"Upstream {what}{status}: its own validation accuracy {acc}{steps}{cost}; {plateau}; "
               f"{_plural(int(up['n_finetuned']), 'fine-tuning run')} start from it.")


def fit_findings(fits: pd.DataFrame) -> Iterable[str]:
    """Each curve's fit, or why it is not identified."""
    multi = fits["dataset"].nunique() > 1
    for _, f in _in_condition_order(fits, ["model"]).iterrows():
        who = (f"{f['model']} · {condition_label(f['pretraining'], f['pretrain_size'])}"
               + (f" on {f['dataset']}" if multi else ""))
        if not f["identified"]:
            yield f"Fit {who}: not identified ({f['reason']}); no curve is drawn."
            continue
        law = f"{f['a']:.3g}·n^(−{f['b']:.3f})" + (f" + {f['c']:.3f}" if f["n_params"] == 3 else "")
        kept = f", {_plural(int(f['n_flagged_sizes']), 'flagged size')} kept out" if f["n_flagged_sizes"] else ""
        yield (f"Fit {who}: err(n) = {law} ({f['form']}; {f['n_sizes']} sizes, {f['dof']} residual degrees of "
               f"freedom, {_images(f['n_min'])}–{_images(f['n_max'])} images{kept}).")


def _nearest(diffs: pd.DataFrame, cond: dict[str, object], sizes: Iterable[float], bracket: bool = False) -> str:
    """The measured ViT − CNN differences at the training sizes (n_images) nearest to `sizes`.

    With `bracket`, the nearest measured size at or below and at or above each of `sizes`.
    """
    rows = stats.select(diffs, **cond)
    rows = rows[rows["n"] > 0]
    if rows.empty:
        return ""
    picked = []
    for size in sizes:
        below, above = rows[rows["n_images"] <= size], rows[rows["n_images"] >= size]
        sides = [below["n_images"].idxmax(), above["n_images"].idxmin()] if bracket and len(below) and len(above) \
            else [(rows["n_images"] - size).abs().idxmin()]
        picked += [i for i in sides if i not in picked]
    parts = [f"at {_images(rows.loc[i, 'n_images'])} images ViT − CNN {_signed(rows.loc[i, 'mean'])} points "
             f"({interval_text(rows.loc[i])})" for i in sorted(picked, key=lambda i: rows.loc[i, "n_images"])]
    return "; measured: " + "; ".join(parts)


def crossover_findings(cross: pd.DataFrame, diffs: pd.DataFrame, fits: pd.DataFrame) -> Iterable[str]:
    """One sentence per (condition, ViT, CNN): the crossover inside the measured range, or why there is none.

    A sentence about which fitted curve is lower ends with the measured paired
    differences (n and interval) at the sizes around the point it names.
    """
    multi = cross["dataset"].nunique() > 1
    for _, c in _in_condition_order(cross, ["vit_model", "cnn_model"]).iterrows():
        cond = {k: c[k] for k in ("dataset", "pretraining", "pretrain_size", "vit_model", "cnn_model")}
        where = f"{c['dataset']}, " if multi else ""
        who = f"{c['vit_model']} vs {c['cnn_model']} ({where}{condition_label(c['pretraining'], c['pretrain_size'])})"
        measured = f"{_images(c['n_min'])}–{_images(c['n_max'])} images"
        if c["status"] == "not_identified":
            cond_fits = stats.select(fits, **{k: c[k] for k in stats.CONDITION})
            unidentified = [m for m in (c["vit_model"], c["cnn_model"])
                            if not stats.select(cond_fits, model=m)["identified"].all()]
            yield (f"Crossover {who}: not estimated, the fit of {' and '.join(unidentified)} is not identified "
                   "(see above)." if unidentified else f"Crossover {who}: not estimated, {c['note']}.")
        elif c["status"] == "none":
            yield (f"Crossover {who}: no crossover in the measured range ({measured}), where the ViT's fitted error "
                   f"stays above the CNN's{_nearest(diffs, cond, (c['n_min'], c['n_max']))}.")
        elif c["status"] == "vit_ahead":
            overtakes = not math.isnan(c["cnn_overtakes"])
            after = (f"and the CNN's falls below it at ≈ {_images(c['cnn_overtakes'])} images" if overtakes
                     else "and stays lower over the range")
            around = (c["n_min"], c["cnn_overtakes"] if overtakes else c["n_max"])
            yield (f"Crossover {who}: reversed, the ViT's fitted error is lower at {_images(c['n_min'])} images "
                   f"{after} (measured range {measured}){_nearest(diffs, cond, around, bracket=True)}.")
        else:
            yield (f"Crossover {who}: the fitted error curves cross at ≈ {_images(c['n'])} training images, inside "
                   f"the measured range ({measured}); above it the ViT's fitted error is lower"
                   f"{_nearest(diffs, cond, (c['n'],), bracket=True)}; the crossover itself has no interval, the "
                   "measured differences carry the uncertainty.")


def caveat_findings(runs: pd.DataFrame, summary: pd.DataFrame, fits: pd.DataFrame) -> Iterable[str]:
    """Explicit statements where the evidence is weak."""
    cells = summary[summary["n"] > 0]
    single = int((cells["n"] == 1).sum())
    if len(cells) and single == len(cells):
        yield (f"Every cell has a single seed: its intervals are {stats.TEST_SAMPLING}, and the variation between "
               "seeds (initialisation, subset, order) is not measured.")
    elif single:
        yield (f"{single} of {len(cells)} cells have a single seed: their intervals, where predictions exist, cover "
               "test sampling only.")
    sizes = int(stats.usable(runs)["train_fraction"].nunique())
    needed = 2 + stats.MIN_RESIDUAL_DOF
    if sizes == 0:
        yield "No completed runs: there is nothing to compare."
    elif sizes < needed:
        yield (f"Only {_plural(sizes, 'training-set size')} measured: an identified fit needs at least {needed} "
               f"distinct sizes ({needed + 1} for {stats.FORMS[3]}), so no curve or crossover is estimated.")
    unfitted = fits[~fits["identified"]]
    if 0 < len(unfitted) < len(fits):
        yield f"{len(unfitted)} of {len(fits)} (model, pretraining) curves are not identified."
    counts = stats.status_counts(runs)
    if counts["failed"] or counts["diverged"]:
        yield (f"{counts['failed']} failed and {counts['diverged']} diverged runs are excluded from every "
               "statistic (listed under Setup).")
    target = stats.targets(runs)
    repeats = target.groupby([*stats.CELL, "seed"], dropna=False).size()
    if (repeats > 1).any():
        yield (f"{int((repeats > 1).sum())} (cell, seed) combinations have several runs (other spec fields differ): "
               "their cells pool over those runs.")


def findings_section(runs: pd.DataFrame, expected: pd.DataFrame | None = None,
                     runs_dir: Path | None = None) -> list[str]:
    """Markdown lines: for each size, who is ahead with its n and interval; pretraining; upstream; fits;
    robustness, calibration, ablations and interpretability (from the runs' files, when `runs_dir` has them);
    caveats."""
    diffs = stats.arch_differences(runs)
    gains = stats.pretraining_gains(runs)
    fits = stats.power_law_fits(runs)
    cross = stats.crossovers(runs, fits=fits)
    lines = ["## Findings", "", "### ViT vs CNN at each training size", ""]
    lines += [f"- {s}" for s in gap_findings(runs, diffs, expected)]
    if diffs.empty:
        lines.append("- No paired ViT − CNN comparison: no ViT and CNN runs completed with the same dataset, "
                     "fraction, pretraining and seed.")
    if len(gains):
        lines += ["", "### Pretraining", ""] + [f"- {s}" for s in pretraining_findings(gains)]
    upstream = list(upstream_findings(runs))
    if upstream:
        lines += ["", "### Upstream pretraining runs", ""] + [f"- {s}" for s in upstream]
    if len(fits):
        lines += ["", "### Power-law fits and crossover", ""]
        lines += [f"- {s}" for s in fit_findings(fits)] + [f"- {s}" for s in crossover_findings(cross, diffs, fits)]
    if runs_dir is not None:
        for title, findings in (("Robustness and calibration", robustness_report.robustness_findings),
                                ("Ablations of the ViT's steps", ablations.ablation_findings),
                                ("Where each net looks", interpret_figures.interpret_findings)):
            found = findings(runs, runs_dir)
            if found:
                lines += ["", f"### {title}", ""] + [f"- {s}" for s in found]
    caveats = list(caveat_findings(runs, stats.summarize(runs), fits))
    if caveats:
        lines += ["", "### Caveats", ""] + [f"- {s}" for s in caveats]
    return lines


# --------------------------------------------------------------- report
def figure_title(name: str) -> tuple[str, str]:
    """A figure's title and caption, from the module that draws it."""
    for registry in (plots.FIGURES, robustness_report.FIGURES, interpret_figures.FIGURES):
        if name in registry:
            return registry[name].title, getattr(registry[name], "caption", "")
    raise KeyError(name)


def build_report(collection: Collection, sweep: str, built: list[Table], table_skips: dict[str, str],
                 figures: dict[str, list[Path]], figure_skips: dict[str, str],
                 runs_dir: Path | None = None) -> str:
    """The whole report.md text."""
    lines = [f"# Sweep `{sweep}`: ViT vs CNN", ""]
    lines += setup_section(collection, sweep) + [""]
    lines += protocol_section(collection) + [""]
    lines += completeness_section(collection) + [""]
    lines += findings_section(collection.runs, collection.expected_runs, runs_dir) + [""]
    lines += ["## Tables", ""]
    for table in built:
        link = f"{tables.FOLDER}/{table.name}"
        lines += [table.to_markdown(), f"[Markdown]({link}.md) · [LaTeX]({link}.tex)", ""]
    lines += [f"- Table `{name}` skipped: {reason}." for name, reason in table_skips.items()]
    lines += ["", "## Figures", ""]
    for name, paths in figures.items():
        png, pdf = (p.name for p in paths)
        title, caption = figure_title(name)
        lines += [f"![{title}]({plots.FOLDER}/{png})", "",
                  f"*{title}*{' ' + caption if caption else ''} ([PDF]({plots.FOLDER}/{pdf}))", ""]
    lines += [f"- Figure `{name}` skipped: {reason}." for name, reason in figure_skips.items()]
    return "\n".join(lines).replace("\n\n\n", "\n\n").rstrip("\n") + "\n"


# --------------------------------------------------------------- W&B
def report_wandb_mode(requested: str, runs: pd.DataFrame) -> str:
    """The report run's W&B mode: as asked, or for `auto` the runs' own: off when every run had W&B off, their
    one explicit mode (online | offline) when they share it, else what a run's `auto` resolves to here
    (WANDB_MODE, else online with credentials, else offline).

    Raises:
        common.wandb_mode.ModeError: `auto` and WANDB_MODE holds a value W&B does not know.
    """
    if requested != "auto":
        return requested
    modes = set(runs["spec/wandb"].dropna()) if "spec/wandb" in runs else set()
    if modes and modes <= {"off"}:
        return "off"
    if len(modes - {"off"}) == 1 and "auto" not in modes:
        return (modes - {"off"}).pop()
    return resolve_wandb_mode("auto")


def log_to_wandb(mode: str, sweep: str, built: list[Table], figures: dict[str, list[Path]], folder: Path) -> None:
    """Log the tables and figures to one W&B run (job_type "report", group SWEEP); its files (offline: what
    `make sync` uploads) in `folder/wandb/`."""
    import wandb

    run = wandb.init(project=wandb_project(), job_type="report", group=sweep, name=f"{sweep}-report", mode=mode,
                     dir=str(folder))
    payload = {t.name: wandb.Table(columns=t.header, data=[[c.text for c in row] for row in t.rows]) for t in built}
    payload.update({name: wandb.Image(str(paths[0])) for name, paths in figures.items()})
    run.log(payload)
    run.finish()


# --------------------------------------------------------------- driver
def write_all_tables(collection: Collection, out_dir: Path,
                     runs_dir: Path | None) -> tuple[list[Table], dict[str, str]]:
    """Every table with data: the comparison's (Tables 1-4) and, from the runs' files when `runs_dir` is given,
    robustness, calibration and the ablations."""
    built, skipped = tables.write_tables(collection.runs, out_dir, collection.expected_runs)
    if runs_dir is not None:
        makers = {**robustness_report.table_makers(runs_dir),
                  "table_a1_ablations": functools.partial(ablations.ablation_table, runs_dir=runs_dir)}
        made, more_skipped = write_outputs(makers, collection.runs, out_dir, (".md", ".tex"), tables.save_table,
                                           "table")
        built, skipped = [*built, *made.values()], {**skipped, **more_skipped}
    return built, skipped


def write_all_figures(collection: Collection, out_dir: Path,
                      runs_dir: Path | None) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Every figure with data: the comparison's (Figures 1-5) and, from the runs' files when `runs_dir` is
    given, robustness, calibration and interpretability."""
    figures, skipped = plots.write_figures(collection.runs, out_dir)
    if runs_dir is not None:
        makers = {**robustness_report.figure_makers(runs_dir), **interpret_figures.figure_makers(runs_dir)}
        made, more_skipped = write_outputs(makers, collection.runs, out_dir, (".png", ".pdf"), plots.save_figure,
                                           "figure")
        figures, skipped = {**figures, **made}, {**skipped, **more_skipped}
    return figures, skipped


def make_report(collection: Collection, sweep: str, results_dir: Path | str, wandb_mode: str = "off",
                runs_dir: Path | str | None = None) -> Path:
    """Write runs.csv, tables, figures and report.md for one sweep (and log them to W&B unless `wandb_mode`,
    resolved by `report_wandb_mode`, is off).

    `runs_dir` holds the runs' folders (their predictions, robustness and explain files feed the
    generalization tables and figures); None when the runs came from W&B, which has no such files.

    Returns:
        The path of report.md.
    """
    mode = report_wandb_mode(wandb_mode, collection.runs)  # a bad WANDB_MODE fails before anything is written
    out = Path(results_dir) / sweep
    collect.save_runs(collection.runs, results_dir, sweep)
    files_dir = Path(runs_dir) if runs_dir is not None else None
    built, table_skips = write_all_tables(collection, out / tables.FOLDER, files_dir)
    figures, figure_skips = write_all_figures(collection, out / plots.FOLDER, files_dir)
    text = build_report(collection, sweep, built, table_skips, figures, figure_skips, files_dir)
    path = files.write_text(out / "report.md", text)
    if mode != "off":
        log_to_wandb(mode, sweep, built, figures, out)
    return path
