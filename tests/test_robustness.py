"""Occlusion, patch shuffle, calibration and the robustness evaluation loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as tmf
from torch import nn

from lightning_modules.data import build_transforms
from lightning_modules.datasets import Normalization
from lightning_modules.robustness import (
    calibrate,
    evaluate_robustness,
    expected_calibration_error,
    fit_temperature,
    nll,
    occlusion_masks,
    occlude,
    reliability_bins,
    shuffle_patches,
    shuffle_permutations,
    stratified_subset,
)
from lightning_modules.vit import VisionTransformer
from lightning_modules.vit_config import ViTConfig

torch.set_num_threads(1)

EVAL = build_transforms(Normalization((0.5,), (0.25,), "dataset:synthetic"), 32, 1, "none", False,
                        32)  # uint8 (B, 1, 32, 32) -> normalised float


def tiny_vit(**overrides) -> VisionTransformer:
    """A 2-block ViT whose weights are large enough (std 0.3) for attention and position to matter, as after training."""
    config = ViTConfig(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    vit = VisionTransformer(config.replace(**overrides)).eval()
    with torch.no_grad():
        for p in vit.parameters():
            if p.requires_grad and p.ndim >= 2:
                p.normal_(0, 0.3)
    return vit


def tiny_cnn(in_chans: int = 1, classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(8 * 16, classes)).eval()


class Recorder(nn.Module):
    """Wraps a net and keeps every input it is given."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.net(x)


def dataset(n: int = 40, channels: int = 1, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(40, 216, size=(n, channels, 32, 32), dtype=np.uint8))
    return images, np.arange(n) % classes


# ------------------------------------------------------------------ subset
def test_stratified_subset_keeps_class_shares_and_is_nested():
    labels = np.repeat(np.arange(4), [50, 30, 10, 10])
    small, large = stratified_subset(labels, 20, seed=1), stratified_subset(labels, 50, seed=1)
    assert np.bincount(labels[small]).tolist() == [10, 6, 2, 2]
    assert set(small) <= set(large) and np.all(np.diff(large) > 0)
    assert np.array_equal(stratified_subset(labels, 500, seed=1), np.arange(100))


# ------------------------------------------------------------------ occlusion
@pytest.mark.parametrize("fraction,grid", [(0.0, 8), (0.1, 10), (0.5, 8), (0.8, 4), (1.0, 3)])
def test_occlusion_masks_blank_exactly_the_share_and_are_pure(fraction, grid):
    rows = np.array([3, 17, 4])
    masks = occlusion_masks(rows, fraction, grid, seed=5)
    assert masks.shape == (3, grid, grid) and masks.dtype == bool
    assert (masks.sum(axis=(1, 2)) == round(fraction * grid * grid)).all()
    assert np.array_equal(masks, occlusion_masks(rows, fraction, grid, seed=5))
    assert np.array_equal(masks[1:2], occlusion_masks(rows[1:2], fraction, grid, seed=5))  # per image, not per batch


def test_occlusion_masks_are_nested_and_differ_between_images():
    rows = np.arange(20)
    low, high = occlusion_masks(rows, 0.2, 8, 0), occlusion_masks(rows, 0.6, 8, 0)
    assert not (low & ~high).any()
    assert len({m.tobytes() for m in low}) == 20


def test_occlude_zeroes_exactly_the_masked_cells():
    x = torch.ones(2, 3, 32, 32)
    masks = occlusion_masks([0, 1], 0.25, 8, seed=0)
    out = occlude(x, masks)
    assert (out == 0).sum().item() == 2 * 3 * 16 * 16  # 16 of 64 cells of 4 x 4 px, 3 channels, 2 images
    cell_rows, cell_cols = np.nonzero(masks[0])
    assert (out[0, :, 4 * cell_rows[0]: 4 * cell_rows[0] + 4, 4 * cell_cols[0]: 4 * cell_cols[0] + 4] == 0).all()


def test_occlusion_masks_are_identical_across_nets_and_calls():
    images, labels = dataset()
    seen = []
    for net in (tiny_cnn(), tiny_vit(img_size=32), tiny_cnn()):
        recorder = Recorder(net).eval()
        evaluate_robustness(recorder, images, labels, EVAL, subset_size=12, seed=3, batch_size=5, names=(),
                            occlusion_fractions=(0.5,), shuffle_grid=None)
        seen.append(torch.cat(recorder.inputs[3:]))  # after the 3 clean batches
    clean = EVAL(images[torch.from_numpy(stratified_subset(labels, 12, 3))])
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])
    blanked = (seen[0] == 0) & (clean != 0)
    assert (blanked.sum(dim=(1, 2, 3)) == 32 * 16).all()  # half of the 64 cells of 16 px, every image


# ------------------------------------------------------------------ patch shuffle
def test_shuffle_permutes_cells():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    perms = shuffle_permutations([0, 1], 4, seed=0)
    out = shuffle_patches(x, perms, 4)
    assert torch.equal(out.flatten(1).sort().values, x.flatten(1).sort().values)
    j = 5
    src = perms[0, j]
    assert torch.equal(out[0, 0, 4:8, 4:8], x[0, 0, 4 * (src // 4): 4 * (src // 4) + 4, 4 * (src % 4): 4 * (src % 4) + 4])
    assert torch.equal(shuffle_patches(x, np.tile(np.arange(16), (2, 1)), 4), x)
    assert np.array_equal(perms, shuffle_permutations([0, 1], 4, seed=0))


@pytest.mark.parametrize("grid", [4, 2])
def test_vit_without_position_embedding_is_invariant_to_patch_shuffle(grid):
    images = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    shuffled = shuffle_patches(images, shuffle_permutations([0, 1, 2], grid, seed=1), grid)
    vit = tiny_vit(pos_embed="none", pool="avg", class_token=False)  # patch grid 4 x 4 refines the shuffle grid
    with torch.no_grad():
        torch.testing.assert_close(vit(shuffled), vit(images), rtol=0, atol=1e-5)
        positioned = tiny_vit(pos_embed="learn", pool="avg", class_token=False)
        assert (positioned(shuffled) - positioned(images)).abs().max() > 1e-2
        cnn = tiny_cnn()
        assert (cnn(shuffled) - cnn(images)).abs().max() > 1e-2


# ------------------------------------------------------------------ calibration
def sampled(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated at T = 1."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, size=(n, classes))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
    return logits, labels


def test_temperature_scaling_recovers_a_known_temperature():
    logits, labels = sampled(20000, 10, seed=0)
    assert fit_temperature(logits * 2.5, labels) == pytest.approx(2.5, rel=0.05)  # overconfident
    assert fit_temperature(logits / 2.0, labels) == pytest.approx(0.5, rel=0.05)  # underconfident


@pytest.mark.parametrize("seed", range(6))
def test_temperature_scaling_never_increases_validation_nll(seed):
    rng = np.random.default_rng(seed)
    logits, labels = sampled(300, 5, seed)
    cases = [logits, logits * rng.uniform(0.2, 5), rng.normal(0, 3, logits.shape)]  # the last: labels unrelated
    for z in cases:
        t = fit_temperature(z, labels)
        assert t > 0 and nll(z, labels, t) <= nll(z, labels) + 1e-12


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_ece_equals_torchmetrics(temperature):
    logits, labels = sampled(2000, 7, seed=3)
    logits = torch.from_numpy(logits * 1.7).float()
    probs = (logits / temperature).softmax(dim=1)
    reference = tmf.multiclass_calibration_error(probs, torch.from_numpy(labels), num_classes=7, n_bins=15, norm="l1")
    ours = expected_calibration_error(logits, labels, temperature=temperature)
    assert ours == pytest.approx(reference.item(), abs=1e-5)


def test_calibrate_reports_metrics_and_plain_reliability_bins():
    val, val_labels = sampled(3000, 10, seed=1)
    test, test_labels = sampled(2000, 10, seed=2)
    out = calibrate(torch.from_numpy(val * 3).float(), torch.from_numpy(val_labels), test * 3, test_labels)
    m = out.metrics
    assert set(m) >= {"calib/temperature", "test/ece", "test/nll", "test/ece_ts", "test/nll_ts"}
    assert m["calib/temperature"] == pytest.approx(3.0, rel=0.1)
    assert m["test/nll_ts"] < m["test/nll"] and m["test/ece_ts"] < m["test/ece"]
    assert m["calib/val_nll_ts"] <= m["calib/val_nll"]
    for bins in out.reliability.values():
        assert sum(bins["count"]) == 2000 and len(bins["lower"]) == 15
        assert all(isinstance(v, float) for v in bins["confidence"] + bins["accuracy"])
        for lo, hi, conf, count in zip(bins["lower"], bins["upper"], bins["confidence"], bins["count"]):
            assert count == 0 or lo <= conf <= hi
    bins = reliability_bins(test, test_labels)
    weighted = sum(c * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"])) / 2000
    assert weighted == pytest.approx(expected_calibration_error(test, test_labels), abs=1e-12)


# ------------------------------------------------------------------ the evaluation loop
def test_evaluate_robustness_metrics_and_per_image_correctness(tmp_path):
    images, labels = dataset(n=30)
    net = tiny_cnn(classes=4)
    kwargs = dict(subset_size=16, seed=2, batch_size=7, names=("gaussian_noise", "contrast"), severities=(1, 5),
                  occlusion_fractions=(0.0, 0.5), occlusion_grid=8, shuffle_grid=4)
    out = evaluate_robustness(net, images, labels, EVAL, **kwargs)
    expected = {"corrupt/clean_acc1", "corrupt/gaussian_noise/1/acc1", "corrupt/gaussian_noise/5/acc1",
                "corrupt/contrast/1/acc1", "corrupt/contrast/5/acc1", "occlusion/0/acc1", "occlusion/50/acc1",
                "shuffle/acc1"}
    assert set(out.correct) == expected
    assert set(out.metrics) == expected | {"corrupt/mean_acc1", "corrupt/n", "corrupt/official", "occlusion/grid",
                                           "shuffle/grid"}
    assert out.metrics["corrupt/n"] == 16 and len(out.indices) == 16 and out.metrics["corrupt/official"] == 0
    for name, correct in out.correct.items():
        assert correct.dtype == bool and correct.shape == (16,) and out.metrics[name] == correct.mean()
    assert np.array_equal(out.correct["occlusion/0/acc1"], out.correct["corrupt/clean_acc1"])
    cells = [out.metrics[k] for k in expected if k.startswith("corrupt/") and k.count("/") == 3]
    assert out.metrics["corrupt/mean_acc1"] == pytest.approx(np.mean(cells))

    cached = evaluate_robustness(net, images, labels, EVAL, dataset="synthetic", cache_dir=tmp_path, **kwargs)
    assert cached.metrics == out.metrics
    assert len(list(tmp_path.glob("synthetic_32px_c1_*/*.npz"))) == 2


def test_evaluate_robustness_uses_official_cifar_c_files(tmp_path):
    images, labels = dataset(n=20, channels=3, classes=10)
    np.save(tmp_path / "gaussian_noise.npy", np.concatenate([images.permute(0, 2, 3, 1).numpy()] * 5))
    np.save(tmp_path / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    net = Recorder(tiny_cnn(in_chans=3, classes=10)).eval()
    transform = build_transforms(Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "dataset:cifar10"), 32, 3,
                                 "none", False, 32)
    out = evaluate_robustness(net, images, labels, transform, subset_size=10, names=("gaussian_noise",),
                              severities=(2,), occlusion_fractions=(), shuffle_grid=None, official_dir=tmp_path)
    assert out.metrics["corrupt/official"] == 1.0
    assert torch.equal(net.inputs[0], net.inputs[1])  # the "official" images are the clean ones here
    np.save(tmp_path / "labels.npy", np.tile((labels + 1) % 10, 5).astype(np.uint8))
    with pytest.raises(ValueError, match="labels differ"):
        evaluate_robustness(net, images, labels, transform, subset_size=10, names=("gaussian_noise",),
                            severities=(2,), occlusion_fractions=(), shuffle_grid=None, official_dir=tmp_path)


class Untouchable(nn.Module):
    """A net that must never be called: bad arguments fail before any work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("evaluated despite a bad argument")


def test_evaluate_robustness_rejects_bad_arguments_before_any_work():
    images, labels = dataset(n=8)
    net = Untouchable().eval()
    cases = [
        (dict(precision="bf16"), "precision='bf16'"),
        (dict(subset_size=0), "subset_size=0"),
        (dict(names=("rain",)), "corruption='rain'"),
        (dict(severities=(0,)), "severity=0"),
        (dict(occlusion_fractions=(0.5, 1.5)), "fraction=1.5"),
        (dict(occlusion_grid=33), "occlusion_grid=33"),
        (dict(shuffle_grid=5), "shuffle_grid=5"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ValueError, match="allowed") as err:
            evaluate_robustness(net, images, labels, EVAL, **kwargs)
        assert field in str(err.value)
    with pytest.raises(ValueError, match="training mode"):
        evaluate_robustness(net.train(), images, labels, EVAL, names=())
    with pytest.raises(ValueError, match="labels"):
        evaluate_robustness(net.eval(), images, labels[:4], EVAL, names=())
