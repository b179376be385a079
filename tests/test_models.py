"""The registry: one face for every net, pretrained weights through one function, honest FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from lightning_modules.catalog import MODELS
from lightning_modules.models import ModelError, build_model, count_params, flops_per_image, load_backbone
from lightning_modules.vit import VisionTransformer
from lightning_modules.vit_timm import timm_config

torch.set_num_threads(1)


@pytest.mark.parametrize("name, size, chans", [("vit_tiny_p8", 32, 1), ("resnet50", 32, 1), ("resnet18", 32, 3),
                                               ("vit_ti16", 224, 3)])
def test_every_net_has_one_face(name: str, size: int, chans: int) -> None:
    net = build_model(name, num_classes=7, in_chans=chans, img_size=size).eval()
    x = torch.randn(2, chans, size, size)
    with torch.no_grad():
        features = net.forward_features(x)
        assert torch.allclose(net.forward_head(features), net(x), atol=1e-5)
        assert net.forward_head(features, pre_logits=True).shape == (2, net.num_features)
    assert net(x).shape == (2, 7)


# Parameter and FLOP counts depend on shapes only: nets built on the meta device
# have them without allocating or initialising any weight.


@pytest.mark.parametrize("name", list(MODELS))
def test_a_registered_net_is_the_architecture_timm_publishes_under_its_name(name: str) -> None:
    """The catalog checked against an independent source, timm's own model of the same name."""
    info = MODELS[name]
    with torch.device("meta"):
        ours = build_model(name, num_classes=1000, in_chans=3, img_size=224)
        reference = timm.create_model(info.timm_name, pretrained=False) if info.timm_name else None
    assert isinstance(ours, VisionTransformer) == (info.arch == "vit")
    if reference is None:
        return
    assert count_params(ours) == count_params(reference)
    if isinstance(ours, VisionTransformer):
        assert ours.config == timm_config(reference)
    else:
        assert type(ours) is type(reference)


def test_paper_scale_vits_have_the_published_sizes() -> None:
    expected = {"vit_ti16": 5.7e6, "vit_s16": 22.1e6, "vit_b16": 86.6e6}  # timm / DeiT parameter counts
    for name, params in expected.items():
        with torch.device("meta"):
            n = count_params(build_model(name, 1000, 3, 224))
        assert abs(n - params) / params < 0.01, (name, n)


def test_flops_match_published_numbers() -> None:
    # 2 x multiply-adds: ResNet50 4.1 GMACs, ViT-S/16 4.6 GMACs at 224 px
    with torch.device("meta"):
        resnet50, vit_s16 = build_model("resnet50", 1000, 3, 224), build_model("vit_s16", 1000, 3, 224)
    assert flops_per_image(resnet50, 3, 224) == pytest.approx(8.2e9, rel=0.03)
    assert flops_per_image(vit_s16, 3, 224) == pytest.approx(9.2e9, rel=0.03)


def test_unknown_model_and_missing_weights_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model='vgg'.*allowed"):
        build_model("vgg", 10, 3, 32)
    with pytest.raises(ModelError, match="pretrained=True"):
        build_model("vit_tiny_p8", 10, 1, 32, pretrained=True)
    with pytest.raises(ModelError, match="weights_file"):
        build_model("resnet18", 10, 3, 32, pretrained=True, weights_file=tmp_path / "none.pth")


def test_a_pretrained_vit_refuses_an_architecture_override_its_weights_cannot_fill(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"pos_embed='none' with pretrained=True.*'learn'"):
        build_model("vit_ti16", 10, 3, 224, pretrained=True, overrides={"pos_embed": "none"})


def test_imagenet_weights_from_a_local_file_reach_our_vit(tmp_path: Path) -> None:
    """Pretrained loading goes through timm (a local file here, the hub online) and from_timm."""
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    weights = tmp_path / "vit_ti16.pth"
    torch.save(reference.state_dict(), weights)
    ours = build_model("vit_ti16", num_classes=1000, in_chans=3, img_size=224, pretrained=True,
                       weights_file=weights).eval()
    assert isinstance(ours, VisionTransformer)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-4)


def test_imagenet_weights_adapt_to_grey_images_and_new_classes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False)
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    net = build_model("resnet18", num_classes=10, in_chans=1, img_size=32, pretrained=True, weights_file=weights)
    assert torch.allclose(net.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))  # timm sums RGB
    assert torch.equal(net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert net.fc.out_features == 10


@pytest.mark.parametrize("name", ["vit_tiny_p8", "resnet18"])
def test_load_backbone_copies_everything_but_the_head(name: str) -> None:
    upstream = build_model(name, num_classes=64, in_chans=1, img_size=32)
    target = build_model(name, num_classes=10, in_chans=1, img_size=32)
    skipped = load_backbone(target, upstream.state_dict())
    head = {f"{n}" for n in skipped}
    assert head and all("fc" in n for n in head)
    for key, value in target.state_dict().items():
        if key not in head:
            assert torch.equal(value, upstream.state_dict()[key]), key
    wrong = build_model(name, num_classes=10, in_chans=3, img_size=32)
    with pytest.raises(ModelError, match="invalid pretrained weights"):
        load_backbone(target, wrong.state_dict())


# ---------------------------------------------------------------- ImageNet weights: normalisation and preflight
def _spec(**overrides: object) -> "RunSpec":
    from experiments.spec import RunSpec

    values = dict(dataset="synthetic", val_size=32, batch_size=16, min_steps=2, max_steps=2, num_evals=1,
                  wandb="off", precision="32-true")
    return RunSpec.create("cpu", **{**values, **overrides})


@pytest.mark.parametrize("model, in_chans", [("resnet50", 0), ("vit_s16", 3)])
def test_a_pretrained_run_is_normalised_with_its_weights_statistics(model: str, in_chans: int) -> None:
    from experiments.train import build_datamodule

    imagenet_mean, imagenet_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # resnet50.a1_in1k's and DeiT's
    pretrained = build_datamodule(_spec(model=model, pretraining="imagenet", in_chans=in_chans,
                                        img_size=32 if model == "resnet50" else 224))
    pretrained.setup()
    chans = pretrained.in_chans
    expected_mean = imagenet_mean if chans == 3 else (sum(imagenet_mean) / 3,)  # grey: averaged to one channel
    expected_std = imagenet_std if chans == 3 else (sum(imagenet_std) / 3,)
    record = pretrained.normalization.to_dict()
    assert record["source"] == f"weights:{MODELS[model].timm_name}"
    assert record["mean"] == pytest.approx(expected_mean) and record["std"] == pytest.approx(expected_std)
    mean_colour = torch.tensor([round(m * 255) for m in expected_mean], dtype=torch.uint8).view(chans, 1, 1)
    assert pretrained.val_set.transform(mean_colour.expand(chans, 32, 32)).abs().max() < 0.01  # mean -> 0
    scratch = build_datamodule(_spec(model=model, in_chans=in_chans, img_size=32 if model == "resnet50" else 224))
    scratch.setup()
    assert scratch.normalization.to_dict() == {"source": "dataset:synthetic", "mean": [0.5] * chans,
                                               "std": [0.25] * chans}


def test_every_imagenet_checkpoint_is_imagenet_1k_and_loads_into_our_nets() -> None:
    """Symmetric pretraining: every net's weights are ImageNet-1k weights that timm publishes."""
    published = set(timm.list_pretrained())
    for name, info in MODELS.items():
        if info.timm_name is not None:
            assert info.timm_name in published and info.timm_name.endswith("in1k") and "21k" not in info.timm_name


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf-cache"


def test_missing_imagenet_weights_offline_stop_before_any_work_naming_weights_file(
        tmp_path: Path, empty_hf_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from experiments.train import main

    runs = tmp_path / "runs"
    started = time.perf_counter()
    code = main(["--model", "resnet18", "--dataset", "synthetic", "--pretraining", "imagenet", "--wandb", "off",
                 "--runs-dir", str(runs)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and time.perf_counter() - started < 10
    assert "resnet18.a1_in1k" in line and "--weights-file" in line and str(empty_hf_cache) in line
    assert not runs.exists()


def test_a_local_weights_file_or_a_cached_download_passes_preflight(tmp_path: Path, empty_hf_cache: Path) -> None:
    from safetensors.torch import save_file

    from experiments.train import preflight
    from lightning_modules.models import check_weights

    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False)
    weights = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(weights))
    prepared, _ = preflight(_spec(model="resnet18", pretraining="imagenet", weights_file=str(weights)))
    assert prepared.datamodule.normalization.source == "weights:resnet18.a1_in1k"

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"invalid --weights-file='.*broken.pth' \(allowed: a checkpoint of "
                                         r"resnet18.a1_in1k that loads with weights_only"):
        check_weights("resnet18", broken)

    # timm's own download, already in the Hugging Face cache: used as it is, no request to the hub
    snapshot = empty_hf_cache / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (empty_hf_cache / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (empty_hf_cache / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0123abcd")
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    assert check_weights("resnet18") == f"cache:{snapshot / 'model.safetensors'}"
    net = build_model("resnet18", num_classes=10, in_chans=3, img_size=32, pretrained=True)
    assert torch.equal(net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
