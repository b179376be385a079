"""The benchmark computes what it says: its arithmetic, its CSV, arms that compare like with like, resident data
that equals the loader's transform. No assertion here depends on a measured time."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from pathlib import Path

import pytest
import torch

from experiments import bench
from lightning_modules.data import MixCollate, SeededShuffle

torch.set_num_threads(1)


def options(**changes) -> bench.Options:
    base = dict(profile="cpu", models=("vit_tiny_p4",), comparisons=bench.COMPARISONS, quick=True, batch=2,
                dataset="synthetic")
    return bench.Options(**{**base, **changes})


def context(tmp_path: Path, **changes) -> bench.Context:
    facts = bench.DeviceFacts(torch.device("cpu"), "Test CPU", "cpu-test", "amx_bf16 avx512_bf16")
    return bench.Context(options(out_dir=tmp_path, **changes), facts, "2026-01-01T00:00:00+00:00", "cpu-test.csv")


# ------------------------------------------------------------------ arithmetic
def test_images_per_second_flops_and_mfu() -> None:
    assert bench.images_per_s(128, 0.5) == 256.0
    # 4.6 GFLOPs forward per image at 1,000 images/s: 4.6 TFLOP/s inferring, 3x that training
    assert bench.achieved_tflops(4.6e9, 1000.0, training=False) == pytest.approx(4.6)
    assert bench.achieved_tflops(4.6e9, 1000.0, training=True) == pytest.approx(13.8)
    assert bench.mfu(4.6e9, 1000.0, True, peak_tflops=800.0) == pytest.approx(13.8 / 800)
    assert bench.mfu(4.6e9, 1000.0, True, peak_tflops=None) is None
    # ViT-B/16 (17.56 GFLOPs/img) at 40 % of 800 TFLOP/s trains 6,074 images/s
    assert bench.mfu(17.56e9, 6074.0, True, 800.0) == pytest.approx(0.40, abs=1e-3)


def test_break_even_of_a_one_off_cost() -> None:
    assert bench.break_even_steps(30.0, eager_step_s=0.10, fast_step_s=0.07) == pytest.approx(1000.0)
    assert bench.break_even_steps(30.0, eager_step_s=0.10, fast_step_s=0.10) == math.inf
    assert bench.break_even_steps(30.0, eager_step_s=0.10, fast_step_s=0.12) == math.inf


def test_peak_for_mfu_is_given_or_a_known_gpu_in_bf16() -> None:
    h100 = bench.DeviceFacts(torch.device("cuda", 0), "NVIDIA H100 80GB HBM3", "cuda-nvidia-h100-80gb-hbm3", "9.0")
    cpu = bench.DeviceFacts(torch.device("cpu"), "Some CPU", "cpu-some-cpu", "")
    assert bench.peak_tflops_for(h100, "bf16-mixed", None) == 800.0
    assert bench.peak_tflops_for(h100, "32-true", None) is None  # another peak: only when given
    assert bench.peak_tflops_for(cpu, "bf16-mixed", None) is None
    assert bench.peak_tflops_for(cpu, "32-true", 2.5) == 2.5


def test_median_of_windows_and_merged_rounds() -> None:
    measured = bench.Measured([0.3, 0.1, 0.2], peak_mem_bytes=5.0)
    measured.merge(bench.Measured([0.4], peak_mem_bytes=7.0))
    assert measured.step_s == pytest.approx(0.25) and measured.mean_step_s == pytest.approx(0.25)
    assert measured.peak_mem_bytes == 7.0


def test_time_windows_runs_warmup_then_whole_windows() -> None:
    calls = []
    timing = bench.Timing(warmup=2, windows=3, window_steps=4)
    measured = bench.time_windows(lambda: calls.append(1), timing, torch.device("cpu"))
    assert len(calls) == timing.total_steps == 14
    assert len(measured.window_step_s) == 3 and all(s >= 0 for s in measured.window_step_s)
    assert measured.peak_mem_bytes > 0  # the process's max RSS on the CPU


def test_ratios_and_goals() -> None:
    rows = [dataclasses.replace(ROW, arm=arm, images_per_s=ips) for arm, ips in
            (("plain", 200.0), ("lightning", 192.0), ("lightning-bare", 150.0))]
    bench.compare(rows, rows[0], 0.95, goal_arms=("lightning",))
    assert [r.ratio for r in rows] == [1.0, 0.96, 0.75]
    assert (rows[1].goal, rows[1].meets_goal) == ("ratio >= 0.95", "yes")
    assert rows[2].goal == rows[0].goal == ""  # judged only where asked


# ------------------------------------------------------------------ the CSV
ROW = bench.Row("2026-01-01T00:00:00+00:00", "Test CPU", "amx_bf16", "2.14", 2, "cpu", "main", "plain",
                "vit_tiny_p4", "train", 28, 1, 128, "bf16-mixed", "contiguous", "auto", False, 187.8, 190.0,
                681.4, 0.91, "process_max_rss", 0.185, 0.378, None)


def test_csv_has_the_schema_and_reads_back(tmp_path: Path) -> None:
    assert tuple(f.name for f in dataclasses.fields(bench.Row)) == bench.CSV_COLUMNS
    path = bench.write_csv(tmp_path / "dev.csv", [ROW, dataclasses.replace(ROW, mode="infer", note="a, b")])
    rows = bench.read_csv(path)
    assert list(rows[0]) == list(bench.CSV_COLUMNS)
    assert rows[0]["images_per_s"] == "681.4" and rows[0]["mfu"] == "" and rows[1]["note"] == "a, b"
    assert float(rows[0]["step_ms"]) == pytest.approx(187.8)


def test_csv_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = bench.write_csv(tmp_path / "dev.csv", [ROW])
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        bench.write_csv(path, [ROW, ROW])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dev.csv"]  # no temporary file left behind


def test_device_slugs() -> None:
    assert bench.slugify("Intel(R) Xeon(R) Processor") == "intel-xeon-processor"
    assert bench.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.cpu_kind({"avx2", "amx_bf16", "avx512_bf16"}) == "amx_bf16 avx512_bf16"
    assert "emulated" in bench.cpu_kind({"avx2"})
    facts = bench.device_facts()
    assert facts.slug == bench.slugify(facts.slug) and facts.kind


# ------------------------------------------------------------------ the comparisons compare like with like
@pytest.mark.slow
@pytest.mark.parametrize("model", ["vit_tiny_p4", "resnet18"])
def test_the_lightning_arm_and_the_plain_loop_train_the_same_thing(tmp_path: Path, model: str) -> None:
    """The run's Lightning loop and the plain loop: one net object, one batch, one layout (a CNN channels-last in
    both), bf16 autocast in both."""
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    setup = bench.make_setup(options(precision="bf16-mixed", in_chans=3), model, torch.device("cpu"))
    net = bench.build_net(setup, 0)
    images, labels = bench.fixed_batch(setup, 0)
    probe = bench.Probe(net)
    probe.arm("plain")
    bench.measure_train(net, setup, bench.QUICK, images, labels)
    probe.arm("lightning")
    module = bench.toggled_classifier(net, setup, bench.Toggles())
    measured, losses = bench.lightning_fit(module, setup, bench.Toggles(), bench.RepeatBatch((images, labels), 3),
                                           bench.QUICK, tmp_path)
    assert probe.seen["plain"] == probe.seen["lightning"]
    seen = probe.seen["plain"]
    assert seen.input_shape == (2, 3, 28, 28) and seen.autocast_dtype == "torch.bfloat16" and seen.training
    assert (seen.input_stride[1] == 1) == (model == "resnet18")  # channels-last: the channel stride is 1
    assert len(measured.window_step_s) == bench.QUICK.windows and len(losses) == 1 + bench.QUICK.windows
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before  # the Trainer's mode was undone


@pytest.mark.slow
def test_every_lightning_arm_trains_the_same_net_batch_and_precision(tmp_path: Path) -> None:
    """Plain, plain+sync and every Lightning arm: one net object, one batch, one layout, bf16 autocast."""
    ctx = context(tmp_path, precision="bf16-mixed")
    setup = bench.make_setup(ctx.options, "vit_tiny_p4", torch.device("cpu"))
    seen = bench.run_lightning(ctx, setup, bench.QUICK)
    arms = {"plain", "plain+sync", *bench.toggle_arms(on_cpu=True)}
    assert set(seen) == arms and {r.arm for r in ctx.rows} == arms
    assert len(set(seen.values())) == 1
    first = next(iter(seen.values()))
    assert first.input_shape == (2, 1, 28, 28) and first.autocast_dtype == "torch.bfloat16" and first.training
    assert "every arm saw the same" in ctx.rows[0].note
    lightning = next(r for r in ctx.rows if r.arm == "lightning")
    assert lightning.goal == "ratio >= 0.95" and lightning.meets_goal in ("yes", "no")


def test_each_lightning_arm_turns_off_one_piece() -> None:
    arms = bench.toggle_arms(on_cpu=True)
    full = arms["lightning"]
    assert all(getattr(full, name) for name in bench.TOGGLE_NAMES)
    for name in bench.TOGGLE_NAMES:
        off = {n for n in bench.TOGGLE_NAMES if not getattr(arms[f"lightning-{name}"], n)}
        assert off == ({name, "lr_monitor"} if name == "logger" else {name})  # the LR monitor needs a logger
    assert not any(dataclasses.asdict(arms["lightning-bare"]).values())
    assert "lightning-deterministic" not in bench.toggle_arms(on_cpu=False)  # a GPU run is not deterministic


def test_toggled_classifier_drops_only_the_toggled_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch as pl

    logged: list[str] = []
    monkeypatch.setattr(pl.LightningModule, "log", lambda self, name, *a, **k: logged.append(name))
    setup = bench.make_setup(options(), "vit_tiny_p4", torch.device("cpu"))
    for toggles, expected in ((bench.Toggles(), ["train/loss", "train/acc1_batch"]),
                              (bench.Toggles(train_acc=False), ["train/loss"]),
                              (bench.Toggles(loss_log=False), ["train/acc1_batch"])):
        module = bench.toggled_classifier(bench.build_net(setup, 0), setup, toggles)
        module.trainer = type("T", (), {"should_stop": False, "world_size": 1, "global_rank": 0})()
        logged.clear()
        assert module.training_step(bench.fixed_batch(setup, 0), 0) is not None  # the suite's own step
        assert logged == expected


def test_our_vit_and_timms_share_weights(tmp_path: Path) -> None:
    setup = bench.make_setup(options(precision="32-true"), "vit_tiny_p4", torch.device("cpu"))
    ours, theirs = bench.vit_pair(setup, seed=0)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    images, _ = bench.fixed_batch(setup, 0)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(images), theirs.eval()(images), atol=1e-5)


def test_switches_flip_one_setting(tmp_path: Path) -> None:
    ctx = context(tmp_path, precision="bf16-mixed")
    setup = bench.make_setup(ctx.options, "vit_tiny_p4", torch.device("cpu"))
    bench.run_switches(ctx, setup, bench.QUICK)
    rows = {r.arm: r for r in ctx.rows}
    assert set(rows) == {"suite", "attention-math", "fp32", "fused-adamw"}
    assert (rows["attention-math"].attention, rows["attention-math"].precision) == ("math", "bf16-mixed")
    assert (rows["fp32"].attention, rows["fp32"].precision) == ("auto", "32-true")
    assert rows["suite"].ratio == 1.0


def test_the_fused_adamw_switch_keeps_the_recipes_groups() -> None:
    setup = bench.make_setup(options(), "vit_tiny_p4", torch.device("cpu"))
    net = bench.build_net(setup, 0)
    suite = bench.recipe_optimizer(net, setup)
    fused = bench.recipe_optimizer(net, dataclasses.replace(setup, fused_adamw=True))
    assert all(group["fused"] for group in fused.param_groups) and not suite.param_groups[0]["fused"]
    for ours, theirs in zip(suite.param_groups, fused.param_groups):
        assert [id(p) for p in ours["params"]] == [id(p) for p in theirs["params"]]
        assert {k: ours[k] for k in ("lr", "betas", "eps", "weight_decay")} == {
            k: theirs[k] for k in ("lr", "betas", "eps", "weight_decay")}


# ------------------------------------------------------------------ resident data
# ResidentBatches itself (the loader's batches, made on the device) is tested in tests/test_resident.py.
def test_resident_data_takes_the_datamodules_split_and_statistics() -> None:
    spec = dataclasses.replace(bench.make_setup(options(), "vit_tiny_p4", torch.device("cpu")).spec, augment="basic")
    train, test, note = bench.resident_data(spec, 8, torch.device("cpu"))
    from experiments.train import build_datamodule

    datamodule = build_datamodule(spec)
    datamodule.setup()
    assert len(train.labels) == datamodule.n_train and len(test.labels) == len(datamodule.test_set)
    assert note == "" and train.random and not test.random
    x, y = next(iter(train))
    assert x.shape == (8, 1, 28, 28) and y.shape == (8,)
    sampler = SeededShuffle(datamodule.n_train, spec.data_seed, 8)  # the loader's first batch of 8
    first = next(iter(torch.utils.data.DataLoader(datamodule.train_set, batch_size=8, sampler=sampler,
                                                  collate_fn=MixCollate(datamodule.num_classes, 0.0, 0.0))))
    assert torch.equal(first[0], x) and torch.equal(first[1], y)


def test_resident_data_with_randaug_says_what_it_benchmarks_instead() -> None:
    setup = bench.make_setup(options(), "vit_tiny_p4", torch.device("cpu"))
    _, _, note = bench.resident_data(dataclasses.replace(setup.spec, augment="randaug"), 8, torch.device("cpu"))
    assert "randaug has no device version" in note


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_quick_runs_end_to_end(tmp_path: Path) -> None:
    """--quick on one small model: every comparison that applies to it, the table printed, the CSV written."""
    out = io.StringIO()
    ctx = bench.run(options(out_dir=tmp_path, comparisons=("main", "timm", "switches")), out=out)
    assert not [r.note for r in ctx.rows if r.arm == "failed"]
    rows = bench.read_csv(ctx.csv_path)
    assert {(r["comparison"], r["arm"], r["mode"]) for r in rows} >= {
        ("main", "plain", "train"), ("main", "plain", "infer"), ("timm", "ours", "train"), ("timm", "timm", "infer")}
    main_train = next(r for r in rows if r["comparison"] == "main" and r["mode"] == "train")
    assert float(main_train["gflops_per_image"]) > 0 and main_train["peak_mem_kind"] == "process_max_rss"
    assert "## timm: vit_tiny_p4" in out.getvalue() and "--quick" in out.getvalue()


def test_a_later_run_replaces_what_it_measured_again_and_keeps_the_rest(tmp_path: Path) -> None:
    """`make bench --only timm` after a full run: the timm rows are the new ones, the main rows stay."""
    # one precision for both runs: `auto` may time differently from one run to the next on a native-bf16 CPU
    first = bench.run(options(out_dir=tmp_path, comparisons=("main", "timm"), precision="32-true"), out=io.StringIO())
    before = bench.read_csv(first.csv_path)
    time.sleep(1.1)  # the timestamps have whole seconds
    second = bench.run(options(out_dir=tmp_path, comparisons=("timm",), precision="32-true"), out=io.StringIO())
    after = bench.read_csv(second.csv_path)
    assert [r for r in after if r["comparison"] == "main"] == [r for r in before if r["comparison"] == "main"]
    timm_rows = [r for r in after if r["comparison"] == "timm"]
    assert timm_rows and {r["timestamp"] for r in timm_rows} == {second.timestamp} != {first.timestamp}
    assert len(after) == len(before)


def test_a_comparison_that_cannot_run_says_why_and_the_rest_run(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: bench.Context, setup: bench.Setup, timing: bench.Timing) -> None:
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")

    monkeypatch.setitem(bench.RUNNERS, "timm", broken)
    out = io.StringIO()
    ctx = bench.run(options(out_dir=tmp_path, comparisons=("timm", "main")), out=out)
    failed = [r for r in ctx.rows if r.arm == "failed"]
    assert [(r.comparison, r.note) for r in failed] == [("timm", "RuntimeError: CUDA out of memory.")]
    assert {r.comparison for r in ctx.rows} == {"timm", "main"}  # main ran after it
    assert "! timm vit_tiny_p4: RuntimeError: CUDA out of memory." in out.getvalue()
    assert [r["arm"] for r in bench.read_csv(ctx.csv_path)].count("failed") == 1


def test_the_timm_comparison_takes_the_vits_only() -> None:
    assert bench.models_for(options(models=("resnet50", "vit_tiny_p4")), "timm") == ("vit_tiny_p4",)
    assert bench.models_for(options(profile="gpu", models=("vit_s16", "vit_b16", "resnet50")), "lightning") == (
        "vit_s16", "resnet50")


def test_command_line_refuses_bad_input_in_one_line(capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--models", "vit_tiny_p4", "--dataset", "no_such_data"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_quick_profile_runs_every_comparison(tmp_path: Path) -> None:
    """The whole cpu profile under --quick, resident data and compilation included (minutes on 2 cores)."""
    code = bench.main(["--profile", "cpu", "--quick", "--dataset", "synthetic", "--gpu-resident", "--compile",
                       "--out-dir", str(tmp_path)])
    rows = bench.read_csv(next(tmp_path.glob("*.csv")))
    assert code == 0 and not [r for r in rows if r["arm"] == "failed"]
    assert {r["comparison"] for r in rows} == set(bench.COMPARISONS)
    assert {r["arm"] for r in rows if r["comparison"] == "data"} == {"model_only", "loader", "loader_alone",
                                                                     "resident", "resident_alone"}
    assert {r["arm"] for r in rows if r["comparison"] == "compile"} == {"eager", "compiled"}


@pytest.mark.slow
def test_train_run_on_resident_data(tmp_path: Path) -> None:
    code = bench.main(["--train-run", "20", "--models", "vit_tiny_p4", "--dataset", "synthetic", "--batch", "16",
                       "--out-dir", str(tmp_path)])
    (path,) = tmp_path.glob("*-train-run.csv")
    (row,) = bench.read_csv(path)
    assert code == 0 and row["comparison"] == "train_run" and "test acc" in row["note"]
