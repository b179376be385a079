"""analysis.interpret_figures: how far each layer looks, the side-by-side maps, and their findings."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_fixtures import SWEEP, make_result, runs_of
from generalization_fixtures import (IMAGE_SIDE, N_EXPLAIN, PATCH, explain_arrays, explain_images, explained_run,
                                     variant_run)
from matplotlib.collections import PathCollection

from analysis import collect, interpret_figures, plots
from analysis.outputs import NoData, write_outputs


def explained_sweep(runs_dir, seeds=(0, 1)):
    for seed in seeds:
        explained_run(runs_dir, "vit_tiny_p8", seed)
        explained_run(runs_dir, "resnet50", seed)
    return collect.collect(runs_dir, SWEEP).runs


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_uniform_attention_distance_is_the_mean_pairwise_patch_distance():
    assert interpret_figures.uniform_attention_distance((1, 2), 3.0) == pytest.approx(1.5)  # (0 + 3 + 3 + 0) / 4
    # 2 x 2 grid, patch 1: per query 0, 1, 1, √2
    assert interpret_figures.uniform_attention_distance((2, 2), 1.0) == pytest.approx((2 + np.sqrt(2)) / 4)


def test_layer_distance_averages_the_seeds_and_shows_every_head(tmp_path):
    runs = explained_sweep(tmp_path)
    (ax,) = interpret_figures.plot_layer_distance(runs, tmp_path).axes
    lines = lines_by_label(ax)
    # fixture: head h of layer l at seed s attends 2 + l + h + s px; ERF = reach · depth + s
    mean = lines["vit_tiny_p8: attention distance, mean over heads"]
    assert list(mean.get_xdata()) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert list(mean.get_ydata()) == pytest.approx([3.0, 4.0, 5.0, 6.0])
    assert list(lines["vit_tiny_p8: gradient ERF"].get_ydata()) == pytest.approx([2.0, 3.5, 5.0, 6.5])
    cnn = lines["resnet50: gradient ERF"]
    assert list(cnn.get_xdata()) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert list(cnn.get_ydata()) == pytest.approx([0.9, 1.3, 1.7, 2.1, 2.5])
    (dots,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(dots.get_offsets()) == 2 * 4 * 2  # seeds x layers x heads
    grid = IMAGE_SIDE // PATCH
    uniform = interpret_figures.uniform_attention_distance((grid, grid), PATCH)
    assert list(lines["uniform attention (global)"].get_ydata()) == pytest.approx([uniform, uniform])
    assert "comparable in kind, not number for number" in interpret_figures.FIGURES["fig_i1_layer_distance"].caption


def test_maps_show_the_same_images_side_by_side(tmp_path):
    runs = explained_sweep(tmp_path)
    fig = interpret_figures.plot_attention_maps(runs, tmp_path)
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(axes) == N_EXPLAIN * 4  # images x (input, rollout, ViT Grad-CAM, CNN Grad-CAM)
    assert [ax.get_title() for ax in axes[:4]] == [
        "input", "vit_tiny_p8\nattention rollout", "vit_tiny_p8\nGrad-CAM", "resnet50\nGrad-CAM"]
    assert "Grad-CAM at resnet50 layer2[-1], vit_tiny_p8 encoder.blocks[-1].norm1" in fig.get_suptitle()
    image = explain_images(0)[0, 0]
    shown = axes[0].get_images()[0].get_array()
    assert np.allclose(shown, (image - image.min()) / (image.max() - image.min()))
    assert "seed 0" in fig.get_suptitle()


def test_maps_refuse_different_images(tmp_path):
    explained_run(tmp_path, "vit_tiny_p8", 0)
    explained_run(tmp_path, "resnet50", 0, explain=explain_arrays("cnn", 0, images=explain_images(1)))
    runs = collect.collect(tmp_path, SWEEP).runs
    with pytest.raises(NoData, match="images differ .* refusing"):
        interpret_figures.plot_attention_maps(runs, tmp_path)


def test_maps_need_two_nets_of_the_same_seed(tmp_path):
    explained_run(tmp_path, "vit_tiny_p8", 0)
    explained_run(tmp_path, "resnet50", 1)
    runs = collect.collect(tmp_path, SWEEP).runs
    with pytest.raises(NoData, match="for two nets"):
        interpret_figures.plot_attention_maps(runs, tmp_path)
    interpret_figures.plot_layer_distance(runs, tmp_path)  # one net per seed is enough to draw the profiles


def test_maps_of_an_ablation_show_each_vit_variant_on_the_same_images(tmp_path):
    """A ViT-only ablation sweep: the default variant first, each variant's rollout and Grad-CAM, titled."""
    for pos_embed in ("none", "learn"):
        for seed in (0, 1):
            variant_run(tmp_path, pos_embed=pos_embed, seed=seed, files={"explain": explain_arrays("vit", seed)})
    runs = collect.collect(tmp_path, SWEEP).runs
    fig = interpret_figures.plot_attention_maps(runs, tmp_path)
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(axes) == N_EXPLAIN * 5  # images x (input, 2 variants x (rollout, Grad-CAM))
    assert [ax.get_title() for ax in axes[:5]] == [  # the one field that differs names each variant
        "input", "pos. learned 1-D\nattention rollout", "pos. learned 1-D\nGrad-CAM",
        "pos. none\nattention rollout", "pos. none\nGrad-CAM"]
    assert "seed 0" in fig.get_suptitle()


def test_no_explain_file_means_no_figure(tmp_path):
    runs = runs_of(tmp_path, [make_result(), make_result("vit_tiny_p8")])
    for make in (interpret_figures.plot_layer_distance, interpret_figures.plot_attention_maps):
        with pytest.raises(NoData, match="explain.npz"):
            make(runs, tmp_path)
    assert interpret_figures.interpret_findings(runs, tmp_path) == []


@pytest.mark.slow
def test_figures_are_byte_identical_when_made_twice(tmp_path):
    runs = explained_sweep(tmp_path / "runs", seeds=(0,))
    makers = interpret_figures.figure_makers(tmp_path / "runs")
    first, skipped = write_outputs(makers, runs, tmp_path / "a", (".png", ".pdf"), plots.save_figure, "figure")
    second, _ = write_outputs(makers, runs, tmp_path / "b", (".png", ".pdf"), plots.save_figure, "figure")
    assert not skipped and list(first) == list(interpret_figures.FIGURES)
    for name in first:
        assert [p.read_bytes() for p in first[name]] == [p.read_bytes() for p in second[name]]


def test_findings_state_a_direction_only_with_an_interval(tmp_path):
    found = interpret_figures.interpret_findings(explained_sweep(tmp_path / "two"), tmp_path / "two")
    assert "n=2 seeds, Student-t over seeds), so attention reaches farther with depth" in found[0]
    assert "so the ViT's deepest layer draws on a wider region" in found[1]
    single = interpret_figures.interpret_findings(explained_sweep(tmp_path / "one", (0,)), tmp_path / "one")
    assert all("n=1 seed, no interval" in s for s in single)
    assert not any("farther" in s or "wider" in s for s in single)


def test_the_figures_read_what_explain_batch_writes(tmp_path):
    """The producer's own arrays (a tiny ViT and ResNet18 on the same images) go through both figures."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from lightning_modules.interpret import explain_batch
    from lightning_modules.vit import VisionTransformer
    from lightning_modules.vit_config import ViTConfig

    torch.manual_seed(0)
    nets = {"vit_tiny_p8": VisionTransformer(ViTConfig(img_size=32, patch_size=4, in_chans=1, num_classes=10,
                                                       embed_dim=32, depth=2, num_heads=2)),
            "resnet18": timm.create_model("resnet18", num_classes=10, in_chans=1, zero_init_last=False)}
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    for model, net in nets.items():
        explained_run(tmp_path, model, 0, explain=explain_batch(net, images))
    runs = collect.collect(tmp_path, SWEEP).runs
    (ax,) = interpret_figures.plot_layer_distance(runs, tmp_path).axes
    assert set(lines_by_label(ax)) >= {"vit_tiny_p8: attention distance, mean over heads", "vit_tiny_p8: gradient ERF",
                                       "resnet18: gradient ERF"}
    fig = interpret_figures.plot_attention_maps(runs, tmp_path)
    assert "resnet18\nGrad-CAM" in [ax.get_title() for ax in fig.axes]
    assert "resnet18 layer2[-1]" in fig.get_suptitle()
