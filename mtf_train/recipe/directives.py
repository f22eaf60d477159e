"""Scheduler directives from a recipe's cluster section: the one place that turns cluster fields into SLURM
options, for every rendered script (`#SBATCH` lines), for submitit's parameters and for the command line of a
chained submission (`--dependency`).

Every value is checked here, so a script rendered by any stage (training, evaluation, preflight, a reshape job)
holds nothing sbatch would misread. Pure Python: the render path imports no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mtf_train.errors import RecipeError
from mtf_train.rules import parse_time_minutes
from mtf_train.recipe.schema import Recipe

# Values written into #SBATCH lines are read by sbatch, not a shell: keep them to characters it takes literally.
SBATCH_VALUE = re.compile(r"^[A-Za-z0-9._,:=@%+/\[\]|&*!-]+$")
# Plain string fields of `cluster` that become `--name=value` as they are.
NAMED = ("partition", "account", "qos", "constraint")
# Options submitit writes itself (its own log files and pre-timeout signal): not passed to it.
SUBMITIT_OWNS = frozenset({"output", "signal"})
# Options submitit's SlurmExecutor takes as parameters; the others go through `additional_parameters`.
SUBMITIT_NATIVE = frozenset({"job_name", "nodes", "ntasks_per_node", "cpus_per_task", "gres", "time", "partition",
                             "account", "qos", "constraint", "exclusive", "exclude"})


@dataclass(frozen=True)
class Directives:
    """SLURM options in the order a script shows them; a value of None is a flag (`--exclusive`)."""

    options: tuple[tuple[str, str | None], ...]
    extra: tuple[str, ...] = ()  # cluster.extra_sbatch, written as given

    def lines(self) -> list[str]:
        """The options as sbatch reads them, one per `#SBATCH` line."""
        return [f"--{k}" if v is None else f"--{k}={v}" for k, v in self.options] + list(self.extra)

    def submitit_parameters(self) -> dict:
        """submitit SlurmExecutor parameters: its own names where it has them, the rest as additional ones."""
        params: dict = {}
        extra: dict = {}
        for k, v in self.options:
            if k in SUBMITIT_OWNS:
                continue
            key = k.replace("-", "_")
            value = True if v is None else int(v) if v.isdigit() else v  # submitit compares counts as numbers
            if key == "time":  # submitit writes minutes
                value = parse_time_minutes(v)
            (params if key in SUBMITIT_NATIVE else extra)[key] = value
        extra.update(parse_extra(self.extra))
        if extra:
            params["additional_parameters"] = extra
        return params


def parse_extra(lines) -> dict:
    """`extra_sbatch` lines (`--key=value`, `--key value`, `--flag`) as submitit's additional_parameters."""
    out: dict = {}
    for line in lines:
        text = line.strip().removeprefix("--")
        key, sep, value = text.partition("=")
        if not sep:
            key, _, value = text.partition(" ")
        out[key.strip().replace("-", "_")] = value.strip() if value.strip() else True
    return out


def directives(r: Recipe, *, job_name: str | None = None, nodes: int | None = None, gpus: int | None = None,
               time: str | None = None, time_field: str = "cluster.time", output: str | None = None,
               signal: str | None = None) -> Directives:
    """The job's SLURM options. Defaults are the training job's (the recipe's name, nodes, GPUs per node and
    time); a stage's own job (evaluation, preflight, reshape) passes what differs. A value sbatch would misread
    is a RecipeError naming the field."""
    c = r.cluster

    def fail(field: str, reason: str):
        raise RecipeError(r.origin.of(field), reason, field=field)

    name = job_name if job_name is not None else r.name
    if not SBATCH_VALUE.match(name or ""):
        fail("name", f"{name!r} is not a valid job name (no spaces or quotes)")
    time = time if time is not None else c.time
    if parse_time_minutes(time) is None:
        fail(time_field, f"{time!r} is not a SLURM time ([D-]HH:MM:SS, MM:SS or MM)")
    for field in (*NAMED, "hint"):
        v = getattr(c, field)
        if v is not None and not SBATCH_VALUE.match(v):
            fail(f"cluster.{field}", f"{v!r} holds characters sbatch would misread (spaces, quotes, ...)")
    for i, node in enumerate(c.exclude):
        if not SBATCH_VALUE.match(node):
            fail("cluster.exclude", f"item {i} {node!r} is not a node name or list")
    for i, line in enumerate(c.extra_sbatch):
        if "\n" in line or "\r" in line or not line.startswith("-"):
            fail("cluster.extra_sbatch", f"item {i} must be one sbatch option starting with '-', got {line!r}")

    opts: list[tuple[str, str | None]] = [("job-name", name), ("nodes", str(nodes or c.nodes)),
                                          ("ntasks-per-node", "1")]  # one launcher per node
    if c.cpus_per_task:
        opts.append(("cpus-per-task", str(c.cpus_per_task)))
    if c.hint:
        opts.append(("hint", c.hint))
    if c.accelerator == "gpu":
        opts.append(("gres", f"gpu:{gpus or c.gpus_per_node}"))
    opts.append(("time", time))
    opts += [(k, v) for k, v in (("output", output), ("signal", signal)) if v]
    opts += [(k, getattr(c, k)) for k in NAMED if getattr(c, k)]
    if c.exclusive:
        opts.append(("exclusive", None))
    if c.exclude:
        opts.append(("exclude", ",".join(c.exclude)))
    return Directives(tuple(opts), tuple(c.extra_sbatch))


def dependency(kind: str, job_id: str) -> str:
    """A submission's `--dependency` option: start after job `job_id` ends (afterany) or succeeds (afterok)."""
    return f"--dependency={kind}:{job_id}"
