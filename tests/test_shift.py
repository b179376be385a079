"""Dataset shift: CIFAR-10.1's files, STL-10's shared classes, exact accuracies of a net with known answers, the
skip line, evaluate's idempotency and the report's table. Every file is written here, tiny."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from analysis_fixtures import SWEEP, make_result, runs_of
from torch import nn

from analysis import robustness_report
from analysis.outputs import NoData
from experiments import evaluate, generalization
from experiments.rundir import RunDir
from experiments.spec import PROFILES, RunSpec
from lightning_modules.catalog import DATASETS
from lightning_modules.data import ImageDataModule
from lightning_modules.datasets import (CIFAR10_1_FILES, CIFAR10_1_URL, STL10_CLASSES, DataError, DataRequest,
                                        load_cifar10_1)
from lightning_modules.shift import class_map, masked_argmax

torch.set_num_threads(1)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FROG, HORSE = 6, 7
# The grey level that codes each CIFAR class for `LevelNet`: frog's sits nearer horse's than dog's.
GREY = np.array([20, 40, 60, 80, 100, 120, 140, 150, 200, 220], dtype=np.uint8)
IMG_SIZE = 16


@pytest.fixture(autouse=True)
def no_default_data(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaders look only where a test puts files."""
    monkeypatch.setattr("lightning_modules.datasets.DEFAULT_DATA_ROOT", tmp_path_factory.mktemp("nowhere") / "data")


# ---------------------------------------------------------------- files in their real formats
def grey_images(codes: np.ndarray, side: int = 32) -> np.ndarray:
    """uint8 (N, 3, side, side): image i is flat grey at the level of class codes[i]."""
    return np.broadcast_to(GREY[codes][:, None, None, None], (len(codes), 3, side, side)).copy()


def write_cifar10(root: Path, test_codes: np.ndarray, test_labels: np.ndarray) -> None:
    """CIFAR-10's python batches: 5 training batches of 4 images (2 per class in all) and the given test set."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    train_labels = np.arange(20) % 10
    for i in range(5):
        rows = train_labels[4 * i:4 * i + 4]
        with open(base / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": grey_images(rows).reshape(4, -1), "labels": rows.tolist()}, f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": grey_images(test_codes).reshape(len(test_codes), -1), "labels": test_labels.tolist()}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES}, f)


def write_cifar10_1(folder: Path, codes: np.ndarray, labels: np.ndarray) -> None:
    """CIFAR-10.1 v6's files: uint8 (N, 32, 32, 3) images, int64 labels."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / CIFAR10_1_FILES[0], grey_images(codes).transpose(0, 2, 3, 1))
    np.save(folder / CIFAR10_1_FILES[1], labels.astype(np.int64))


def write_stl10(root: Path, codes: np.ndarray, labels: np.ndarray) -> None:
    """STL-10's binaries (column-major 96 px images, labels 1..10) with test images coded by CIFAR class."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split, split_codes, split_labels in (("train", np.zeros(2, int), np.zeros(2, int)), ("test", codes, labels)):
        grey_images(split_codes, 96).transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        (split_labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")


class LevelNet(nn.Module):
    """Predicts the class whose grey level is nearest the input's mean (channel 0, after the CIFAR-10
    normalisation): (B, C, H, W) -> (B, 10)."""

    def __init__(self) -> None:
        super().__init__()
        mean, std = DATASETS["cifar10"].mean[0], DATASETS["cifar10"].std[0]
        levels = (torch.from_numpy(GREY).double() / 255 - mean) / std
        self.levels = nn.Parameter(levels.float(), requires_grad=False)  # (10,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, 0].mean(dim=(1, 2))  # (B,)
        return -(m[:, None] - self.levels[None, :]).square()  # (B, 10)


def cifar_module(root: Path) -> ImageDataModule:
    module = ImageDataModule("cifar10", IMG_SIZE, 3, batch_size=8, val_size=10, augment="none", data_dir=root,
                             download=False)
    module.setup()
    return module


# CIFAR-10 test: 20 images, two per class; the first four coded two classes off (wrong), none as frog.
TEST_LABELS = np.arange(20) % 10
TEST_CODES = np.where(np.arange(20) < 4, (TEST_LABELS + 2) % 10, TEST_LABELS)
# CIFAR-10.1: one per class, the first two wrong.
NEW_LABELS = np.arange(10)
NEW_CODES = np.where(np.arange(10) < 2, (NEW_LABELS + 2) % 10, NEW_LABELS)
# STL-10 test, in STL's classes: bird coded as cat (wrong), horse coded as frog (right once frog is masked),
# monkey coded as anything (left out).
STL_LABELS = np.arange(10)
STL_CODES = np.array([0, 3, 1, 3, 4, 5, FROG, 2, 8, 9])


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_cifar10(root, TEST_CODES, TEST_LABELS)
    return root


# ---------------------------------------------------------------- the class map and the mask
def test_stl_classes_map_to_their_cifar_indices_and_monkey_to_none() -> None:
    mapping = class_map(STL10_CLASSES, CIFAR10_CLASSES)
    assert dict(zip(STL10_CLASSES, mapping.tolist())) == {
        "airplane": 0, "bird": 2, "car": 1, "cat": 3, "deer": 4, "dog": 5, "horse": 7, "monkey": -1, "ship": 8,
        "truck": 9}
    assert FROG not in mapping  # no STL class is CIFAR's frog


def test_masking_frog_turns_a_frog_prediction_into_the_best_shared_class() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0],   # frog, then cat
                           [5.0, 1.0, 0.0, 2.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0]])  # airplane: unchanged
    shared = np.ones(10, dtype=bool)
    shared[FROG] = False
    assert logits.argmax(dim=1).tolist() == [FROG, 0]
    assert masked_argmax(logits, shared).tolist() == [3, 0]


# ---------------------------------------------------------------- CIFAR-10.1's files
def test_cifar10_1_is_read_from_its_folder_or_the_data_dir_itself(tmp_path: Path) -> None:
    write_cifar10_1(tmp_path / "cifar10.1", NEW_CODES, NEW_LABELS)
    found = load_cifar10_1(DataRequest("cifar10.1", tmp_path))
    assert found.images.shape == (10, 3, 32, 32) and found.targets.tolist() == NEW_LABELS.tolist()
    assert found.images[3, :, 5, 7].tolist() == [GREY[NEW_CODES[3]]] * 3
    again = load_cifar10_1(DataRequest("cifar10.1", tmp_path / "cifar10.1"))  # --data-dir pointing at the files
    assert torch.equal(again.images, found.images)


@pytest.mark.parametrize("file, content, needle", [
    (0, np.zeros((3, 32, 32), np.uint8), "uint8 images of shape (3, 32, 32)"),
    (0, np.zeros((3, 32, 32, 3), np.float32), "float32 images"),
    (1, np.zeros((4,), np.int64), "labels of shape (4,)"),
    (1, np.array([0, 10, 1]), "label 10 (expected 0..9"),
    (1, np.array([0.0, 1.0, 2.0]), "float64 labels"),
    (1, np.array([{"a": 1}, 2, 3], dtype=object), "is not a readable .npy array"),
])
def test_a_malformed_cifar10_1_file_is_one_line_naming_it(tmp_path: Path, file: int, content: np.ndarray,
                                                          needle: str) -> None:
    folder = tmp_path / "cifar10.1"
    write_cifar10_1(folder, np.zeros(3, int), np.zeros(3, int))
    np.save(folder / CIFAR10_1_FILES[file], content, allow_pickle=True)
    with pytest.raises(DataError) as err:
        load_cifar10_1(DataRequest("cifar10.1", tmp_path))
    message = str(err.value)
    assert "\n" not in message and str(folder / CIFAR10_1_FILES[file]) in message and needle in message


def test_missing_cifar10_1_names_the_folder_and_a_failed_download_says_so(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as err:
        load_cifar10_1(DataRequest("cifar10.1", tmp_path))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "cifar10.1") in message
    assert "cifar10.1_v6_{data,labels}.npy" in message and "allow the download" in message

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DataError, match=r"download failed \(OSError: no network\)") as err:
        load_cifar10_1(DataRequest("cifar10.1", tmp_path, download=True))
    assert "\n" not in str(err.value)


def test_the_download_fetches_the_official_files_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched = []

    def fake_download(url: str, root: str, filename: str) -> None:  # writes what the repository serves
        fetched.append((url, filename))
        source = tmp_path / "served"
        write_cifar10_1(source, NEW_CODES, NEW_LABELS)
        (Path(root) / filename).write_bytes((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download)
    found = load_cifar10_1(DataRequest("cifar10.1", tmp_path, download=True))
    assert [url for url, _ in fetched] == [CIFAR10_1_URL + name for name in CIFAR10_1_FILES]
    assert CIFAR10_1_URL == "https://github.com/modestyachts/CIFAR-10.1/raw/master/datasets/"
    assert sorted(p.name for p in (tmp_path / "cifar10.1").iterdir()) == sorted(CIFAR10_1_FILES)  # no .part left
    assert found.targets.tolist() == NEW_LABELS.tolist()


# ---------------------------------------------------------------- the evaluation
def test_a_net_with_known_answers_scores_exactly_on_every_set(data_root: Path, tmp_path: Path) -> None:
    write_cifar10_1(data_root / "cifar10.1", NEW_CODES, NEW_LABELS)
    write_stl10(data_root, STL_CODES, STL_LABELS)
    module = cifar_module(data_root)
    sets = generalization.shift_sets(module)
    assert set(sets) == {"cifar10.1", "stl10"}
    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    metrics = generalization.dataset_shift(LevelNet(), module, sets, "32-true", rundir)
    assert metrics == pytest.approx({
        "shift/cifar10/acc1": 16 / 20, "shift/cifar10/n": 20, "shift/cifar10.1/acc1": 8 / 10, "shift/cifar10.1/n": 10,
        "shift/cifar10_shared/acc1": 14 / 18, "shift/cifar10_shared/n": 18,  # frog's two images left out
        "shift/stl10_shared/acc1": 8 / 9, "shift/stl10_shared/n": 9})  # monkey left out; horse right (frog masked)
    with np.load(rundir.shift, allow_pickle=False) as saved:
        assert saved["sets"].tolist() == ["cifar10", "cifar10.1", "cifar10_shared", "stl10_shared"]
        assert saved["stl10_shared_target"].tolist() == [0, 2, 1, 3, 4, 5, 7, 8, 9]  # STL labels as CIFAR indices
        assert saved["stl10_shared_index"].tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
        assert saved["stl10_shared_correct"].tolist() == [True, False] + [True] * 7
        assert FROG not in saved["cifar10_shared_target"]


def test_missing_sets_are_skipped_with_one_line_each_and_record_nothing(data_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    module = cifar_module(data_root)
    assert generalization.shift_sets(module, say=lines.append) == {}
    assert [line.split(" skipped")[0] for line in lines] == ["dataset shift: cifar10.1", "dataset shift: stl10"]
    for line, folder in zip(lines, ("cifar10.1", "stl10_binary")):
        assert "\n" not in line and str(data_root / folder) in line and "--download-shift" in line
    rundir = RunDir(tmp_path / "run")
    assert generalization.dataset_shift(LevelNet(), module, {}, "32-true", rundir) == {}
    assert not rundir.shift.exists()


def test_shift_does_not_apply_to_a_run_not_trained_on_cifar10() -> None:
    lines: list[str] = []
    module = ImageDataModule("synthetic", IMG_SIZE, 1, batch_size=8, val_size=16)
    module.setup()
    assert generalization.shift_sets(module, say=lines.append) == {} and lines == []


def test_the_gpu_profiles_ask_for_it_and_the_cpu_profile_keeps_its_run_ids() -> None:
    assert PROFILES["gpu"]["shift_eval"] and PROFILES["cluster"]["shift_eval"]
    cpu = RunSpec.create("cpu")
    assert not cpu.shift_eval and "shift_eval" not in cpu.canonical()
    assert cpu.replace(shift_eval=True).run_id != cpu.run_id
    assert RunSpec.create("gpu", pretraining="fractaldb").upstream().shift_eval is False


def fake_run(runs: Path, data_root: Path) -> RunDir:
    """A completed cifar10 run with a tiny ResNet's checkpoint, calibration and robustness already recorded."""
    from lightning_modules.models import build_model

    spec = RunSpec.create("cpu", model="resnet18", dataset="cifar10", data_dir=str(data_root), img_size=IMG_SIZE,
                          val_size=10, val_fraction=0.0, batch_size=8, precision="32-true", wandb="off",
                          sweep=SWEEP, shift_eval=True)
    rundir = RunDir.of(runs, spec)
    rundir.checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    net = build_model(spec.model, 10, 3, IMG_SIZE)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, rundir.best_ckpt)
    record = make_result("resnet18", 1.0, 0, 0.5, dataset="cifar10", robustness="robustness.npz",
                         metrics={"calib/temperature": 1.0, "corrupt/n": float(evaluate.DEFAULT_SUBSET)})
    rundir.write_result({**record, "run_id": spec.run_id, "spec": spec.to_dict()})
    return rundir


def test_evaluate_adds_the_shift_once_and_a_second_time_changes_nothing(data_root: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    write_cifar10_1(data_root / "cifar10.1", NEW_CODES, NEW_LABELS)
    rundir = fake_run(tmp_path / "runs", data_root)
    assert evaluate.main([str(rundir.path)]) == 0
    out, err = capsys.readouterr()
    assert "evaluated (dataset shift on cifar10.1)" in out
    assert err.count("dataset shift: stl10 skipped") == 1 and "cifar10.1 skipped" not in err
    result = rundir.read_result()
    assert result["shift"] == "shift.npz" and result["metrics"]["shift/cifar10.1/n"] == 10
    assert not any(k.startswith("shift/stl10") or k.startswith("shift/cifar10_shared") for k in result["metrics"])
    with np.load(rundir.path / "shift.npz") as saved:
        assert saved["cifar10.1_correct"].mean() == result["metrics"]["shift/cifar10.1/acc1"]
    text, written = rundir.result_json.read_bytes(), (rundir.path / "shift.npz").stat().st_mtime_ns
    assert evaluate.main([str(rundir.path)]) == 0
    assert "already evaluated" in capsys.readouterr().out
    assert rundir.result_json.read_bytes() == text and (rundir.path / "shift.npz").stat().st_mtime_ns == written


# ---------------------------------------------------------------- the report
def shift_metrics(cifar: float, new: float, shared: float, stl: float) -> dict[str, float]:
    return {"shift/cifar10/acc1": cifar, "shift/cifar10/n": 10_000, "shift/cifar10.1/acc1": new,
            "shift/cifar10.1/n": 2_000, "shift/cifar10_shared/acc1": shared, "shift/cifar10_shared/n": 9_000,
            "shift/stl10_shared/acc1": stl, "shift/stl10_shared/n": 7_200}


def test_the_shift_table_appears_with_shift_metrics_and_not_without(tmp_path: Path) -> None:
    plain = [make_result("resnet50", 1.0, s, 0.9, dataset="cifar10") for s in (0, 1)]
    with pytest.raises(NoData, match="dataset-shift metrics") as err:
        robustness_report.shift_table(runs_of(tmp_path / "plain", plain), tmp_path / "plain")
    assert "\n" not in str(err.value)

    records = []
    for seed, wobble in enumerate((0.0, 0.01, -0.01)):  # the ViT drops ~8 points to CIFAR-10.1, surely; STL: noise
        records += [make_result("vit_s16", 1.0, seed, 0.9, dataset="cifar10",
                                metrics=shift_metrics(0.90, 0.82 + wobble, 0.91, 0.70 + 10 * wobble)),
                    make_result("resnet50", 1.0, seed, 0.9, dataset="cifar10",
                                metrics=shift_metrics(0.92, 0.86 + wobble, 0.93, 0.90 + 10 * wobble))]
    runs = runs_of(tmp_path / "shift", records)
    table = robustness_report.shift_table(runs, tmp_path / "shift")
    assert table.header[-6:] == ["CIFAR-10 test (%)", "CIFAR-10.1 (%)", "Drop to CIFAR-10.1 (points)",
                                 "CIFAR-10, 9 shared classes (%)", "STL-10, 9 shared classes (%)",
                                 "Drop to STL-10 (points)"]
    vit = next(row for row in table.rows if row[2].text == "vit_s16")
    assert vit[3].text == "3" and vit[4].text.startswith("90.0") and vit[5].text.startswith("82.0")
    assert vit[6].text.startswith("8.0 [") and vit[6].bold  # t interval over 3 seeds excludes 0
    assert vit[8].text.startswith("70.0") and vit[9].text.startswith("21.0 [") and not vit[9].bold  # ±10: noise
    assert not any(cell.bold for cell in vit[4:6] + vit[7:9])  # accuracies are never bold
    assert "CIFAR-10.1 2,000" in table.notes[0] and "STL-10, 9 shared classes 7,200" in table.notes[0]
    findings = [s for s in robustness_report.robustness_findings(runs, tmp_path / "shift") if "Drop to CIFAR" in s]
    assert len(findings) == 1 and "n=3 seeds" in findings[0]


def test_at_one_seed_the_drop_has_a_test_sampling_interval_from_shift_npz(tmp_path: Path) -> None:
    correct = {"cifar10": np.arange(1000) % 10 != 0, "cifar10.1": np.arange(400) % 10 >= 3}  # 90 % and 70 %
    record = make_result("resnet50", 1.0, 0, 0.9, dataset="cifar10", shift="shift.npz",
                         metrics={"shift/cifar10/acc1": 0.9, "shift/cifar10.1/acc1": 0.7})
    runs = runs_of(tmp_path, [record])
    arrays = {"sets": np.array(list(correct))}
    for name, right in correct.items():
        arrays.update({f"{name}_correct": right, f"{name}_target": np.arange(right.size) % 10,
                       f"{name}_index": np.arange(right.size)})
    np.savez(tmp_path / SWEEP / record["run_id"] / "shift.npz", **arrays)
    row = robustness_report.shift_table(runs, tmp_path).rows[0]
    assert row[4].text.startswith("90.0 [") and row[4].text.endswith(robustness_report.estimates.TEST_SAMPLING_MARK)
    low, high = (float(x) for x in row[6].text.split("[")[1].split("]")[0].replace("−", "-").split(", "))
    assert row[6].text.startswith("20.0 [") and 10 < low < 20 < high < 30 and not row[6].bold  # one seed: not bold


def test_result_json_names_the_shift_file_in_the_contract() -> None:
    from common import schema

    assert schema.FIELDS["shift"].kind == "str" and "shift/" in schema.METRIC_PREFIXES
    record = make_result(dataset="cifar10", shift="shift.npz", metrics={"shift/cifar10.1/acc1": 0.8})
    schema.check(json.loads(json.dumps(record)))
