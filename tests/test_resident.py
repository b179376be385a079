"""The resident path (lightning_modules/resident.py) gives the loader path's batches: the fairness rule."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.data import ImageDataModule
from lightning_modules.resident import ResidentBatches, reflect_crop, resident_support


def datamodule(augment: str = "basic", img_size: int = 32, in_chans: int = 1, mix: float = 0.0,
               data_seed: int = 4) -> ImageDataModule:
    dm = ImageDataModule("synthetic", img_size=img_size, in_chans=in_chans, batch_size=16, train_fraction=0.5,
                         val_size=32, data_seed=data_seed, augment=augment, mixup_alpha=mix, cutmix_alpha=mix)
    dm.setup()
    return dm


def loader_and_resident(dm: ImageDataModule) -> tuple[torch.utils.data.DataLoader, ResidentBatches]:
    loader = dm.train_dataloader()
    dm.resident = True
    resident = dm.train_dataloader()
    dm.resident = False
    assert isinstance(resident, ResidentBatches)
    return loader, resident


@pytest.mark.parametrize("data_seed", [0, 7])
def test_resident_order_per_epoch_is_the_seeded_samplers(data_seed: int) -> None:
    """Each epoch's sample order (and each sample's augmentation seed) is the loader's, for that data seed."""
    dm = datamodule(data_seed=data_seed)
    loader, resident = loader_and_resident(dm)
    orders = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        resident.sampler.set_epoch(epoch)
        expected = [list(loader.sampler)[b * 16:(b + 1) * 16] for b in range(len(loader))]
        got = []
        for (x, y), items in zip(resident, expected):  # labels follow the rows the resident path took
            rows = [dm.train_idx[i] for i, _ in items]
            assert torch.equal(y, torch.as_tensor(dm.load_source().train.targets[rows]))
            got.append(items)
        assert len(resident) == len(loader) == len(got)
        orders.append([i for batch in expected for i, _ in batch])
    assert orders[0] != orders[1] != orders[2]  # epochs differ


@pytest.mark.parametrize("augment,in_chans", [("none", 1), ("none", 3), ("basic", 1), ("basic", 3)])
def test_resident_batches_equal_the_loaders(augment: str, in_chans: int) -> None:
    """Identical tensors, epoch by epoch: without augmentation, and with the crop + flip (the same draws)."""
    dm = datamodule(augment=augment, in_chans=in_chans)
    loader, resident = loader_and_resident(dm)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        resident.sampler.set_epoch(epoch)
        pairs = list(zip(loader, resident))
        assert len(pairs) == len(loader) > 1
        for (x, y), (rx, ry) in pairs:
            assert type(rx) is torch.Tensor and rx.shape == x.shape
            assert torch.equal(rx, x) and torch.equal(ry, y)


def test_resident_mixup_cutmix_and_resize_equal_the_loaders() -> None:
    dm = datamodule(augment="basic", img_size=24, in_chans=3, mix=1.0)  # stored at 32 px: resized in memory
    loader, resident = loader_and_resident(dm)
    for (x, y), (rx, ry) in zip(loader, resident):
        assert y.shape == (16, dm.num_classes)
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_resident_resumes_mid_epoch_like_the_loader() -> None:
    dm = datamodule()
    _, resident = loader_and_resident(dm)
    full = [x for x, _ in resident]
    resident.load_state_dict({"epoch": 0, "batches": 1})
    rest = [x for x, _ in resident]
    assert len(rest) == len(full) - 1 and all(torch.equal(a, b) for a, b in zip(rest, full[1:]))


def test_randaug_and_image_files_are_not_resident() -> None:
    dm = datamodule(augment="randaug")
    assert "RandAugment runs per image on the host" in resident_support(dm, torch.device("cpu"))
    assert resident_support(datamodule(), torch.device("cpu")) == ""
    with pytest.raises(ValueError, match="RandAugment"):
        ResidentBatches(dm.train_set, 16, "cpu")


def test_reflect_crop_is_torchvisions_pad_then_crop() -> None:
    import torchvision.transforms.v2.functional as TF

    x = torch.randint(0, 256, (5, 2, 8, 8), dtype=torch.uint8)
    top, left = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([4, 3, 2, 1, 0])
    got = reflect_crop(x, 2, top, left, 8)
    padded = TF.pad(x.float(), [2, 2, 2, 2], padding_mode="reflect")
    for b in range(5):
        assert torch.equal(got[b].float(), padded[b, :, top[b]:top[b] + 8, left[b]:left[b] + 8])
