"""`mtf-train preflight RECIPE`: a short job over the recipe's nodes that measures each node and names the slowest.

Every node runs `torch.distributed.run` (one process per GPU, or one per node without GPUs) with
`mtf_train.launch.preflight_worker`: GPU count and a matmul rate per device, then an all-reduce across all
nodes. The run folder (`runs/<recipe>-preflight/<timestamp>-<id>/`) keeps the job script, `preflight.json`
(every rank's measurements) and `preflight.txt` (the table printed here).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import mtf_train
from mtf_train.errors import UserError
from mtf_train.launch import slurm
from mtf_train.launch.executors import choose
from mtf_train.launch.runfolder import RunInfo, create_run_folder, initial_info, runs_root
from mtf_train.recipe.schema import Recipe
from mtf_train.files import write_atomic
from mtf_train.recipe.directives import directives
from mtf_train.render.job import job_env, srun_options, template_env

SLOW_FRACTION = 0.10  # a node this far below the median is worth excluding


class PreflightError(UserError):
    exit_code = 1


def render_preflight(r: Recipe, run_dir: Path, write_to: Path, *, seconds: float, time_limit: str) -> Path:
    c = r.cluster
    gpu = c.accelerator == "gpu"
    text = template_env().get_template("preflight.sbatch.j2").render(
        version=mtf_train.__version__, recipe_path=str(r.origin.path), run_dir=str(run_dir),
        directives=directives(r, job_name=f"{r.name}-preflight", time=time_limit, time_field="--time",
                              output=f"{run_dir}/logs/%x-%j.out").lines(),
        setup=r.environment.setup, env=job_env(r), master_port=c.master_port,
        python=r.runtime.python or sys.executable, nproc_per_node=c.gpus_per_node if gpu else 1,
        worker_args=["--seconds", f"{seconds:g}"], srun_options=srun_options(r))
    return write_atomic(write_to / "preflight.sbatch", text, mode=0o755)


def summarize(result: dict, expected_gpus: int | None = None) -> dict:
    """Per-node rows (in rank order), the all-reduce, and the slowest node."""
    records = sorted(result["records"], key=lambda x: x["rank"])
    nodes: dict[str, dict] = {}
    for rec in records:
        row = nodes.setdefault(rec["node"], {"node": rec["node"], "gpus": rec["gpus"], "processes": 0, "rates": [],
                                             "unit": rec["matmul"]["unit"], "allreduce_s": 0.0,
                                             "device_name": rec["device_name"]})
        row["processes"] += 1
        row["rates"].append(rec["matmul"]["rate"])
        row["allreduce_s"] = max(row["allreduce_s"], rec["allreduce"]["seconds"])
    rows = list(nodes.values())
    for row in rows:
        row["rate"] = min(row["rates"])  # a node is as fast as its slowest device
    median = statistics.median(row["rate"] for row in rows)
    slowest = min(rows, key=lambda row: row["rate"])
    below = (median - slowest["rate"]) / median if median > 0 else 0.0
    ar = records[0]["allreduce"]
    warnings = []
    if expected_gpus:
        for row in rows:
            if row["gpus"] != expected_gpus:
                warnings.append(f"{row['node']} has {row['gpus']} GPU(s), the recipe asks for {expected_gpus}")
    return {"nodes": rows, "median_rate": median, "slowest": slowest["node"], "slowest_rate": slowest["rate"],
            "slowest_below_median": below, "worth_excluding": len(rows) > 1 and below > SLOW_FRACTION,
            "unit": slowest["unit"], "gpus_total": sum(row["gpus"] for row in rows), "allreduce": ar,
            "backend": result.get("backend"), "all_reduce_correct": all(x["allreduce"]["correct"] for x in records),
            "warnings": warnings}


def format_summary(s: dict) -> str:
    unit = s["unit"]
    header = ("node", "gpus", "procs", f"matmul {unit} (min over devices)", "all-reduce s")
    rows = [(row["node"], str(row["gpus"]), str(row["processes"]),
             f"{row['rate']:.2f}" + (f" ({row['device_name']})" if row["gpus"] else ""),
             f"{row['allreduce_s']:.4f}") for row in s["nodes"]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    if s["gpus_total"] == 0:
        lines.append("no GPUs on any node: measured an fp32 matmul on the CPUs")
    ar = s["allreduce"]
    lines.append(f"all-reduce across {len(s['nodes'])} node(s) ({s['backend']}): {ar['bytes'] / 2**20:.0f} MiB in "
                 f"{ar['seconds']:.4f} s, bus bandwidth {ar['busbw_gb_s']:.2f} GB/s"
                 + ("" if s["all_reduce_correct"] else "  WRONG RESULT"))
    lines.append(f"slowest node: {s['slowest']} ({s['slowest_rate']:.2f} {unit}, "
                 f"{100 * s['slowest_below_median']:.0f}% below the median {s['median_rate']:.2f})")
    if s["worth_excluding"]:
        lines.append(f"to keep it out of the job: --set 'cluster.exclude=[{s['slowest']}]' "
                     f"(or add it to cluster.exclude in the recipe)")
    lines += [f"warning: {w}" for w in s["warnings"]]
    return "\n".join(lines)


def preflight(r: Recipe, *, executor: str | None, runs_dir: str | None, timeout_s: float, seconds: float,
              time_limit: str = "00:10:00") -> int:
    where = str(r.origin.path)
    ex = choose(r, executor)  # the recipe's executor, unless --executor says otherwise
    if ex.runs_here and r.cluster.nodes > 1:
        raise UserError(where, f"preflight without SLURM runs on this machine only; the recipe asks for "
                        f"{r.cluster.nodes} nodes (is sbatch on PATH?)", field="cluster.nodes")
    if not ex.runs_here and not slurm.available("sbatch"):
        raise UserError(where, f"preflight with executor {ex.name} submits a SLURM job: sbatch is not on PATH",
                        field="executor")

    def fill(final: Path, staging: Path) -> None:
        render_preflight(r, final, staging, seconds=seconds, time_limit=time_limit)
        (staging / "logs").mkdir()
        info = RunInfo(staging)
        info.write(initial_info(r.name, where, ex.name) | {"kind": "preflight", "nodes": r.cluster.nodes})
        info.event(f"preflight rendered for executor {ex.name}")

    run_dir = create_run_folder(runs_root(runs_dir), f"{r.name}-preflight", fill)
    info = RunInfo(run_dir)
    print(f"preflight run folder: {run_dir} ({r.cluster.nodes} node(s))", flush=True)
    ok, how = ex.run_to_end(run_dir / "preflight.sbatch", info, timeout_s, "preflight")
    result_path = run_dir / "preflight.json"
    if not ok or not result_path.exists():
        info.update(state="failed", error=how)
        raise PreflightError(str(run_dir), f"preflight failed ({how}); see {run_dir / 'logs'}")
    summary = summarize(json.loads(result_path.read_text()),
                        expected_gpus=r.cluster.gpus_per_node if r.cluster.accelerator == "gpu" else None)
    text = format_summary(summary)
    write_atomic(run_dir / "preflight.txt", text + "\n")
    info.update(state="completed", slowest=summary["slowest"], worth_excluding=summary["worth_excluding"])
    info.event(f"preflight done: slowest node {summary['slowest']}")
    print(text)
    return 0
