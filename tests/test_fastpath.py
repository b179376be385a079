"""The fast-path switches: spec fields (validated, outside run_id), recorded in result.json, and runs that
take the fast path computing what the plain path computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common import schema
from experiments.spec import PROFILES, RunSpec, SpecError
from experiments.train import main, run

torch.set_num_threads(1)
TINY = dict(dataset="synthetic", min_steps=4, max_steps=4, num_evals=2, val_size=32, batch_size=32,
            precision="32-true", wandb="off")
SWITCHES = ("channels_last", "fused_attention", "compile", "resident")


def test_profiles_set_every_switch() -> None:
    cpu, gpu, cluster = (PROFILES[p] for p in ("cpu", "gpu", "cluster"))
    assert [cpu[s] for s in SWITCHES] == [True, True, False, False]  # the behaviour before the switches
    assert [gpu[s] for s in SWITCHES] == [True, True, False, "auto"]
    assert [cluster[s] for s in SWITCHES] == [gpu[s] for s in SWITCHES]
    assert gpu["precision"] == "auto"  # bf16 where native (experiments.precision)


def test_switches_leave_run_id_alone() -> None:
    spec = RunSpec.create("cpu", model="resnet18", **TINY)
    flipped = spec.replace(channels_last=False, fused_attention=False, compile=True, resident=True)
    assert flipped.run_id == spec.run_id
    assert not set(SWITCHES) & set(spec.canonical())
    old = {k: v for k, v in spec.to_dict().items() if k not in SWITCHES}  # a spec.json from before them
    assert RunSpec.from_dict(old).run_id == spec.run_id and RunSpec.from_dict(old).resident is False


@pytest.mark.parametrize("field, value", [("compile", "yes please"), ("compile", 1), ("channels_last", None),
                                          ("fused_attention", "on"), ("resident", "always"), ("resident", 1)])
def test_bad_switch_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(SpecError, match=f"invalid {field}="):
        RunSpec.create("cpu", **{field: value})


@pytest.mark.parametrize("args, needle", [
    (["--compile", "sometimes"], "compile='sometimes'"),
    (["--resident", "always"], "resident='always'"),
    (["--channels-last", "2"], "channels_last=2"),
    (["--resident", "true", "--augment", "randaug"], "resident=True"),
])
def test_bad_switches_exit_2_with_one_line(tmp_path: Path, args: list[str], needle: str,
                                           capsys: pytest.CaptureFixture) -> None:
    code = main(args + ["--dataset", "synthetic", "--runs-dir", str(tmp_path / "runs"), "--wandb", "off"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_resident_true_where_the_augmentation_cannot_be_on_the_device_is_refused_in_preflight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import lightning_modules.resident as resident

    monkeypatch.setattr(resident, "DEVICE_FIXED", ())  # as if no step had a device version
    code = main(["--dataset", "synthetic", "--resident", "true", "--runs-dir", str(tmp_path / "runs"),
                 "--wandb", "off"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "invalid resident=True" in err and "runs per image on the host" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "runs").exists()


def result_of(tmp_path: Path, name: str, **fields: object) -> dict:
    spec = RunSpec.create("cpu", **{**TINY, **fields})
    result = run(spec, tmp_path / name)
    assert result["status"] == "completed", result.get("error")
    on_disk = json.loads((tmp_path / name / "adhoc" / spec.run_id / "result.json").read_text())
    schema.check(on_disk)
    return on_disk


@pytest.mark.slow
def test_resident_run_equals_the_loader_run_and_both_are_recorded(tmp_path: Path) -> None:
    """The same spec through the loader and through resident batches: the same metrics (the same batches)."""
    loader = result_of(tmp_path, "loader", model="resnet18")
    resident = result_of(tmp_path, "resident", model="resnet18", resident=True)
    assert loader["runtime"] == dict(channels_last=True, fused_attention=False, compile=False, resident=False,
                                     resident_note="")
    assert resident["runtime"]["resident"] is True and resident["runtime"]["channels_last"] is True
    assert resident["run_id"] == loader["run_id"] and resident["spec"]["resident"] is True
    assert resident["selected"] == loader["selected"]
    for key, value in loader["metrics"].items():
        assert resident["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_auto_resolves_off_with_the_reason_and_attention_switch_is_recorded(tmp_path: Path) -> None:
    result = result_of(tmp_path, "auto", model="vit_tiny_p4", augment="randaug", resident="auto",
                       fused_attention=False)
    runtime = result["runtime"]
    assert runtime["resident"] is False and "RandAugment" in runtime["resident_note"]
    assert runtime["fused_attention"] is False and runtime["channels_last"] is False  # a ViT has no convolutions


def test_set_fused_attention_reaches_every_attention_module() -> None:
    from lightning_modules.classifier import set_fused_attention
    from lightning_modules.models import build_model

    net = build_model("vit_tiny_p4", 10, 1, 28)
    assert set_fused_attention(net, False) is False
    flags = [m.fused for m in net.modules() if hasattr(m, "fused") and hasattr(m, "qkv")]
    assert flags and not any(flags)
    assert set_fused_attention(net, True) is True
    assert set_fused_attention(build_model("resnet18", 10, 1, 28), True) is False


def test_schema_checks_the_runtime_section() -> None:
    record = {"schema_version": 2, "run_id": "x", "sweep": "s", "status": "completed", "model": "m", "arch": "cnn",
              "dataset": "d", "train_fraction": 1.0, "seed": 0, "pretraining": "none"}
    schema.check({**record, "runtime": {"compile": False, "resident_note": ""}})
    with pytest.raises(schema.ResultError, match="runtime\\['compile'\\]"):
        schema.check({**record, "runtime": {"compile": "no"}})
    with pytest.raises(schema.ResultError, match="runtime\\['turbo'\\]"):
        schema.check({**record, "runtime": {"turbo": True}})


@pytest.mark.slow
def test_compile_trains_a_tiny_run_on_cpu(tmp_path: Path) -> None:
    result = result_of(tmp_path, "compiled", model="vit_tiny_p4", compile=True)
    assert result["runtime"]["compile"] is True and result["train_steps"] == 4


def test_a_sweep_sets_the_switches_for_every_run_and_keeps_the_ids(tmp_path: Path) -> None:
    from experiments.sweep import load_sweep

    base = ("parameters:\n  sweep: {value: s}\n  dataset: {value: synthetic}\n"
            "  model: {values: [resnet18, vit_tiny_p4]}\n")
    plain, fast = tmp_path / "plain.yaml", tmp_path / "fast.yaml"
    plain.write_text(base)
    fast.write_text(base + "  compile: {value: true}\n  resident: {value: auto}\n  channels_last: {value: false}\n")
    runs, fast_runs = load_sweep(plain).ordered, load_sweep(fast).ordered
    assert [s.run_id for s in runs] == [s.run_id for s in fast_runs]
    assert all(s.compile is True and s.resident == "auto" and s.channels_last is False for s in fast_runs)
