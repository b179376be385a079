"""Bad input, generated (hypothesis): malformed sweep files, spec files and command-line flags are each refused
before any work, with one line on stderr and exit code 2: never a traceback, never a run directory.

Every generated input is invalid by construction; the real commands run in this process, with the step
after validation (the runner, or the run) replaced by one that fails the test, so an input that slipped
through would be caught rather than trained. The examples are fixed (`derandomize`) so CI sees the same
ones every time; each test is bounded by a timeout, as an alias bomb that got expanded would hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.untrusted import MAX_BYTES, MAX_DEPTH, MAX_NODES
from experiments import sweep as sweep_module
from experiments import train as train_module
from experiments.precision import PRECISIONS
from experiments.spec import AUGMENTS, PROFILES, WANDB_MODES, RunSpec
from experiments.sweep import MAX_RUNS, METHODS, PARAMETERS, TOP_LEVEL_KEYS
from lightning_modules.catalog import DATASETS, MODELS, PRETRAINING_SOURCES
from lightning_modules.vit_config import ARCH_FIELDS
from test_sweep import ENV, REPO, tiny_config

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BASE = tiny_config(pretraining={"value": "none"})  # a valid sweep: 2 runs of resnet18 on synthetic data
GOOD = RunSpec.create("cpu", **{name: entry["values"][0] if "values" in entry else entry["value"]
                                for name, entry in BASE["parameters"].items() if name != "profile"})

# ------------------------------------------------------------------ invalid values, by field
INT_FIELDS = ("seed", "data_seed", "pretrain_size", "pretrain_classes", "pretrain_steps", "img_size", "in_chans",
              "batch_size", "min_steps", "max_steps", "num_evals", "val_size", "devices", "patience",
              "robust_subset", "explain_images", "num_workers")
UNIT_FLOATS = ("train_fraction", "pretrain_fraction", "lr", "min_lr_ratio", "weight_decay", "warmup_frac",
               "label_smoothing", "drop_path", "val_fraction")  # bounded above by 1
OPEN_FLOATS = ("epochs", "mixup_alpha", "cutmix_alpha", "grad_clip", "pretrain_epochs")  # >= 0
CHOICES: dict[str, tuple[str, ...]] = {
    "model": tuple(MODELS), "dataset": tuple(DATASETS), "profile": tuple(PROFILES),
    "pretraining": (*PRETRAINING_SOURCES, *DATASETS), "augment": AUGMENTS, "precision": PRECISIONS,
    "wandb": WANDB_MODES}
BOOLEANS = ("channels_last", "fused_attention", "compile", "resident", "shift_eval")  # the fast-path switches, ...
BOOLEAN_WORDS = {"true", "false", "auto", "yes", "no", "on", "off", "1", "0", "y", "n"}
BOUNDS = {"img_size": (8, 1024), "seed": (0, 2**32 - 1)}  # the integers with an upper bound too

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20))
containers = st.one_of(st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=3))
not_a_number = st.one_of(st.text(max_size=20), st.booleans(), containers)


def invalid_values(name: str) -> st.SearchStrategy[Any]:
    """Values a sweep or spec must refuse for the RunSpec field `name` (given GOOD's other fields)."""
    if name in INT_FIELDS:
        low, high = BOUNDS.get(name, (0, None))
        out_of_range = st.integers(max_value=-1) | st.integers(max_value=low - 1) if low > 0 \
            else st.integers(max_value=-1)
        if high is not None:
            out_of_range |= st.integers(min_value=high + 1, max_value=2**70)
        if name == "in_chans":
            out_of_range |= st.integers(4, 10**6) | st.just(2)
        non_integral = st.floats(allow_nan=True).filter(lambda x: not (math.isfinite(x) and x.is_integer()))
        wrong = st.one_of(not_a_number, non_integral, st.floats(-1e6, 1e6).map(float).filter(float.is_integer))
        return st.one_of(out_of_range, wrong, *([st.none()] if name != "data_seed" else []))
    if name in UNIT_FLOATS or name in OPEN_FLOATS:
        out_of_range = st.floats(max_value=-1e-9) | st.integers(max_value=-1) | st.sampled_from(
            [math.nan, math.inf, -math.inf])
        if name in UNIT_FLOATS:
            out_of_range |= st.floats(min_value=1.0000001, allow_infinity=False) | st.integers(2, 10**9)
        return st.one_of(out_of_range, not_a_number, st.none())
    if name in CHOICES:
        unknown = st.text(max_size=30).filter(lambda s: s not in CHOICES[name] and not s.startswith("torchvision:"))
        return st.one_of(unknown, st.none(), st.booleans(), st.integers(), st.floats(), containers)
    if name == "sweep":
        return st.one_of(st.text(max_size=20).filter(lambda s: not s.replace("_", "").replace("-", "").isalnum()),
                         st.sampled_from(["..", "../elsewhere", "a/b", "a b", ""]), st.integers(), containers)
    if name in ARCH_FIELDS:  # the base net is a CNN: every architecture override is refused
        return st.one_of(st.integers(1, 64), st.sampled_from(["avg", "token", "none"]), st.booleans(), containers)
    if name == "model_kwargs":
        bad_key = st.text(max_size=10).filter(lambda k: not k.isidentifier())
        return st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(bad_key, scalars, min_size=1),
                         st.dictionaries(st.sampled_from(["drop_rate", "num_classes", "in_chans"]), st.none(),
                                         min_size=1), st.just({"num_classes": 3}), st.just({"pretrained": True}))
    if name in ("data_dir", "weights_file"):
        return st.one_of(st.integers(), st.booleans(), st.floats(), containers)
    if name in BOOLEANS:  # true | false (resident: or auto); words a flag or YAML reads as a boolean are fine
        words = st.text(max_size=20).filter(lambda s: s.strip().lower() not in BOOLEAN_WORDS)
        return st.one_of(words, st.integers(), st.floats(), st.none(), containers)
    raise AssertionError(f"no invalid values for {name}")


FIELDS = [f.name for f in dataclasses.fields(RunSpec) if f.name != "role"]
assert set(FIELDS) == set(PARAMETERS)


@st.composite
def bad_field(draw: st.DrawFn) -> tuple[str, Any]:
    name = draw(st.sampled_from(FIELDS))
    return name, draw(invalid_values(name))


# ------------------------------------------------------------------ invalid sweep files
def dump(config: Any) -> bytes:
    return yaml.safe_dump(config, allow_unicode=True).encode("utf-8")


@st.composite
def bad_parameter(draw: st.DrawFn) -> bytes:
    """A valid sweep with one parameter set to an invalid value, alone or after a valid one."""
    name, value = draw(bad_field())
    entry = draw(st.sampled_from([{"value": value}, {"values": [getattr(GOOD, name), value]}]))
    if entry.get("values") and entry["values"][0] == value:  # equal to the valid one: a duplicate, also refused
        entry = {"values": [value, value]}
    return dump({**BASE, "parameters": {**BASE["parameters"], name: entry}})


@st.composite
def bad_structure(draw: st.DrawFn) -> bytes:
    """A valid sweep with a key, an entry or a top-level value of the wrong shape."""
    config = json.loads(json.dumps(BASE))
    kind = draw(st.sampled_from(["key", "parameter name", "entry", "method", "run_cap", "parameters", "metric"]))
    if kind == "key":
        config[draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in TOP_LEVEL_KEYS))] = draw(scalars)
    elif kind == "parameter name":
        config["parameters"][draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in PARAMETERS))] = {
            "value": 1}
    elif kind == "entry":
        name = draw(st.sampled_from(FIELDS))
        config["parameters"][name] = draw(st.one_of(
            scalars, st.lists(scalars, max_size=3), st.just({}), st.just({"values": []}),
            st.builds(lambda v: {"value": v, "values": [v]}, scalars), st.builds(lambda v: {"values": v}, scalars),
            st.just({"min": 1, "max": 2}), st.just({"distribution": "uniform"})))
    elif kind == "method":
        config["method"] = draw(st.one_of(st.text(max_size=10).filter(lambda m: m not in METHODS), containers,
                                          st.integers(), st.none()))
    elif kind == "run_cap":
        config["run_cap"] = draw(st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.text(max_size=5),
                                           containers))
    elif kind == "parameters":
        config["parameters"] = draw(st.one_of(st.just({}), scalars, st.lists(scalars, max_size=3)))
    else:
        config["metric"] = draw(st.one_of(scalars, st.lists(scalars, max_size=2),
                                          st.builds(lambda n: {"name": n}, st.one_of(st.integers(), st.none(),
                                                                                   containers))))
    return dump(config)


@st.composite
def huge_grid(draw: st.DrawFn) -> bytes:
    """Valid values whose grid has more runs than a sweep may hold (up to ~10^20: never expanded)."""
    names = ("seed", "data_seed", "robust_subset", "explain_images", "num_workers", "patience")
    sizes = draw(st.lists(st.integers(2, 300), min_size=2, max_size=len(names))
                 .filter(lambda s: math.prod(s) > MAX_RUNS))
    parameters = {**BASE["parameters"], **{n: {"values": list(range(k))} for n, k in zip(names, sizes)}}
    return dump({**BASE, "parameters": parameters})


def alias_bomb(width: int, depth: int, where: str) -> bytes:
    """A "billion laughs": level k is a list of `width` aliases to level k - 1 (width ** depth values expanded)."""
    levels = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    levels += [f"&l{k} [" + ", ".join([f"*l{k - 1}"] * width) + "]" for k in range(1, depth + 1)]
    body = {
        "values": f"profile: {{values: [{', '.join(levels)}]}}",  # an error message would print them
        "kwargs": f"model_kwargs: {{value: {{levels: [{', '.join(levels)}]}}}}",  # a spec would hash them
        "twins": f"model: {{values: [{', '.join(levels)}, {', '.join(lv.replace('&l', '&m').replace('*l', '*m') for lv in levels)}]}}",  # noqa: E501 - equal but separate: comparing them walks both
        "unused": f"model: {{value: resnet18}}\ndescription: [{', '.join(levels)}]",
    }[where]
    return f"method: grid\nparameters:\n  {body}\n".encode()


@st.composite
def yaml_bombs(draw: st.DrawFn) -> bytes:
    where = draw(st.sampled_from(["values", "kwargs", "twins", "unused"]))
    if draw(st.booleans()):
        width = draw(st.integers(2, 12))
        least = math.ceil(math.log(MAX_NODES, width))  # width ** least values once expanded: more than allowed
        return alias_bomb(width, draw(st.integers(least, least + 30)), where)
    return b"method: grid\nparameters:\n  model: &self {values: [*self]}\n"  # contains itself


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(MAX_DEPTH, 1500))
    style = draw(st.sampled_from(["flow list", "flow map", "block"]))
    if style == "flow list":
        value = "[" * depth + "1" + "]" * depth
    elif style == "flow map":
        value = "{a: " * depth + "1" + "}" * depth
    else:
        depth = min(depth, 400)
        value = "".join(f"\n{'  ' * (k + 3)}a:" for k in range(depth)) + " 1"
    return f"method: grid\nparameters:\n  model_kwargs:\n    value: {value}\n".encode()


@st.composite
def not_utf8(draw: st.DrawFn) -> bytes:
    text = dump(BASE)
    at = draw(st.integers(0, len(text)))
    bad = draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82",
                                b"\xf8\x88\x80\x80\x80", b"\x80"]))
    return text[:at] + bad + text[at:]


@st.composite
def huge_numbers_and_files(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        digits = "1" * draw(st.integers(4301, 30_000))  # more digits than Python converts by default
        field = draw(st.sampled_from(["seed", "max_steps", "lr"]))
        return f"method: grid\nparameters:\n  {field}: {{value: {digits}}}\n".encode()
    return dump(BASE) + b"# " + b"x" * draw(st.integers(MAX_BYTES, MAX_BYTES + 4096)) + b"\n"


def no_sweep(data: bytes) -> bool:
    """Whether `data` is not a valid sweep file (random bytes almost never are; one that was is left out)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sweep.yaml"
        path.write_bytes(data)
        try:
            sweep_module.load_sweep(path)
        except Exception:  # noqa: BLE001 - refused, well or badly: the test says which
            return True
    return False


arbitrary = st.one_of(st.binary(max_size=600), st.text(max_size=600).map(str.encode),
                      st.lists(st.sampled_from(["method: grid\n", "parameters:\n", "  model: {value: resnet18}\n",
                                                "  &a x: *a\n", "- ", "{", "}", "[", "]", ": ", "!!python/object ",
                                                "!!binary aGk=\n", "? [a, b]\n", "%YAML 1.1\n", "---\n", "\t",
                                                "\x00", "\ufeff"]), max_size=12).map(lambda p: "".join(p).encode()))


# ------------------------------------------------------------------ the commands, in this process
@contextlib.contextmanager
def no_work() -> Iterator[None]:
    """Whatever comes after validation fails the test: the sweep's runners and the training of a run."""
    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the input was accepted: work started")

    with mock.patch.object(sweep_module, "LocalRunner", started), \
            mock.patch("experiments.slurm.SlurmRunner", started), mock.patch.object(train_module, "run", started):
        yield


def refused(command: Callable[[list[str]], int], argv: list[str], runs: Path) -> str:
    """Run a command's `main(argv)`; check it refused its input with exit code 2, one line and no run directory;
    return the line."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), no_work():
        try:
            code = command([*argv, "--runs-dir", str(runs)])
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code
    lines = err.getvalue().strip().splitlines()
    assert code == 2, (code, err.getvalue()[-2000:])
    assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()[-2000:]
    assert out.getvalue() == "" and not runs.exists()
    assert len(lines[0]) < 1000, lines[0][:200]  # one short line, however large the input
    return lines[0]


def refused_sweep(data: bytes, *flags: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sweep.yaml"
        path.write_bytes(data)
        line = refused(sweep_module.main, [str(path), *flags], Path(folder) / "runs")
    assert line.startswith(f"{path}: "), line  # it names the file
    return line


# kind -> (inputs, examples): the large inputs take longer to parse, so fewer of them
SWEEP_CASES = {"bad_parameter": (bad_parameter(), 60), "bad_structure": (bad_structure(), 60),
               "huge_grid": (huge_grid(), 10), "alias_bomb": (yaml_bombs(), 30), "deep_nesting": (deep_nesting(), 10),
               "not_utf8": (not_utf8(), 20), "huge_number_or_file": (huge_numbers_and_files(), 10)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "bad_parameter" else c for c in SWEEP_CASES])
@pytest.mark.parametrize("flags", [("--dry-run",), ()], ids=["dry-run", "run"])
def test_malformed_sweep_files_are_refused_with_one_line(case: str, flags: tuple[str, ...]) -> None:
    inputs, examples = SWEEP_CASES[case]

    @settings(FUZZ, max_examples=examples)
    @given(inputs)
    def check(data: bytes) -> None:
        refused_sweep(data, *flags)

    check()


@pytest.mark.timeout(300)
@FUZZ
@given(arbitrary.filter(no_sweep))
def test_arbitrary_bytes_are_refused_with_one_line(data: bytes) -> None:
    refused_sweep(data, "--dry-run")


@pytest.mark.timeout(300)
@settings(FUZZ, max_examples=10)
@given(huge_grid())
def test_a_grid_too_large_names_the_cap(data: bytes) -> None:
    assert f"at most {MAX_RUNS} runs" in refused_sweep(data, "--dry-run")


# ------------------------------------------------------------------ invalid spec files and flags
@pytest.mark.timeout(300)
@FUZZ
@given(st.one_of(
    bad_field().map(lambda nv: json.dumps({**GOOD.to_dict(), nv[0]: nv[1]}).encode()),
    st.sampled_from(FIELDS).map(lambda n: json.dumps({k: v for k, v in GOOD.to_dict().items() if k != n}).encode()),
    st.text(min_size=1, max_size=20).filter(lambda k: k not in FIELDS + ["role"])
    .map(lambda k: json.dumps({**GOOD.to_dict(), k: 1}).encode()),
    st.integers(1000, 100_000).map(lambda n: ("[" * n + "]" * n).encode()),
    st.binary(max_size=200), not_utf8(), st.just(b'{"seed": ' + b"1" * 5000 + b"}")))
def test_malformed_spec_files_are_refused_with_one_line(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spec.json"
        path.write_bytes(data)
        if _is_valid_spec(data):
            return
        refused(train_module.main, ["--spec", str(path)], Path(folder) / "runs")


def _is_valid_spec(data: bytes) -> bool:
    """A field removed whose default is valid (data_seed, the later fields) leaves a valid spec."""
    try:
        RunSpec.from_dict(json.loads(data))
    except Exception:  # noqa: BLE001 - anything that does not make a spec
        return False
    return True


FLAG_FIELDS = [f for f in FIELDS if f not in ("data_dir", "weights_file", "sweep", "profile")]


@st.composite
def bad_flags(draw: st.DrawFn) -> list[str]:
    """One `--flag value` of experiments.train with a value it must refuse."""
    name = draw(st.sampled_from(FLAG_FIELDS))
    flag = draw(st.sampled_from(["--" + name.replace("_", "-"), "--" + name]))
    if name in ("model_kwargs", "class_token"):  # read as YAML
        text = draw(st.one_of(
            st.builds(lambda w, d: alias_bomb(w, d, "kwargs").decode().split("value: ", 1)[1].rsplit("}", 1)[0],
                      st.integers(2, 10), st.integers(8, 30)),
            st.integers(MAX_DEPTH, 5000).map(lambda n: "{a: " * n + "1" + "}" * n),
            st.integers(4301, 10_000).map(lambda n: "{a: " + "7" * n + "}"),
            st.sampled_from(["[1, 2]", "3", "yes please", "{1: 2}", "{a: null}", "{num_classes: 3}"])))
    else:
        value = draw(invalid_values(name).filter(lambda v: v is not None))
        text = value if isinstance(value, str) else json.dumps(value)
    return [f"{flag}={text}" if text.startswith("-") else flag, *([] if text.startswith("-") else [text])]


@pytest.mark.timeout(300)
@FUZZ
@given(bad_flags())
def test_malformed_train_flags_are_refused_with_one_line(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        try:
            spec = train_module.spec_from_args(train_module.build_parser().parse_args(argv))
        except (SystemExit, ValueError):
            spec = None
        if spec is not None:  # a value the flag's text reads as valid (e.g. "1.0" for an integer): not bad input
            return
        refused(train_module.main, argv, Path(folder) / "runs")


# ------------------------------------------------------------------ the commands, as processes
PROCESS_CASES = {
    "alias bomb": alias_bomb(9, 12, "values"),
    "alias bomb in kwargs": alias_bomb(9, 12, "kwargs"),
    "deep nesting": b"method: grid\nparameters: {model_kwargs: {value: " + b"[" * 50_000 + b"]" * 50_000 + b"}}\n",
    "not UTF-8": dump(BASE).replace(b"resnet18", b"resnet\xff18"),
    "huge grid": dump({**BASE, "parameters": {**BASE["parameters"], **{
        n: {"values": list(range(100))} for n in ("seed", "data_seed", "num_workers", "robust_subset", "patience")}}}),
    "huge number": b"method: grid\nparameters: {seed: {value: " + b"9" * 10_000 + b"}}\n",
    "huge file": dump(BASE) + b"#" * (MAX_BYTES + 1),
    "wrong type": dump({**BASE, "parameters": {**BASE["parameters"], "model": {"value": ["resnet18"]}}}),
    "unknown key": dump({**BASE, "parametres": {}}),
    "empty grid": dump({**BASE, "parameters": {**BASE["parameters"], "seed": {"values": []}}}),
    "empty file": b"",
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("flags", [("--dry-run",), ()], ids=["dry-run", "run"])
def test_the_sweep_command_refuses_each_kind_with_one_line(tmp_path: Path, flags: tuple[str, ...]) -> None:
    for case, data in PROCESS_CASES.items():
        path = tmp_path / f"{case.replace(' ', '_')}.yaml"
        path.write_bytes(data)
        proc = subprocess.run([sys.executable, "-m", "experiments.sweep", str(path), *flags, "--runs-dir",
                               str(tmp_path / "runs")], cwd=REPO, env=ENV, capture_output=True, text=True,
                              timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{path}: "), (case, proc.stderr[-2000:])
        assert proc.stdout == "" and not (tmp_path / "runs").exists(), case


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_train_command_refuses_bad_flags_with_one_line(tmp_path: Path) -> None:
    cases = [["--max-steps", "x"], ["--lr", "0.5.1"], ["--seed", "-3"], ["--seed", str(2**32)],
             ["--model-kwargs", alias_bomb(9, 12, "kwargs").decode().split("value: ", 1)[1].rsplit("}", 1)[0]],
             ["--model-kwargs", "{a: " * 3000 + "1" + "}" * 3000], ["--spec", str(tmp_path / "missing.json")],
             ["--profile", "laptop"], ["--no-such-flag", "1"]]
    for argv in cases:
        proc = subprocess.run([sys.executable, "-m", "experiments.train", *argv, "--runs-dir", str(tmp_path / "runs")],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (argv[0], proc.stderr[-2000:])
        assert not (tmp_path / "runs").exists(), argv[0]
