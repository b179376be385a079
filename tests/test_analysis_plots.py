"""analysis.plots: figures have the expected axes, lines and bands, or are skipped."""

from __future__ import annotations

import pytest
from analysis_fixtures import make_result, power_law_sweep, runs_of, small_sweep
from matplotlib.collections import PolyCollection

from analysis import plots
from analysis.outputs import NoData


def labelled_lines(ax) -> list[str]:
    """Labels of the data lines (reference lines such as y=0 have '_' labels)."""
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def bands(ax) -> int:
    return sum(isinstance(c, PolyCollection) for c in ax.collections)


def with_train_accuracy(records: list[dict]) -> list[dict]:
    for r in records:
        acc = r["metrics"].get("test/acc1")
        if acc is not None:
            r["metrics"]["train/acc1"] = min(1.0, acc + 0.1)
    return records


def test_data_efficiency_axes_lines_and_bands(tmp_path):
    fig = plots.plot_data_efficiency(runs_of(tmp_path, small_sweep()))
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training images", "test accuracy (%)")
    assert labelled_lines(ax) == ["resnet50 · scratch", "resnet50 · fractaldb 12.8k",
                                  "vit_tiny_p8 · scratch", "vit_tiny_p8 · fractaldb 12.8k"]
    assert bands(ax) == 4  # every line has a cell with n=2
    scratch = ax.get_lines()[0]
    assert list(scratch.get_xdata()) == [540, 5400] and list(scratch.get_ydata()) == pytest.approx([82.0, 88.0])
    assert fig.get_figwidth() == pytest.approx(plots.COLUMN_WIDTH)


def test_no_bands_with_a_single_seed(tmp_path):
    records = [make_result(m, f, 0, 0.8) for m in ("resnet50", "vit_tiny_p8") for f in (0.01, 0.1)]
    (ax,) = plots.plot_data_efficiency(runs_of(tmp_path, records)).axes
    assert len(labelled_lines(ax)) == 2 and bands(ax) == 0


def test_no_completed_runs_means_no_figure(tmp_path):
    runs = runs_of(tmp_path, [make_result(status="failed", acc=None)])
    with pytest.raises(NoData):
        plots.plot_data_efficiency(runs)


def test_pretraining_effect(tmp_path):
    (ax,) = plots.plot_pretraining_effect(runs_of(tmp_path, small_sweep())).axes
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "gain over scratch (points)"
    assert labelled_lines(ax) == ["resnet50 · fractaldb 12.8k", "vit_tiny_p8 · fractaldb 12.8k"]
    assert list(ax.get_lines()[-1].get_ydata()) == pytest.approx([6.0])


def test_pretraining_effect_skipped_without_pretraining(tmp_path):
    with pytest.raises(NoData, match="no pretrained runs"):
        plots.plot_pretraining_effect(runs_of(tmp_path, power_law_sweep()))


def test_pretraining_scale_needs_two_sizes(tmp_path):
    with pytest.raises(NoData, match=">= 2 pretraining-set sizes"):
        plots.plot_pretraining_scale(runs_of(tmp_path / "one", small_sweep()))
    records = small_sweep() + [make_result(m, 0.01, s, 0.85, "fractaldb", 50_000)
                               for m in ("resnet50", "vit_tiny_p8") for s in (0, 1)]
    (ax,) = plots.plot_pretraining_scale(runs_of(tmp_path / "two", records)).axes
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "fractaldb pretraining images"
    assert labelled_lines(ax) == ["resnet50 · 1% of data", "vit_tiny_p8 · 1% of data"]
    assert list(ax.get_lines()[0].get_xdata()) == [12800, 50000]


def test_generalization_skipped_without_train_accuracy(tmp_path):
    with pytest.raises(NoData, match="no train/acc1"):
        plots.plot_generalization(runs_of(tmp_path, small_sweep()))


def test_generalization_gap_panel(tmp_path):
    fig = plots.plot_generalization(runs_of(tmp_path, with_train_accuracy(small_sweep())))
    (gap,) = fig.axes
    assert gap.get_xscale() == "log" and gap.get_ylabel() == "train − test accuracy (points)"
    assert len(labelled_lines(gap)) == 4
    # every run's train accuracy is its test accuracy + 10 points (capped at 100 %)
    assert all(0 < y <= 10.0 + 1e-9 for line in gap.get_lines() for y in line.get_ydata() if y == y)


def test_cost_axes(tmp_path):
    fig = plots.plot_cost(runs_of(tmp_path, small_sweep()))
    assert [ax.get_xlabel() for ax in fig.axes] == ["training FLOPs", "wall time (s)"]
    assert all(ax.get_xscale() == "log" for ax in fig.axes)
    assert fig.get_figwidth() == pytest.approx(2 * plots.COLUMN_WIDTH)


def test_save_figure_is_byte_reproducible(tmp_path):
    runs = runs_of(tmp_path, small_sweep())
    first = plots.save_figure(plots.plot_data_efficiency(runs), tmp_path / "a" / "fig")
    second = plots.save_figure(plots.plot_data_efficiency(runs), tmp_path / "b" / "fig")
    assert [p.name for p in first] == ["fig.png", "fig.pdf"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert first[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and first[1].read_bytes()[:5] == b"%PDF-"


def lines_labelled(ax, label: str) -> list:
    return [line for line in ax.get_lines() if line.get_label() == label]


def legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_flagged_cells_have_hollow_markers_and_a_legend_key(tmp_path):
    records = power_law_sweep()
    for r in records:
        r["improving_at_end"] = r["model"] == "resnet50" and r["train_fraction"] == 1.0
    fig = plots.plot_data_efficiency(runs_of(tmp_path, records))
    (hollow,) = lines_labelled(fig.axes[0], plots.FLAGGED)
    assert list(hollow.get_xdata()) == [54_000] and hollow.get_markerfacecolor() == "white"
    assert plots.KEYS[plots.FLAGGED].get_label() in legend_texts(fig)


def test_identified_fits_are_drawn_over_their_fitted_range_only(tmp_path):
    fig = plots.plot_data_efficiency(runs_of(tmp_path / "five", power_law_sweep()))
    fits = lines_labelled(fig.axes[0], plots.FIT)
    assert len(fits) == 2 and all((min(f.get_xdata()), max(f.get_xdata())) == pytest.approx((540, 54_000))
                                  for f in fits)
    assert plots.KEYS[plots.FIT].get_label() in legend_texts(fig)
    fig = plots.plot_data_efficiency(runs_of(tmp_path / "three", power_law_sweep(fractions=(0.01, 0.1, 1.0))))
    assert not lines_labelled(fig.axes[0], plots.FIT)  # 3 sizes: no fit is identified, none is drawn
    assert not lines_labelled(fig.axes[0], plots.FLAGGED)
