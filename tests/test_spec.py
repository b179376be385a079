"""RunSpec: validation, identity, architecture overrides, budget and the pretraining chain."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments.spec import PROFILES, RunSpec, SpecError
from lightning_modules.catalog import MODELS
from lightning_modules.vit_config import ARCH_FIELDS


def test_run_id_hashes_the_computation_not_the_placement() -> None:
    spec = RunSpec.create("cpu", model="resnet50", train_fraction=0.1)
    assert spec.run_id == RunSpec.create("cpu", model="resnet50", train_fraction=0.1).run_id
    assert spec.run_id == spec.replace(sweep="other", wandb="off", data_dir="/x", num_workers=3).run_id
    for change in (dict(seed=1), dict(train_fraction=0.2), dict(lr=3e-3), dict(model="vit_tiny_p4"),
                   dict(data_seed=1), dict(pretraining="fractaldb")):
        assert spec.replace(**change).run_id != spec.run_id, change


def test_round_trip_through_dict() -> None:
    spec = RunSpec.create("gpu", model="resnet50", pretraining="imagenet", seed=2)
    assert RunSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("overrides, field, value", [
    (dict(model="vgg16"), "model", "vgg16"),
    (dict(dataset="imagenet21k"), "dataset", "imagenet21k"),
    (dict(dataset="torchvision:emnist"), "dataset", "torchvision:emnist"),
    (dict(train_fraction=1.5), "train_fraction", "1.5"),
    (dict(train_fraction=0.0), "train_fraction", "0.0"),
    (dict(max_steps=0, min_steps=0), "min_steps", "0"),
    (dict(max_steps=-3), "max_steps", "-3"),
    (dict(pretraining="jft"), "pretraining", "jft"),
    (dict(model="vit_tiny_p4", pretraining="imagenet"), "pretraining", "imagenet"),
    (dict(lr=True), "lr", "True"),
    (dict(colour="red"), "field", "colour"),
])
def test_bad_values_name_field_value_and_allowed(overrides: dict, field: str, value: str) -> None:
    with pytest.raises(SpecError) as err:
        RunSpec.create("cpu", **overrides)
    message = str(err.value)
    assert "\n" not in message
    assert f"{field}=" in message and value in message and "allowed" in message


def test_torchvision_datasets_are_named_by_a_rule_checked_without_torch() -> None:
    spec = RunSpec.create("cpu", dataset="torchvision:EMNIST:split=balanced", pretraining="torchvision:KMNIST")
    assert spec.net_in_chans == 3 and spec.upstream().dataset == "torchvision:KMNIST"
    assert RunSpec.create("cpu", dataset="stl10").net_in_chans == 3
    with pytest.raises(SpecError, match=r"dataset='torchvision:EMNIST split'.*torchvision:CLASS\[:KEY=VALUE"):
        RunSpec.create("cpu", dataset="torchvision:EMNIST split")


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
    c = RunSpec.create("cpu", model="vit_tiny_p4", train_fraction=0.01, pretraining="fractaldb")
    assert a.upstream().run_id == b.upstream().run_id != c.upstream().run_id
    up = a.upstream()
    assert (up.dataset, up.role, up.pretraining, up.train_fraction) == ("fractaldb", "pretrain", "none", 1.0)
    assert up.max_steps == a.pretrain_steps and up.min_steps == a.pretrain_steps // 2  # stops on its plateau
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


@pytest.mark.parametrize("profile", PROFILES)
def test_a_profile_sets_its_defaults(profile: str) -> None:
    spec = RunSpec.create(profile)
    assert spec.profile == profile
    assert {name: getattr(spec, name) for name in PROFILES[profile]} == PROFILES[profile]
    assert RunSpec.create(profile, lr=0.0123).lr == 0.0123  # an explicit value beats the profile


# A spec.json written before the protocol's and the architecture's fields existed (the cpu profile of then).
OLD_SPEC_JSON = dict(
    model="resnet50", dataset="fashion_mnist", train_fraction=0.1, seed=0, data_seed=0, profile="cpu",
    pretraining="none", pretrain_size=12800, pretrain_classes=64, pretrain_fraction=1.0, pretrain_steps=150,
    img_size=32, in_chans=0, batch_size=128, epochs=3.0, min_steps=80, max_steps=250, num_evals=4, lr=1e-3,
    min_lr_ratio=0.01, weight_decay=0.05, warmup_frac=0.1, label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0,
    drop_path=0.0, augment="none", val_size=2000, precision="bf16-mixed", devices=1, grad_clip=1.0, sweep="adhoc",
    data_dir=None, weights_file=None, wandb="auto", num_workers=0, role="train")


def test_run_ids_made_before_new_fields_are_unchanged() -> None:
    """Pinned ids: runs/ folders made by earlier versions are still found, and their spec.json reruns them."""
    assert RunSpec.from_dict(OLD_SPEC_JSON).run_id == "19e512f21fdc"
    assert RunSpec.from_dict({**OLD_SPEC_JSON, "model": "vit_tiny_p8", "train_fraction": 1.0}).run_id == "e76e567e3dc3"


# ------------------------------------------------------------------ architecture overrides
def test_every_vit_architecture_field_is_a_spec_field() -> None:
    names = {f.name for f in dataclasses.fields(RunSpec)}
    assert set(ARCH_FIELDS) <= names and "model_kwargs" in names


def test_different_architectures_get_different_run_ids() -> None:
    base = RunSpec.create("cpu", model="vit_tiny_p4")
    variants = [base, *(base.replace(**change) for change in (
        dict(patch_size=7), dict(embed_dim=128), dict(depth=6), dict(num_heads=8), dict(mlp_ratio=2.0),
        dict(pos_embed="none"), dict(pos_embed="sincos2d"), dict(pool="avg"), dict(pool="avg", class_token=False),
        dict(patch_size=7, depth=6)))]
    assert len({spec.run_id for spec in variants}) == len(variants)
    cnn = RunSpec.create("cpu", model="resnet18")
    assert cnn.replace(model_kwargs={"drop_rate": 0.2}).run_id not in (cnn.run_id,
                                                                      cnn.replace(model_kwargs={"drop_rate": 0.3}).run_id)


def test_an_override_equal_to_the_registry_is_the_same_net_and_run() -> None:
    base = RunSpec.create("cpu", model="vit_tiny_p4")
    registry = MODELS["vit_tiny_p4"].vit
    same = base.replace(patch_size=registry.patch_size, embed_dim=registry.embed_dim, mlp_ratio=int(registry.mlp_ratio),
                        pos_embed=registry.pos_embed, class_token=registry.class_token)
    assert same.run_id == base.run_id
    assert base.replace(mlp_ratio=3).run_id == base.replace(mlp_ratio=3.0).run_id


def test_overrides_reach_the_net_and_the_pretraining_run() -> None:
    vit = RunSpec.create("cpu", model="vit_tiny_p4", patch_size=7, pool="avg", pretraining="fractaldb")
    assert vit.net_overrides == {"patch_size": 7, "pool": "avg"}
    assert vit.upstream().net_overrides == vit.net_overrides  # fine-tuning loads the same net
    cnn = RunSpec.create("cpu", model="resnet18", model_kwargs={"drop_rate": 0.1})
    assert cnn.net_overrides == {"drop_rate": 0.1} and RunSpec.create("cpu").net_overrides == {}


def test_a_spec_with_overrides_round_trips_through_spec_json() -> None:
    spec = RunSpec.create("cpu", model="resnet18", model_kwargs={"drop_rate": 0.1, "zero_init_last": False})
    again = RunSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.run_id == spec.run_id and hash(again) == hash(spec)
    old = {k: v for k, v in spec.to_dict().items() if k not in (*ARCH_FIELDS, "model_kwargs")}
    assert RunSpec.from_dict({**old, "model_kwargs": {}}).run_id == RunSpec.from_dict(old).run_id  # older spec.json


@pytest.mark.parametrize("overrides, field, value, allowed", [
    (dict(model="resnet50", patch_size=4), "patch_size", "4", "null for resnet50"),
    (dict(model="vit_tiny_p4", patch_size=5), "patch_size", "5", "a divisor of img_size=28"),
    (dict(model="vit_tiny_p4", img_size=30), "patch_size", "4", "a divisor of img_size=30"),
    (dict(model="vit_tiny_p4", num_heads=5), "num_heads", "5", "a divisor of embed_dim=192"),
    (dict(model="vit_tiny_p4", depth=0), "depth", "0", "an integer >= 1"),
    (dict(model="vit_tiny_p4", pos_embed="rope"), "pos_embed", "rope", "learn | sincos2d | none"),
    (dict(model="vit_tiny_p4", pool="max"), "pool", "max", "token | avg"),
    (dict(model="vit_tiny_p4", class_token=False), "class_token", "False", "true with pool=token"),
    (dict(model="vit_tiny_p4", class_token="no"), "class_token", "no", "true | false"),
    (dict(model="vit_s16", pretraining="imagenet", depth=6), "depth", "6", "null with pretraining=imagenet"),
    (dict(model="vit_tiny_p4", model_kwargs={"drop_rate": 0.1}), "model_kwargs", "drop_rate", "a ViT takes"),
    (dict(model="resnet18", model_kwargs={"num_classes": 3}), "model_kwargs", "num_classes", "the spec sets"),
    (dict(model="resnet18", model_kwargs=[0.1]), "model_kwargs", "[0.1]", "a mapping"),
    (dict(model="resnet18", model_kwargs={"drop_rate:0.1": None}), "model_kwargs", "drop_rate", "a mapping"),
    (dict(model="resnet18", model_kwargs={"drop_rate": None}), "model_kwargs", "None", "non-null values"),
])
def test_bad_architecture_overrides_name_field_value_and_allowed(overrides: dict, field: str, value: str,
                                                                 allowed: str) -> None:
    with pytest.raises(SpecError) as err:
        RunSpec.create("cpu", **overrides)
    message = str(err.value)
    assert "\n" not in message and f"invalid {field}=" in message and value in message and allowed in message


# ------------------------------------------------------------------ the protocol (issue 9)
def test_data_seed_follows_the_seed_unless_set() -> None:
    assert [RunSpec.create("cpu", seed=s).data_seed for s in (0, 1, 7)] == [0, 1, 7]
    assert RunSpec.create("cpu", seed=3, data_seed=0).data_seed == 0  # set explicitly: kept
    # the same computation has one id whether data_seed was spelled out or followed the seed
    assert RunSpec.create("cpu", seed=2).run_id == RunSpec.create("cpu", seed=2, data_seed=2).run_id
    assert RunSpec.create("cpu", seed=2).run_id != RunSpec.create("cpu", seed=2, data_seed=0).run_id


def test_a_fixed_budget_is_the_same_at_every_training_size() -> None:
    spec = RunSpec.create("cpu", epochs=0.0, max_steps=320, min_steps=160, num_evals=16)
    assert {spec.train_steps(n) for n in (300, 5_000, 58_000)} == {320}
    legacy = spec.replace(epochs=1.5)  # the rule of earlier runs: the budget follows the data
    assert legacy.train_steps(300) == 160 and legacy.train_steps(58_000) == 320


def test_fields_added_later_keep_earlier_run_ids_at_their_defaults() -> None:
    old = RunSpec.from_dict({**OLD_SPEC_JSON, "pretraining": "fractaldb"})
    for name, value in (("patience", 4), ("val_fraction", 0.1), ("pretrain_epochs", 2.0), ("robust_subset", 500)):
        assert name not in old.canonical()  # at its default: the earlier behaviour, the earlier id
        assert old.replace(**{name: value}).run_id != old.run_id  # set: another computation, another id


def test_pretraining_budget_scales_with_its_size_and_stops_on_its_plateau() -> None:
    small = RunSpec.create("cpu", pretraining="fractaldb", pretrain_size=6_400, pretrain_classes=64,
                           pretrain_epochs=4.0, batch_size=128, num_evals=16, patience=4)
    large = small.replace(pretrain_size=25_600)
    assert small.upstream().max_steps == 200 and large.upstream().max_steps == 800  # 4 passes over each
    assert small.upstream().train_steps(0) == 208  # rounded up to a multiple of the evaluations
    assert small.upstream().patience == 4 and small.upstream().min_steps == 100  # at least half the budget
    assert small.upstream().epochs == 0  # its budget does not follow the target's rule
    fixed = small.replace(pretrain_epochs=0.0, pretrain_steps=300, patience=0)
    assert fixed.upstream().max_steps == fixed.upstream().min_steps == 300


@pytest.mark.parametrize("overrides, field", [
    (dict(patience=-1), "patience"), (dict(val_fraction=1.0), "val_fraction"),
    (dict(pretrain_epochs=-2.0), "pretrain_epochs"), (dict(robust_subset=-5), "robust_subset"),
    (dict(epochs=-1.0), "epochs"), (dict(precision="fp8"), "precision"),
    (dict(pretraining="imagefolder", pretrain_epochs=2.0), "pretrain_epochs"),
])
def test_protocol_fields_are_validated(overrides: dict, field: str) -> None:
    with pytest.raises(SpecError, match=rf"^invalid {field}="):
        RunSpec.create("cpu", **overrides)


def test_precision_auto_is_a_request_resolved_per_machine() -> None:
    spec = RunSpec.create("cpu", precision="auto")
    assert spec.precision == "auto" and spec.run_id != spec.replace(precision="32-true").run_id
