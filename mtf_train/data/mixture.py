"""Mixtures: datasets with sizes and upsampling factors, written out as weighted split-path files.

A dataset's weight is its size over the total size, times its upsampling factor (xP3: code x 1.3); weights
are written as Python's `str(round(w, 10))`, entries in descending order of weight, as in the 2022 files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mtf_train.data.pathfile import Entry, Group, format_groups
from mtf_train.errors import UserError
from mtf_train.recipe.yamlio import load_yaml


class MixtureError(UserError):
    pass


@dataclass
class Dataset:
    name: str
    size: float
    upsample: float = 1.0
    prefix: str = ""


@dataclass
class Mixture:
    datasets: list[Dataset]
    splits: dict[str, str]        # group name -> "S:E"
    outputs: dict[str, str]       # group name -> file name
    groups: dict[str, str] = field(default_factory=dict)  # split name -> group name written in the file

    def weights(self) -> list[tuple[Dataset, float]]:
        total = sum(d.size for d in self.datasets)
        weighted = [(d, d.size / total * d.upsample) for d in self.datasets]
        return sorted(weighted, key=lambda dw: -dw[1])

    def path_files(self) -> dict[str, str]:
        """File name -> file text for every split."""
        out = {}
        for split, s_e in self.splits.items():
            entries = tuple(Entry(w, *map(float, s_e.split(":")), d.prefix, str(round(w, 10)), s_e)
                            for d, w in self.weights())
            out[self.outputs[split]] = format_groups([Group(self.groups.get(split, split), entries)])
        return out


def load_mixture(path: str | os.PathLike) -> Mixture:
    where = str(path)
    try:
        raw = load_yaml(Path(path).read_text())
    except OSError as err:
        raise MixtureError(where, f"cannot read: {err.strerror or err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), list) or not raw["datasets"]:
        raise MixtureError(where, "datasets: a non-empty list is required")
    prefix_tpl = raw.get("prefix", "{name}")
    datasets = []
    for i, d in enumerate(raw["datasets"]):
        if not isinstance(d, dict) or "name" not in d or "size" not in d:
            raise MixtureError(where, f"datasets[{i}]: needs 'name' and 'size'")
        size, up = d["size"], d.get("upsample", 1.0)
        if not isinstance(size, (int, float)) or isinstance(size, bool) or size <= 0:
            raise MixtureError(where, f"datasets[{i}].size: must be a positive number, got {size!r}")
        if not isinstance(up, (int, float)) or isinstance(up, bool) or up <= 0:
            raise MixtureError(where, f"datasets[{i}].upsample: must be a positive number, got {up!r}")
        name = str(d["name"])
        datasets.append(Dataset(name, float(size), float(up), d.get("prefix", prefix_tpl.format(name=name))))
    splits = raw.get("splits") or {"train": "0:1"}
    outputs = raw.get("outputs") or {s: f"{Path(path).stem}_{s}.txt" for s in splits}
    for s in splits:
        if s not in outputs:
            raise MixtureError(where, f"outputs.{s}: no file name for split {s!r}")
    return Mixture(datasets, dict(splits), dict(outputs), dict(raw.get("groups") or {}))


def write_path_files(mixture: Mixture, out_dir: str | os.PathLike) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in mixture.path_files().items():
        target = out / name
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, target)
        written.append(target)
    return written
