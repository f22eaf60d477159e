"""The weighted split-paths grammar of Megatron-DeepSpeed's `--{train,valid}-weighted-split-paths-path`.

A file holds one line of one or more quoted groups separated by whitespace:

    "train: 0.39 0:0.950 /data/xp3_en, 0.08 0:0.950 /data/xp3_es" "other: 1 0:1 /data/x"

Each entry is exactly three tokens: weight, `S:E` split of the dataset's documents, dataset prefix.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from mtf_train.errors import UserError

SUFFIXES = ("_inputs_document.bin", "_inputs_document.idx", "_targets_document.bin", "_targets_document.idx")


class PathFileError(UserError):
    pass


@dataclass(frozen=True)
class Entry:
    weight: float
    start: float
    end: float
    prefix: str
    weight_text: str  # as written, so that a rewritten file keeps the original digits
    split_text: str

    def files(self) -> list[str]:
        return [self.prefix + s for s in SUFFIXES]

    def doc_range(self, n_docs: int) -> tuple[int, int]:
        """Documents `[round(S*n), round(E*n))` of a dataset of `n_docs` documents."""
        return int(round(self.start * n_docs)), int(round(self.end * n_docs))


@dataclass(frozen=True)
class Group:
    name: str
    entries: tuple[Entry, ...]

    def normalised_weights(self) -> list[float]:
        total = sum(e.weight for e in self.entries)
        return [e.weight / total for e in self.entries]


_GROUP = re.compile(r'"([^"]*)"')


def parse_groups(text: str, where: str) -> list[Group]:
    """Parse the grammar; errors name `where`, the group, the entry and the 1-based column."""
    line = text.rstrip("\n")
    if "\n" in line:
        raise PathFileError(where, f"line 2: a path file holds exactly one line")
    groups: list[Group] = []
    pos = 0
    for m in _GROUP.finditer(line):
        gap = line[pos:m.start()]
        if gap.strip():
            col = pos + len(gap) - len(gap.lstrip()) + 1
            raise PathFileError(where, f"column {col}: text outside a quoted group: {gap.strip()!r}")
        groups.append(_parse_group(m.group(1), m.start(1), where))
        pos = m.end()
    rest = line[pos:]
    if rest.strip():
        col = pos + len(rest) - len(rest.lstrip()) + 1
        what = "unterminated quote" if '"' in rest else f"text outside a quoted group: {rest.strip()!r}"
        raise PathFileError(where, f"column {col}: {what}")
    if not groups:
        raise PathFileError(where, 'no group found; expected "NAME: WEIGHT S:E PREFIX, ..."')
    names = [g.name for g in groups]
    for name in names:
        if names.count(name) > 1:
            raise PathFileError(where, f"group {name!r} appears twice")
    return groups


def _parse_group(body: str, offset: int, where: str) -> Group:
    name, colon, rest = body.partition(":")
    if not colon or not name.strip() or " " in name.strip():
        raise PathFileError(where, f"column {offset + 1}: a group starts with 'NAME:', got {body[:30]!r}")
    name = name.strip()
    entries = []
    col = offset + len(name) + 1  # column just after the colon (0-based)
    for i, chunk in enumerate(rest.split(","), start=1):
        lead = len(chunk) - len(chunk.lstrip())
        here = f"group {name!r}, entry {i}, column {col + lead + 1}"
        tokens = chunk.split()
        if len(tokens) != 3:
            raise PathFileError(where, f"{here}: expected 'WEIGHT S:E PREFIX', got {chunk.strip()!r}")
        w_text, split_text, prefix = tokens
        try:
            weight = float(w_text)
        except ValueError:
            raise PathFileError(where, f"{here}: weight {w_text!r} is not a number") from None
        if not weight > 0:
            raise PathFileError(where, f"{here}: weight must be positive, got {w_text}")
        s_text, sep, e_text = split_text.partition(":")
        try:
            start, end = float(s_text), float(e_text)
        except ValueError:
            start = end = -1.0
        if not sep or not (0 <= start < end <= 1):
            raise PathFileError(where, f"{here}: split {split_text!r} must be S:E with 0 <= S < E <= 1")
        entries.append(Entry(weight, start, end, prefix, w_text, split_text))
        col += len(chunk) + 1
    return Group(name, tuple(entries))


def read_path_file(path: str | os.PathLike) -> list[Group]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise PathFileError(str(path), f"cannot read: {err.strerror or err}") from None
    return parse_groups(text, str(path))


def format_groups(groups: list[Group]) -> str:
    """The one-line file text, newline-terminated."""
    quoted = []
    for g in groups:
        entries = ", ".join(f"{e.weight_text} {e.split_text} {e.prefix}" for e in g.entries)
        quoted.append(f'"{g.name}: {entries}"')
    return " ".join(quoted) + "\n"


def rebase(groups: list[Group], root: str | os.PathLike) -> list[Group]:
    """Join relative prefixes onto `root`; absolute ones stay as they are."""
    out = []
    for g in groups:
        entries = tuple(e if os.path.isabs(e.prefix) else replace(e, prefix=os.path.join(str(root), e.prefix))
                        for e in g.entries)
        out.append(Group(g.name, entries))
    return out


def missing_files(groups: list[Group]) -> list[str]:
    return [f for g in groups for e in g.entries for f in e.files() if not os.path.isfile(f)]
