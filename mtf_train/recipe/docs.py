"""The recipe reference, generated from the schema (docs/recipe.md is this output)."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING

from mtf_train.recipe import schema


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or null"
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin is list:
        return "list of strings"
    if origin is dict:
        return "mapping of strings"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _default(fl) -> str:
    if fl.default is not MISSING:
        if fl.default is None:
            return "null"
        return f"`{str(fl.default).lower()}`" if isinstance(fl.default, bool) else f"`{fl.default}`"
    value = fl.default_factory()  # type: ignore[misc]
    if dataclasses.is_dataclass(value):
        return ""
    return f"`{value}`"


def recipe_reference() -> str:
    out = ["# Recipe reference", "",
           "Generated from `mtf_train/recipe/schema.py` by `mtf-train schema`; every field, its type, default and "
           "meaning. A recipe may start with `base: other.yaml` (deep-merged underneath it), and any field can be "
           "overridden on the command line with `--set section.field=value` (YAML-typed).", ""]

    def section(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows, subs = [], []
        for fl in dataclasses.fields(cls):
            tp = hints[fl.name]
            key = prefix + schema.yaml_key(fl.name)
            inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if dataclasses.is_dataclass(inner[0]):
                subs.append((inner[0], key, fl.metadata.get("doc", "")))
                if typing.get_origin(tp) is not typing.Union:
                    continue
            rows.append(f"| `{key}` | {_type_name(tp)} | {_default(fl)} | {fl.metadata.get('doc', '')} |")
        if rows:
            out.extend(["| field | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for sub, key, doc in subs:
            out.extend([f"## `{key}`", "", doc, ""])
            section(sub, key + ".")

    out.append("## top level")
    out.append("")
    section(schema.Recipe, "")
    return "\n".join(out)
