"""Ablations of the ViT's steps in the layout of the ViT paper's Table 8, with patch shuffle beside them.

A variant is read from a run's resolved architecture (`architecture/*`):
position embedding (learned 1-D | 2-D sin-cos | none), pooling (class token
| average of the patch tokens, with or without an unused class token) and
patch size. Runs are compared within a group: the same dataset, pretraining,
training fraction and every other architecture field (width, depth, heads,
image size); a group is shown when it holds at least two variants.

Each variant's test accuracy is compared, paired by seed, with its baseline:
the paper's default variant of the same patch size (learned position
embedding, class token); that default itself, at a patch size other than the
group's reference (the patch size with the most variants, the smallest on a
tie), with the reference patch size's default, so patch size is ablated too
(`experiments/sweeps/ablations_patch.yaml`). Patch shuffle tests the one exact prediction the steps make: without
a position embedding the encoder is permutation-equivariant over the patch
tokens, and the class token's output or the patches' average is invariant,
so shuffling whole patches cannot change the prediction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import estimates, stats
from analysis.estimates import Estimate, ImageSample
from analysis.outputs import NoData, condition_key
from analysis.robustness_report import CLEAN, SHUFFLE, CellRuns
from analysis.run_files import ROBUSTNESS, RunArrays
from analysis.tables import Cell, Table

ARCH = "architecture/"
VARIANT_FIELDS = ("patch_size", "pos_embed", "pool", "class_token")
POS_EMBED = {"learn": "learned 1-D", "sincos2d": "2-D sin-cos", "none": "none"}  # in the table's order
CLEAN_SUBSET = "occlusion/0/acc1"  # clean accuracy on the robustness subset: nothing occluded
SHUFFLE_GRID = "shuffle/grid"
SHUFFLE_GAP = "shuffle_minus_clean"  # per run: shuffle/acc1 − occlusion/0/acc1, the same images
PAPER_TABLE8 = ("ViT paper Table 8 (ViT-B/16, ImageNet 5-shot linear, %): no position embedding 61.38, learned 1-D "
                "64.21, 2-D 64.00, relative 64.03 (none clearly worse, the others within noise). Its App. D finds "
                "class token and average pooling equal once each has its own learning rate; here every variant "
                "trains with the same recipe.")


@dataclass(frozen=True)
class Variant:
    """One ViT architecture variant (the fields the ablations vary)."""

    patch_size: int
    pos_embed: str
    pool: str
    class_token: bool

    @property
    def default(self) -> Variant:
        """The paper's default of the same patch size: learned position embedding, class token."""
        return Variant(self.patch_size, "learn", "token", True)

    @property
    def is_default(self) -> bool:
        return self == self.default

    @property
    def pos_label(self) -> str:
        return POS_EMBED.get(self.pos_embed, self.pos_embed)

    @property
    def pool_name(self) -> str:
        """"class token" | "avg pool" | ...: the head's input."""
        return "class token" if self.pool == "token" else f"{self.pool} pool"

    @property
    def pool_label(self) -> str:
        """`pool_name`, saying so where a class token rides along unused."""
        unused = self.pool != "token" and self.class_token
        return self.pool_name + (" (+ unused class token)" if unused else "")

    def describe(self, fields: list[str] | tuple[str, ...]) -> str:
        """`fields` of VARIANT_FIELDS in words, e.g. ["pos_embed", "pool"] -> "pos. none, avg pool"."""
        words = {"patch_size": f"patch {self.patch_size}", "pos_embed": f"pos. {self.pos_label}",
                 "pool": self.pool_name,
                 "class_token": "with class token" if self.class_token else "no class token"}
        return ", ".join(words[name] for name in fields)

    @property
    def label(self) -> str:
        """"no position embedding, class token, patch 4"."""
        pos = "no position embedding" if self.pos_embed == "none" else f"{self.pos_label} position embedding"
        return f"{pos}, {self.pool_label}, patch {self.patch_size}"

    def sort_key(self) -> tuple:
        """Patch size, then position embedding in `POS_EMBED` order, class token before average pooling."""
        order = list(POS_EMBED)
        pos = order.index(self.pos_embed) if self.pos_embed in order else len(order)
        return self.patch_size, pos, self.pos_embed, self.pool != "token", self.pool, not self.class_token


def variant_of(run: pd.Series) -> Variant | None:
    """The run's variant from its `architecture/*` columns; None when one of them is missing."""
    values = [run.get(ARCH + name) for name in VARIANT_FIELDS]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    patch_size, pos_embed, pool, class_token = values
    return Variant(int(patch_size), str(pos_embed), str(pool), bool(class_token))


def shuffle_invariance_expected(variant: Variant, img_size: float, grid: float) -> bool:
    """No position embedding, and (when known) shuffle cells made of whole patches."""
    if variant.pos_embed != "none":
        return False
    if math.isnan(img_size) or math.isnan(grid):
        return True
    side, rest = divmod(int(img_size), int(grid))
    return rest == 0 and side % variant.patch_size == 0


# --------------------------------------------------------------- groups
@dataclass
class Group:
    """The ViT runs that differ only in the ablated fields.

    Attributes:
        cell: the runs (with a `variant` column and the shuffle gap) and their files.
        variants: the variants present, in table order.
    """

    cell: CellRuns
    variants: list[Variant]

    @property
    def reference_patch(self) -> int:
        """The patch size with the most variants (the smallest on a tie): its default is the group's default."""
        sizes = sorted({v.patch_size for v in self.variants})
        return max(sizes, key=lambda size: (sum(v.patch_size == size for v in self.variants), -size))

    def baseline(self, variant: Variant) -> Variant | None:
        """What `variant` is compared with: the default of its patch size, or for that default, the default of
        the reference patch size; None for the group's default itself."""
        if not variant.is_default:
            return variant.default
        if variant.patch_size == self.reference_patch:
            return None
        return Variant(self.reference_patch, "learn", "token", True)

    def runs_of(self, variant: Variant, column: str) -> pd.DataFrame:
        """The variant's runs with a finite `column`, by seed."""
        runs = self.cell.runs[self.cell.runs["variant"] == variant]
        if column not in runs:
            return runs.iloc[0:0].assign(**{column: pd.Series(dtype=float)})
        return runs[np.isfinite(runs[column].astype(float))].sort_values("seed", kind="mergesort")

    @property
    def models(self) -> str:
        return " / ".join(sorted(set(self.cell.runs["model"])))


def groups_of(runs: pd.DataFrame, runs_dir: Path | str) -> list[Group]:
    """The groups with at least two variants, in dataset, condition, fraction and model order."""
    vits = stats.usable(runs, CLEAN)
    vits = vits[vits["arch"] == "vit"].copy()
    vits["variant"] = [variant_of(run) for _, run in vits.iterrows()]
    vits = vits[vits["variant"].notna()]
    if SHUFFLE in vits and CLEAN_SUBSET in vits:
        vits[SHUFFLE_GAP] = vits[SHUFFLE].astype(float) - vits[CLEAN_SUBSET].astype(float)
    fixed = sorted(c for c in runs if c.startswith(ARCH) and c.removeprefix(ARCH) not in VARIANT_FIELDS)
    files = RunArrays(runs_dir)
    found = []
    by = ["dataset", "pretraining", "pretrain_size", "train_fraction", *fixed]
    for key, group in vits.groupby(by, dropna=False, sort=False):
        variants = sorted(set(group["variant"]), key=Variant.sort_key)
        if len(variants) >= 2:
            keys = dict(zip(by[:4], key[:4]))
            found.append(Group(CellRuns(keys, group, files, None), variants))
    return sorted(found, key=lambda g: (g.cell.keys["dataset"], condition_key(g.cell.keys["pretraining"],
                                                                             g.cell.keys["pretrain_size"]),
                                        g.cell.keys["train_fraction"], g.models))


# --------------------------------------------------------------- estimates
def accuracy(group: Group, variant: Variant) -> Estimate:
    """Test accuracy: Student-t over seeds, or Clopper-Pearson over the test images at n = 1."""
    found = group.runs_of(variant, CLEAN)
    return estimates.cell_estimate(found[CLEAN].astype(float).tolist(), lambda: group.cell.clean(found.iloc[0]))


def difference_to_default(group: Group, variant: Variant) -> Estimate:
    """Test accuracy of `variant` − that of its baseline (`Group.baseline`), paired by seed."""
    mine = group.runs_of(variant, CLEAN).set_index("seed")
    default = group.runs_of(group.baseline(variant), CLEAN).set_index("seed")
    seeds = sorted(set(mine.index) & set(default.index))
    differences = [float(mine.at[s, CLEAN]) - float(default.at[s, CLEAN]) for s in seeds]

    def single() -> tuple[ImageSample, ImageSample] | None:
        pair = group.cell.clean(mine.loc[seeds[0]]), group.cell.clean(default.loc[seeds[0]])
        return None if None in pair else pair

    return estimates.paired_estimate(differences, single)


def shuffle_accuracy(group: Group, variant: Variant) -> Estimate:
    found = group.runs_of(variant, SHUFFLE)
    return estimates.cell_estimate(found[SHUFFLE].astype(float).tolist(), lambda: group.cell.shuffle(found.iloc[0]))


def shuffle_gap(group: Group, variant: Variant) -> Estimate:
    """Shuffled − clean accuracy on the same subset images: over seeds, or a paired bootstrap at n = 1."""
    found = group.runs_of(variant, SHUFFLE_GAP)

    def single() -> tuple[ImageSample, ImageSample] | None:
        run = found.iloc[0]
        pair = group.cell.shuffle(run), group.cell.occlusion(run, 0.0)
        return None if None in pair else pair

    return estimates.paired_estimate(found[SHUFFLE_GAP].astype(float).tolist(), single)


def shuffle_changes(group: Group, variant: Variant) -> tuple[int, int]:
    """(images whose correctness shuffling changed, images compared), summed over the variant's runs' arrays."""
    changed = compared = 0
    for _, run in group.runs_of(variant, CLEAN).iterrows():
        rob = group.cell.files.get(run, ROBUSTNESS)
        clean = None if rob is None else np.flatnonzero(np.isclose(rob["occlusion_fractions"], 0.0))
        if clean is None or clean.size == 0:
            continue
        changed += int((rob["shuffle_correct"] != rob["occlusion_correct"][clean[0]]).sum())
        compared += int(rob["shuffle_correct"].size)
    return changed, compared


def _invariance_expected(group: Group, variant: Variant) -> bool:
    runs = group.runs_of(variant, CLEAN)
    img_size = float(runs[ARCH + "img_size"].iloc[0]) if ARCH + "img_size" in runs else math.nan
    grid = float(runs[SHUFFLE_GRID].iloc[0]) if SHUFFLE_GRID in runs else math.nan
    return shuffle_invariance_expected(variant, img_size, grid)


# --------------------------------------------------------------- the table
def _invariance_text(group: Group, variant: Variant) -> str:
    changed, compared = shuffle_changes(group, variant)
    expected = "yes" if _invariance_expected(group, variant) else "no"
    return f"{expected}; {changed:,} of {compared:,} changed" if compared else f"{expected}; –"


def ablation_table(runs: pd.DataFrame, runs_dir: Path | str) -> Table:
    """Table A1: the ViT variants of the sweep, as the ViT paper's Table 8, with patch shuffle.

    Rows: per group (setting and model), each variant. Columns: test accuracy
    mean [95% interval] and n; Δ to the variant's baseline (`Group.baseline`),
    paired by seed (bold when its interval excludes 0); patch-shuffle
    accuracy; shuffled − clean on the same images; whether shuffle invariance
    is expected and how many images changed correctness.

    Raises:
        NoData: no setting has two or more ViT variants.
    """
    groups = groups_of(runs, runs_dir)
    if not groups:
        raise NoData("the sweep has one ViT variant per setting only (no position-embedding, pooling or "
                     "patch-size ablation)")
    multi = len(groups) > 1
    shuffled_any = any(g.cell.runs[SHUFFLE].notna().any() for g in groups if SHUFFLE in g.cell.runs)
    header = ["Setting"] * multi + ["Model", "Position embedding", "Pooling", "Patch", "Test acc. (%)", "n",
                                    "Δ vs default (points)"]
    header += ["Shuffle acc. (%)", "Shuffle − clean (points)", "Invariance expected; images changed"] * shuffled_any
    rows, marked = [], False
    for group in groups:
        for variant in group.variants:
            acc = accuracy(group, variant)
            baseline = group.baseline(variant)
            if baseline is None:
                delta = Cell("default")
            elif not len(group.runs_of(baseline, CLEAN)):
                delta = Cell("– (no default run)")
            else:
                found = difference_to_default(group, variant)
                marked |= found.test_sampling
                versus = f" vs patch {baseline.patch_size}" if baseline.patch_size != variant.patch_size else ""
                delta = Cell(found.text(signed=True) + (f" (n={found.n})" if found.n != acc.n else "") + versus,
                             bold=found.excludes_zero)
            marked |= acc.test_sampling
            models = " / ".join(sorted(set(group.runs_of(variant, CLEAN)["model"])))
            line = [Cell(group.cell.title)] * multi + [
                Cell(models), Cell(variant.pos_label), Cell(variant.pool_label), Cell(str(variant.patch_size)),
                Cell(acc.text()), Cell(str(acc.n)), delta]
            if shuffled_any:
                shuffled, gap = shuffle_accuracy(group, variant), shuffle_gap(group, variant)
                marked |= shuffled.test_sampling or gap.test_sampling
                line += [Cell(shuffled.text()), Cell(gap.text(signed=True)), Cell(_invariance_text(group, variant))]
            rows.append(line)
    caption = ("ViT ablations in the layout of the ViT paper's Table 8. Test accuracy: mean [95% interval], "
               "Student-t over seeds when n ≥ 2. Δ: accuracy minus that of the paper's default variant of the same "
               "patch size (learned 1-D position embedding, class token), and for the default of another patch "
               "size, minus the default of the patch size with the most variants ('vs patch P'); paired by seed, in "
               "points; bold when its interval excludes 0.")
    if shuffled_any:
        caption += (" Patch shuffle permutes the image's grid cells; shuffle − clean compares the same subset "
                    "images (clean = nothing occluded). Without a position embedding the encoder is "
                    "permutation-equivariant over patches and the class token's output or the patches' average is "
                    "invariant, so shuffling whole patches should change nothing: 'images changed' counts subset "
                    "images whose correctness differs between the shuffled and the clean image.")
    notes = [PAPER_TABLE8] + ([estimates.TEST_SAMPLING_NOTE] if marked else [])
    if not shuffled_any:
        notes.append("The sweep has no patch-shuffle measurements (shuffle/acc1), so no shuffle columns.")
    return Table("table_a1_ablations", "Table A1. ViT ablations", caption, header, rows, n_keys=4 + multi,
                 notes=notes)


# --------------------------------------------------------------- findings
def _difference_sentences(group: Group) -> Iterator[str]:
    for variant in group.variants:
        baseline = group.baseline(variant)
        if baseline is None or not len(group.runs_of(baseline, CLEAN)):
            continue
        found = difference_to_default(group, variant)
        if found.n == 0:
            continue
        text = (f"{group.cell.title}, {group.models}: {variant.label} vs the default ({baseline.label}): "
                f"test accuracy {found.sentence()}")
        if not found.has_interval:
            yield text + "; no interval, so no direction is claimed."
        elif found.excludes_zero:
            caveat = " (test sampling only)" if found.test_sampling else ""
            yield text + f"; {'higher' if found.mean > 0 else 'lower'} than the default{caveat}."
        else:
            yield text + "; within noise: the interval includes 0."


def _shuffle_sentences(group: Group) -> Iterator[str]:
    for variant in group.variants:
        expected = _invariance_expected(group, variant)
        if not (expected or variant.is_default):
            continue
        gap = shuffle_gap(group, variant)
        changed, compared = shuffle_changes(group, variant)
        if gap.n == 0 and not compared:
            continue
        text = f"{group.cell.title}, {group.models}, {variant.label}: patch shuffle − clean = {gap.sentence()}"
        if compared:
            text += f"; correctness changed on {changed:,} of {compared:,} subset images"
        if expected and not compared:
            text += "; the invariance expected without a position embedding is not checked image by image (no " \
                    f"{ROBUSTNESS})"
        elif expected:
            text += ("; consistent with the exact invariance expected without a position embedding" if changed == 0
                     else "; not invariant, although invariance is expected without a position embedding")
        yield text + "."


def ablation_findings(runs: pd.DataFrame, runs_dir: Path | str) -> list[str]:
    """Sentences: each variant against the default (n and interval; a direction only when it excludes 0),
    and what patch shuffle shows for the variants expected to be invariant and for the default."""
    sentences = []
    for group in groups_of(runs, runs_dir):
        sentences += list(_difference_sentences(group)) + list(_shuffle_sentences(group))
    return sentences
