"""Untrusted input (sweep files, spec files, command-line values): read within bounds, described in one short line.

YAML is read only through `yaml.safe_load`, which builds plain data and never Python objects. Anchors
and aliases are legal YAML, and safe_load shares an aliased object instead of copying it, so a "billion
laughs" file loads small; it explodes only when something walks it as a tree (comparing two values,
formatting an error, hashing a spec). `check_size` counts the values as if the aliases were expanded
(memoised per object, so the count costs one pass over the distinct objects and stops at the bound) and
refuses more than `MAX_NODES`, nesting deeper than `MAX_DEPTH`, and a value that contains itself. `brief`
writes any value as a short single line for an error message, and `OneLineParser` refuses a command line
with one line, not argparse's usage block.
"""

from __future__ import annotations

import argparse
import os
import reprlib
from collections.abc import Iterable
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a sweep or spec file: the shipped ones are a few KiB
MAX_NODES = 100_000  # values in one file once aliases are expanded (a sweep of MAX_RUNS runs needs far fewer)
MAX_DEPTH = 32  # nesting of mappings and lists (the shipped sweeps nest 5 deep)

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


class InputError(ValueError):
    """Input outside the bounds this module enforces; str() is one line."""


def read_bounded(path: str | os.PathLike[str]) -> bytes:
    """The file's first MAX_BYTES + 1 bytes: enough for `decode` to refuse a larger file without reading it all.

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        return f.read(MAX_BYTES + 1)


def decode(data: bytes) -> str:
    """`data` as UTF-8 text, at most MAX_BYTES of it.

    Raises:
        InputError: too large, or not UTF-8 (naming the first bad byte and its offset).
    """
    if len(data) > MAX_BYTES:
        raise InputError(f"{len(data)} bytes (allowed: at most {MAX_BYTES} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)`, refused when the result is larger or deeper than the bounds.

    Raises:
        yaml.YAMLError: malformed YAML (the caller says where).
        InputError: nested beyond what the parser can follow, an integer too long to convert, or
            `check_size` refuses the result.
    """
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise InputError(f"nested too deeply (allowed: at most {MAX_DEPTH} levels)") from None
    except yaml.YAMLError:
        raise
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise InputError(f"a value YAML cannot hold ({str(exc).splitlines()[0][:120]})") from None
    check_size(value)
    return value


def _children(node: Any) -> Iterable[Any]:
    return [item for pair in node.items() for item in pair] if isinstance(node, dict) else node


def check_size(value: Any, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> None:
    """Refuse plain data (dicts, lists, scalars) that is too large once shared parts are counted each time
    they appear, nested too deeply, or contains itself.

    Raises:
        InputError: naming the bound.
    """
    if not isinstance(value, (dict, list)):
        return
    done: dict[int, tuple[int, int]] = {}  # id -> (values, depth) of a container measured already
    path: list[tuple[Any, Any, list[int]]] = []  # (container, its children left, [values, depth below])
    on_path: set[int] = set()

    def enter(node: Any) -> None:
        if id(node) in on_path:
            raise InputError("a value that contains itself (an alias to one of its own parents)")
        if len(path) >= max_depth:
            raise InputError(f"nested deeper than {max_depth} levels (allowed: at most {max_depth})")
        on_path.add(id(node))
        path.append((node, iter(_children(node)), [1, 0]))

    def add(counts: list[int], nodes: int, depth: int) -> None:
        counts[0] += nodes
        counts[1] = max(counts[1], depth)
        if counts[0] > max_nodes:
            raise InputError(f"more than {max_nodes} values once YAML aliases are expanded "
                             f"(allowed: at most {max_nodes})")

    enter(value)
    while path:
        node, left, counts = path[-1]
        child = next(left, left)
        if child is left:  # all children counted
            path.pop()
            on_path.discard(id(node))
            done[id(node)] = (counts[0], counts[1] + 1)
            if path:
                add(path[-1][2], *done[id(node)])
        elif not isinstance(child, (dict, list)):
            add(counts, 1, 0)
        elif id(child) in done:
            nodes, depth = done[id(child)]
            if len(path) + depth > max_depth:
                raise InputError(f"nested deeper than {max_depth} levels (allowed: at most {max_depth})")
            add(counts, nodes, depth)
        else:
            enter(child)


def brief(value: Any, quote: bool = False) -> str:
    """`value` as a short single line: a printable string as itself (`quote`: as its repr), anything else as a
    repr cut to a few items per level and a few levels."""
    if isinstance(value, str) and not quote and value.isprintable() and len(value) <= _REPR.maxstring:
        return value
    try:
        return _REPR.repr(value)
    except ValueError:  # an integer of more digits than Python writes
        return f"<an integer of {value.bit_length()} bits>"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose refusals are one line (exit code 2), as every bad input of the suite's commands."""

    def error(self, message: str) -> None:  # type: ignore[override]
        text = " ".join(message.split())
        text = text if len(text) <= 300 else text[:297] + "..."
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")
