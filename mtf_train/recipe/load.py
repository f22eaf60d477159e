"""Recipe loading: YAML files with `base:` inheritance, `--set` overrides, typed conversion.

Every value remembers where it came from (a file or a `--set`), so that an error names the right place.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from mtf_train.errors import RecipeError
from mtf_train.recipe import schema
from mtf_train.recipe.yamlio import dump_yaml, load_yaml


@dataclass
class Origin:
    path: Path                      # the recipe file given on the command line
    sources: dict[str, str]         # dotted field -> file or "--set ..." that set it
    order: list[str]                # sources from the first applied (deepest base) to the last (--set)

    def of(self, dotted: str) -> str:
        """The file (or --set) that set `dotted`, or the recipe itself for defaults."""
        below = [src for key, src in self.sources.items() if key.startswith(dotted + ".")] if dotted else []
        while dotted:
            if dotted in self.sources:
                return self.sources[dotted]
            dotted = dotted.rpartition(".")[0]
        if below:  # a section that only a --set (say `--set modle.x=1`) brought into being
            return max(below, key=lambda src: self.order.index(src) if src in self.order else -1)
        return str(self.path)

    def latest(self, fields: typing.Sequence[str]) -> str:
        """Of fields that conflict, the one set last: the likeliest to be the user's change."""
        def rank(dotted: str) -> int:
            src = self.of(dotted)
            return self.order.index(src) if src in self.order else -1
        return max(fields, key=rank)


_ORDER_KEY = "\0order"


def load_recipe(path: str | os.PathLike, sets: typing.Sequence[str] = ()) -> schema.Recipe:
    """Load, merge and type a recipe; raise RecipeError with a one-line message on any problem."""
    path = Path(path)
    sources: dict[str, str] = {}
    merged = _read_with_bases(path, sources, chain=())
    for item in sets:
        key, value = _parse_set(item)
        _assign(merged, key.split("."), value, f"--set {item}")
        _record(sources, key, value, f"--set {item}")
    merged.pop("base", None)
    # Application order: deepest base first, then each child, then every --set in command-line order.
    order = [*dict.fromkeys(sources.pop(_ORDER_KEY, []))] + [f"--set {item}" for item in sets]
    origin = Origin(path, sources, order)
    recipe = _build(schema.Recipe, merged, "", origin)
    recipe.origin = origin  # type: ignore[attr-defined]
    if recipe.name is None:
        recipe.name = path.name.removesuffix(".yaml").removesuffix(".yml")
    _resolve_paths(recipe)
    return recipe


def _read_with_bases(path: Path, sources: dict[str, str], chain: tuple[Path, ...]) -> dict:
    where = str(path)
    if path.resolve() in chain:
        raise RecipeError(where, "base: inheritance cycle: " + " -> ".join(str(p) for p in chain + (path,)))
    try:
        text = path.read_text()
    except OSError as err:
        raise RecipeError(where, f"cannot read recipe: {err.strerror or err}") from None
    try:
        data = load_yaml(text)
    except Exception as err:  # yaml.YAMLError and friends: report the position on one line
        mark = getattr(err, "problem_mark", None)
        pos = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(where, f"{pos}invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(where, f"a recipe is a mapping of sections, got {type(data).__name__}")
    merged: dict = {}
    base = data.get("base")
    if base is not None:
        if not isinstance(base, str):
            raise RecipeError(where, "must be a file name", field="base")
        base_path = (path.parent / base)
        if not base_path.exists():
            raise RecipeError(where, f"base recipe {base!r} not found (looked in {base_path.parent})", field="base")
        merged = _read_with_bases(base_path, sources, chain + (path.resolve(),))
    _merge(merged, data, where, sources, prefix="")
    sources.setdefault(_ORDER_KEY, []).append(where)  # type: ignore[arg-type]
    return merged


def _merge(into: dict, new: dict, where: str, sources: dict[str, str], prefix: str) -> None:
    for key, value in new.items():
        key = str(key)
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, where, sources, dotted + ".")
        else:
            into[key] = value
            _record(sources, dotted, value, where)


def _record(sources: dict[str, str], dotted: str, value: Any, where: str) -> None:
    sources[dotted] = where
    if isinstance(value, dict):
        for k, v in value.items():
            _record(sources, f"{dotted}.{k}", v, where)


def _parse_set(item: str) -> tuple[str, Any]:
    key, eq, text = item.partition("=")
    if not eq or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {item}", "expected KEY.PATH=VALUE, e.g. parallel.tp=2")
    if key.strip().split(".")[0] == "base":
        raise RecipeError(f"--set {item}", "base cannot be overridden: it names the file the recipe inherits from "
                          "when the recipe is read; write a recipe with `base:` instead")
    try:
        value = load_yaml(text) if text.strip() else ""
    except Exception:
        value = text
    return key.strip(), value


def _assign(tree: dict, keys: list[str], value: Any, where: str) -> None:
    for i, k in enumerate(keys[:-1]):
        node = tree.get(k)
        if node is None:
            node = tree[k] = {}
        if not isinstance(node, dict):
            raise RecipeError(where, f"{'.'.join(keys[:i + 1])} is a value, not a section")
        tree = node
    tree[keys[-1]] = value


# ---------------------------------------------------------------- typed conversion


def _build(cls: type, data: Any, prefix: str, origin: Origin):
    if not isinstance(data, dict):
        field = prefix.rstrip(".") or None
        raise RecipeError(origin.of(prefix.rstrip(".")), f"must be a mapping, got {_show(data)}", field=field)
    known = schema.schema_fields(cls)
    hints = typing.get_type_hints(cls)
    for key in data:
        if key == "base" and cls is schema.Recipe:
            continue
        if key not in known:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{close[0]!s}?" if close else f"; known: {', '.join(known)}"
            raise RecipeError(origin.of(dotted), f"unknown field{hint}", field=dotted)
    kwargs = {}
    for key, fl in known.items():
        if key not in data:
            continue
        dotted = f"{prefix}{key}"
        kwargs[fl.name] = _convert(hints[fl.name], data[key], dotted, origin, fl.metadata)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, dotted: str, origin: Origin, meta: Any):
    def fail(reason: str):
        raise RecipeError(origin.of(dotted), reason, field=dotted)

    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
    if value is None:
        fail("must be set (null is not allowed here)")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted + ".", origin)
    org = typing.get_origin(tp)
    if org is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            fail(f"must be one of {', '.join(map(str, choices))}; got {_show(value)}")
        return value
    if org is list:
        if not isinstance(value, list):
            fail(f"must be a list, got {_show(value)}")
        for i, v in enumerate(value):
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                fail(f"item {i} must be a string, got {_show(v)}")
        return [str(v) for v in value]
    if org is dict:
        if not isinstance(value, dict):
            fail(f"must be a mapping, got {_show(value)}")
        out = {}
        for k, v in value.items():
            if isinstance(v, (dict, list)) or v is None:
                fail(f"{k}: must be a scalar, got {_show(v)}")
            out[str(k)] = ("true" if v else "false") if isinstance(v, bool) else str(v)
        return out
    if tp is bool:
        if not isinstance(value, bool):
            fail(f"must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                fail(f"must be an integer, got {_show(value)}")
        _bounds(value, meta, fail)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"must be a number, got {_show(value)}")
        _bounds(float(value), meta, fail)
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or isinstance(value, bool):
            fail(f"must be a string, got {_show(value)}")
        return str(value)
    raise TypeError(f"schema type {tp!r} at {dotted} has no converter")  # a bug in the schema, not user input


def _bounds(value: float, meta: Any, fail) -> None:
    lo, gt = meta.get("min"), meta.get("gt")
    if lo is not None and value < lo:
        fail(f"must be >= {lo:g}, got {value:g}")
    if gt is not None and not value > gt:
        fail(f"must be > {gt:g}, got {value:g}")


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


# ---------------------------------------------------------------- paths and output


def _resolve_paths(recipe: schema.Recipe) -> None:
    """Make file paths absolute against the folder of the file that set them (the working directory for a
    --set), so that a base recipe's paths mean the same from any child and a resolved recipe works anywhere."""
    origin: Origin = recipe.origin  # type: ignore[attr-defined]

    def base_dir(dotted: str) -> Path:
        src = origin.of(dotted)
        return Path.cwd() if src.startswith("--set") else Path(src).resolve().parent

    def absolute(dotted: str, value: str) -> str:
        return str((base_dir(dotted) / os.path.expandvars(os.path.expanduser(value))).resolve())

    d = recipe.data
    for name in ("train_path", "valid_path", "root"):
        value = getattr(d, name)
        if value is not None:
            setattr(d, name, absolute(f"data.{name}", value))
    tok = base_dir("data.tokenizer") / os.path.expanduser(d.tokenizer)
    if tok.exists():  # else a hub name, resolved offline by the trainer
        d.tokenizer = str(tok.resolve())
    zs = recipe.eval.zero_shot
    if zs.data_dir is not None:
        zs.data_dir = absolute("eval.zero_shot.data_dir", zs.data_dir)
    rt = recipe.runtime
    if rt.megatron_deepspeed_dir is not None:
        rt.megatron_deepspeed_dir = absolute("runtime.megatron_deepspeed_dir", rt.megatron_deepspeed_dir)


def to_dict(obj: Any) -> Any:
    """The recipe as plain YAML-ready data, with YAML key names."""
    if dataclasses.is_dataclass(obj):
        return {schema.yaml_key(fl.name): to_dict(getattr(obj, fl.name)) for fl in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_recipe(recipe: schema.Recipe) -> str:
    return dump_yaml(to_dict(recipe))


def path_groups(recipe: schema.Recipe):
    """(train groups, validation groups) from the recipe's path files or inline groups, prefixes rebased."""
    from mtf_train.data.pathfile import parse_groups, read_path_file, rebase

    def read(path_field: str, inline_field: str):
        d = recipe.data
        path, inline = getattr(d, path_field), getattr(d, inline_field)
        if inline is not None:
            groups = parse_groups(inline, f"{recipe.origin.of('data.' + inline_field)}: data.{inline_field}")
            src = recipe.origin.of("data." + inline_field)
            root = d.root or str(Path.cwd() if src.startswith("--set") else Path(src).resolve().parent)
        elif path is not None:
            groups = read_path_file(path)
            root = d.root or str(Path(path).parent)
        else:
            return []
        return rebase(groups, root)

    return read("train_path", "train_groups"), read("valid_path", "valid_groups")
