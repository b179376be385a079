"""RunSpec: validation, identity, budget and the pretraining chain."""

from __future__ import annotations

import pytest

from experiments.spec import PROFILES, RunSpec, SpecError


def test_run_id_hashes_the_computation_not_the_placement() -> None:
    spec = RunSpec.create("cpu", model="resnet50", train_fraction=0.1)
    assert spec.run_id == RunSpec.create("cpu", model="resnet50", train_fraction=0.1).run_id
    assert spec.run_id == spec.replace(sweep="other", wandb="off", data_dir="/x", num_workers=3).run_id
    for change in (dict(seed=1), dict(train_fraction=0.2), dict(lr=2e-3), dict(model="vit_tiny_p8"),
                   dict(data_seed=1), dict(pretraining="fractaldb")):
        assert spec.replace(**change).run_id != spec.run_id, change


def test_round_trip_through_dict() -> None:
    spec = RunSpec.create("gpu", model="resnet50", pretraining="imagenet", seed=2)
    assert RunSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("overrides, field, value", [
    (dict(model="vgg16"), "model", "vgg16"),
    (dict(dataset="mnist"), "dataset", "mnist"),
    (dict(train_fraction=1.5), "train_fraction", "1.5"),
    (dict(train_fraction=0.0), "train_fraction", "0.0"),
    (dict(max_steps=0, min_steps=0), "min_steps", "0"),
    (dict(max_steps=-3), "max_steps", "-3"),
    (dict(pretraining="jft"), "pretraining", "jft"),
    (dict(model="vit_tiny_p8", pretraining="imagenet"), "pretraining", "imagenet"),
    (dict(lr=True), "lr", "True"),
    (dict(colour="red"), "field", "colour"),
])
def test_bad_values_name_field_value_and_allowed(overrides: dict, field: str, value: str) -> None:
    with pytest.raises(SpecError) as err:
        RunSpec.create("cpu", **overrides)
    message = str(err.value)
    assert "\n" not in message
    assert f"{field}=" in message and value in message and "allowed" in message


def test_unknown_profile() -> None:
    with pytest.raises(SpecError, match="profile='laptop'"):
        RunSpec.create("laptop")


def test_budget_grows_with_data_between_floor_and_cap() -> None:
    spec = RunSpec.create("cpu", epochs=4.0, min_steps=40, max_steps=400, batch_size=100, num_evals=4)
    assert spec.train_steps(100) == 40            # floor
    assert spec.train_steps(5000) == 200          # 4 epochs of 50 steps
    assert spec.train_steps(10**6) == 400         # cap
    assert all(spec.train_steps(n) % 4 == 0 for n in (1, 333, 5001, 77777))
    sizes = [100, 1000, 3000, 9000, 30000]
    steps = [spec.train_steps(n) for n in sizes]
    assert steps == sorted(steps)


def test_upstream_is_shared_across_target_fractions_not_models() -> None:
    a = RunSpec.create("cpu", model="resnet50", train_fraction=0.01, pretraining="fractaldb")
    b = RunSpec.create("cpu", model="resnet50", train_fraction=0.3, pretraining="fractaldb")
    c = RunSpec.create("cpu", model="vit_tiny_p8", train_fraction=0.01, pretraining="fractaldb")
    assert a.upstream().run_id == b.upstream().run_id != c.upstream().run_id
    up = a.upstream()
    assert (up.dataset, up.role, up.pretraining, up.train_fraction) == ("fractaldb", "pretrain", "none", 1.0)
    assert up.min_steps == up.max_steps == a.pretrain_steps
    assert up.net_in_chans == a.net_in_chans == 1  # the target's channels reach the pretraining net
    assert RunSpec.create("cpu", pretraining="none").upstream() is None
    assert RunSpec.create("cpu", pretraining="imagenet").upstream() is None


def test_dataset_pretraining_upstream_uses_the_source_dataset() -> None:
    spec = RunSpec.create("cpu", dataset="fashion_mnist", pretraining="cifar10", pretrain_fraction=0.5)
    up = spec.upstream()
    assert (up.dataset, up.train_fraction, up.net_in_chans) == ("cifar10", 0.5, 1)


def test_fractaldb_is_not_a_target() -> None:
    with pytest.raises(SpecError, match="dataset='fractaldb'"):
        RunSpec.create("cpu", dataset="fractaldb")


def test_profiles_validate() -> None:
    for name in PROFILES:
        RunSpec.create(name)
