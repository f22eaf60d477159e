"""YAML reading with the surprises of YAML 1.1 removed.

PyYAML follows YAML 1.1: `100:00:00` (a SLURM time) is read as the base-60 integer 360000 and `1e-8` (an
Adam epsilon) as a string. Recipes are full of both, so this loader reads the first as a string and the
second as a float.
"""
from __future__ import annotations

import re

import yaml


class RecipeLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        """A mapping that names a key twice is refused: PyYAML would keep the last value without a word."""
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict = {}
            for key_node, _ in node.value:
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except (TypeError, yaml.YAMLError):
                    continue  # PyYAML's own construct_mapping reports it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _strip_resolvers() -> None:
    # Copy the class-level table so that yaml.SafeLoader itself is left untouched.
    table = {}
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items():
        kept = [(tag, rx) for tag, rx in resolvers
                if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
        table[first] = kept
    RecipeLoader.yaml_implicit_resolvers = table
    int_rx = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$")
    float_rx = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                          |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                          |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                          |[-+]?\.(?:inf|Inf|INF)
                          |\.(?:nan|NaN|NAN))$""", re.X)
    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", int_rx, list("-+0123456789"))
    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", float_rx, list("-+0123456789."))


_strip_resolvers()


def load_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)


def dump_yaml(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=120)
