"""Mixtures: datasets with sizes and upsampling factors, written out as weighted split-path files.

A dataset's weight is its size over the total size, times its upsampling factor (xP3: code x 1.3); weights
are written as Python's `str(round(w, 10))`, entries in descending order of weight, as in the 2022 files.

A size is a number (xP3: `du` of each merged jsonl, in KiB) or `measure`: the bytes of the dataset's merged
jsonl when it names one (`jsonl:`, a file or a folder of *.jsonl), else the tokens (inputs + targets) of its
indexed dataset. Relative `jsonl` paths and prefixes are measured under `root:` (relative to the mixture
file; the `--root` option overrides it); the path files keep the prefixes as written, for a recipe's
`data.root` to rebase. A dataset may override the splits (`splits: {validation: null}` leaves it out of
that file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mtf_train.data.errors import DataError
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
    splits: dict = field(default_factory=dict)   # split name -> "S:E", or None to leave the dataset out
    measured: str = ""                           # how a measured size was found, for the command's output


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
        for split, default in self.splits.items():
            entries = []
            for d, w in self.weights():
                s_e = d.splits.get(split, default)
                if s_e is None:
                    continue
                entries.append(Entry(w, *map(float, s_e.split(":")), d.prefix, str(round(w, 10)), s_e))
            out[self.outputs[split]] = format_groups([Group(self.groups.get(split, split), tuple(entries))])
        return out


def _check_split(value, where: str, what: str) -> str:
    text = str(value)
    s_text, sep, e_text = text.partition(":")
    try:
        ok = bool(sep) and 0 <= float(s_text) < float(e_text) <= 1
    except ValueError:
        ok = False
    if not ok:
        raise MixtureError(where, f"{what}: split {text!r} must be S:E with 0 <= S < E <= 1")
    return text


def _positive(value, where: str, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise MixtureError(where, f"{what}: must be a positive number, got {value!r}")
    return float(value)


def measure_jsonl_bytes(path: Path) -> int:
    """Bytes of a merged jsonl, or of all *.jsonl files under a folder."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no *.jsonl under {path}")
        return sum(p.stat().st_size for p in files)
    return path.stat().st_size


def measure_tokens(prefix: str) -> int:
    """Tokens of inputs and targets of an indexed MTF dataset, read from its two .idx files with numpy (each
    checked against its .bin): a mixture is written on a login node in a fraction of a second, without torch."""
    from mtf_train.data.indexed import pair_index

    return int(pair_index(prefix).sum())


def load_mixture(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Mixture:
    """Read a mixture file; `measure` sizes are measured under `root` (default: the file's `root:`)."""
    where = str(path)
    try:
        raw = load_yaml(Path(path).read_text())
    except OSError as err:
        raise MixtureError(where, f"cannot read: {err.strerror or err}") from None
    except Exception as err:  # YAML syntax: report the position on one line
        mark = getattr(err, "problem_mark", None)
        pos = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise MixtureError(where, f"{pos}invalid YAML: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), list) or not raw["datasets"]:
        raise MixtureError(where, "datasets: a non-empty list is required")
    known = {"prefix", "splits", "outputs", "groups", "datasets", "root", "jsonl"}
    for key in raw:
        if key not in known:
            raise MixtureError(where, f"{key}: unknown key; known: {', '.join(sorted(known))}")
    base = Path(path).resolve().parent
    root_dir = Path(os.path.normpath(Path(root).resolve() if root is not None else base / str(raw.get("root", "."))))
    prefix_tpl = str(raw.get("prefix", "{name}"))
    jsonl_tpl = raw.get("jsonl")
    splits = raw.get("splits") or {"train": "0:1"}
    if not isinstance(splits, dict):
        raise MixtureError(where, "splits: a mapping of split name to S:E is required")
    splits = {str(k): _check_split(v, where, f"splits.{k}") for k, v in splits.items()}
    datasets = []
    for i, d in enumerate(raw["datasets"]):
        here = f"datasets[{i}]"
        if not isinstance(d, dict) or "name" not in d or "size" not in d:
            raise MixtureError(where, f"{here}: needs 'name' and 'size'")
        name = str(d["name"])
        here = f"datasets[{i}] ({name})"
        unknown = set(d) - {"name", "size", "upsample", "prefix", "jsonl", "splits"}
        if unknown:
            raise MixtureError(where, f"{here}: unknown key {sorted(unknown)[0]!r}")
        up = _positive(d.get("upsample", 1.0), where, f"{here}.upsample")
        prefix = str(d.get("prefix", prefix_tpl.format(name=name)))
        own_splits = d.get("splits") or {}
        if not isinstance(own_splits, dict):
            raise MixtureError(where, f"{here}.splits: a mapping of split name to S:E (or null) is required")
        checked = {}
        for k, v in own_splits.items():
            if str(k) not in splits:
                raise MixtureError(where, f"{here}.splits.{k}: no such split; splits are {', '.join(splits)}")
            checked[str(k)] = None if v is None else _check_split(v, where, f"{here}.splits.{k}")
        measured = ""
        if d["size"] == "measure":
            jl = d.get("jsonl", jsonl_tpl.format(name=name) if isinstance(jsonl_tpl, str) else None)
            try:
                if jl is not None:
                    target = root_dir / str(jl)
                    size, measured = measure_jsonl_bytes(target), f"bytes of {target}"
                else:
                    target = root_dir / prefix
                    size, measured = measure_tokens(str(target)), f"tokens of {target}_*_document.idx"
            except (OSError, UserError) as err:
                reason = err.reason if isinstance(err, UserError) else (err.strerror or str(err))
                raise MixtureError(where, f"{here}.size: cannot measure: {reason}") from None
            if size <= 0:
                raise MixtureError(where, f"{here}.size: measured 0 ({measured})")
        else:
            size = _positive(d["size"], where, f"{here}.size")
        datasets.append(Dataset(name, float(size), up, prefix, checked, measured))
    outputs = raw.get("outputs") or {s: f"{Path(path).stem}_{s}.txt" for s in splits}
    for s in splits:
        if s not in outputs:
            raise MixtureError(where, f"outputs.{s}: no file name for split {s!r}")
    return Mixture(datasets, dict(splits), dict(outputs), dict(raw.get("groups") or {}))


def check_output_dir(out_dir: str | os.PathLike) -> None:
    """`-o` must be a folder or not exist yet (checked before anything is measured)."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise DataError(str(out_dir), "-o: is a file; the path files are written into a folder")


def write_path_files(mixture: Mixture, out_dir: str | os.PathLike) -> list[Path]:
    out = Path(out_dir)
    check_output_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(str(err.filename or out_dir), f"-o: cannot create the folder: {err.strerror or err}") from None
    written = []
    for name, text in mixture.path_files().items():
        target = out / name
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, target)
        written.append(target)
    return written
