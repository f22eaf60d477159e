"""Following runs: find a run folder, its queue state and training progress, its log, and cancel it.

`status` reads only files of the run folder (run.json, metrics.jsonl, the checkpoint's `latest`, the chain's
`finished`/`failures`) and asks squeue (or sacct) about the run's job ids. No torch import.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO

from mtf_train.errors import UserError
from mtf_train.eval.report import format_scores, latest_scores
from mtf_train.launch import executors
from mtf_train.launch.runfolder import RunInfo, runs_root


class RunNotFound(UserError):
    exit_code = 2


# ------------------------------------------------------------------------------------------ finding runs

def _is_run(path: Path) -> bool:
    return path.is_dir() and (path / "run.json").is_file() and not path.name.startswith(".")


def _order(run: Path) -> tuple:
    try:
        born = (run / "plan.txt").stat().st_mtime
    except OSError:
        born = 0.0
    return run.name[:15], born, run.name


def list_runs(root: Path) -> list[Path]:
    """Every run folder under `root` (`root/<recipe>/<timestamp>-<id>`), oldest first."""
    if not root.is_dir():
        return []
    runs = [run for recipe in root.iterdir() if recipe.is_dir() and not recipe.name.startswith(".")
            for run in recipe.iterdir() if _is_run(run)]
    return sorted(runs, key=_order)


def find_run(arg: str | None, runs_dir: str | None) -> Path:
    """RUN: a run folder's path; `<recipe>/<id>` or `<id>` under the runs root; a recipe name (its latest
    run); nothing (the latest run of all)."""
    root = runs_root(runs_dir)
    if not arg:
        runs = list_runs(root)
        if not runs:
            raise RunNotFound(str(root), "no run folders here (give RUN, or --runs-dir / $MTF_RUNS_DIR)")
        return runs[-1]
    path = Path(arg).expanduser()
    if _is_run(path):
        return path.resolve()
    if path.is_dir() and any(_is_run(p) for p in path.iterdir()):
        return sorted((p for p in path.iterdir() if _is_run(p)), key=_order)[-1].resolve()
    for candidate in (root / arg, root / path.name):
        if _is_run(candidate):
            return candidate.resolve()
        if candidate.is_dir():
            runs = sorted((p for p in candidate.iterdir() if _is_run(p)), key=_order)
            if runs:
                return runs[-1].resolve()
    matches = [r for r in list_runs(root) if r.name == path.name]
    if len(matches) == 1:
        return matches[0].resolve()
    if len(matches) > 1:
        raise RunNotFound(arg, f"{len(matches)} run folders under {root} have this name; give the full path")
    raise RunNotFound(arg, f"no such run folder (looked at the path and under {root})")


# ---------------------------------------------------------------------------------------------- status

def _read_tail_records(path: Path, max_bytes: int = 1 << 20) -> list[dict]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode(errors="replace")
    except OSError:
        return []
    lines = data.splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # probably cut
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written, or cut by a crash
        if isinstance(rec, dict):
            out.append(rec)
    return out


def run_status(run_dir: Path) -> dict:
    info = RunInfo(run_dir).read()
    states, alive = executors.of_run(info).status(info)
    jobs = [{**vars(j), "active": j.active, "terminal": j.terminal} for j in states]

    records = _read_tail_records(run_dir / "metrics.jsonl")
    train = next((r for r in reversed(records) if r.get("kind") == "train"), None)
    evals = next((r for r in reversed(records) if r.get("kind") == "eval"), None)
    progress = None
    if train:
        progress = {k: train.get(k) for k in ("iteration", "consumed_samples", "loss", "lr", "tokens_per_s", "time")}
        progress["train_iters"] = info.get("train_iters")
    checkpoint = None
    save = info.get("save")
    if save:
        try:
            tag = (Path(save) / "latest").read_text().strip()
            checkpoint = str(Path(save) / tag) if tag else None
        except OSError:
            pass
    finished = (run_dir / "finished").exists()
    try:
        failures = int((run_dir / "failures").read_text().strip() or 0)
    except (OSError, ValueError):
        failures = 0

    recorded = info.get("state", "unknown")
    error = info.get("error")
    if alive is False:  # a local run whose launcher was killed outright: its job's last event says how it ended
        last = _last_job_event(run_dir)
        if " failed: " in last:
            from mtf_train.launch.submit import last_failure
            recorded, error = "failed", last_failure(run_dir)
        else:
            recorded = "stopped"
            if " saved and exited at step " not in last:
                error = error or "its processes ended without recording how (killed?)"
    if finished:
        state = "finished"
    elif any(j["state"] == "RUNNING" for j in jobs):
        state = "running"
    elif any(j["active"] for j in jobs):
        state = "pending" if all(j["state"] == "PENDING" for j in jobs if j["active"]) else "running"
    elif recorded in ("failed", "rendered", "cancelled", "running", "stopped"):
        state = {"rendered": "rendered (dry run)"}.get(recorded, recorded)
    elif jobs and all(j["terminal"] for j in jobs):
        last = [j for j in jobs if j["state"] != "CANCELLED"] or jobs
        state = "stopped" if last[-1]["state"] == "COMPLETED" else last[-1]["state"].lower()
    elif recorded == "completed":
        state = "stopped"  # a local job that exited 0 before the end of training: it saved; run it again
    else:
        state = recorded
    if state == "failed" and not error:
        from mtf_train.launch.submit import last_failure
        error = last_failure(run_dir)
    # Every way a run can end short of its last step resumes with one command.
    resume = (f"mtf-train resume {run_dir}" if not finished and info.get("kind") != "preflight" and state in
              ("stopped", "failed", "cancelled", "rendered (dry run)", "timeout", "node_fail", "preempted",
               "out_of_memory", "boot_fail", "deadline") else None)
    return {"run": str(run_dir), "recipe": info.get("recipe"), "executor": info.get("executor"),
            "state": state, "recorded_state": recorded, "error": error, "resume": resume, "jobs": jobs,
            "progress": progress, "eval": evals, "checkpoint": checkpoint, "finished": finished,
            "failures": failures, "nodes": info.get("nodes"), "processes_per_node": info.get("processes_per_node"),
            "zero_shot": latest_scores(run_dir)}


def _last_job_event(run_dir: Path) -> str:
    try:
        lines = (run_dir / "events.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line for line in reversed(lines) if " job=" in line), "")


def _fmt_job(j: dict) -> str:
    extra = [x for x in (j.get("elapsed"), j.get("nodes") if j["state"] != "PENDING" else "") if x]
    if j.get("reason") and j["reason"] not in ("None", "") and (j["state"] == "PENDING" or j["state"] == "UNKNOWN"):
        extra.append(f"({j['reason']})")
    return " ".join([j["job_id"], j["state"], *extra])


def format_status(s: dict) -> str:
    shape = f", {s['nodes']} node(s) x {s['processes_per_node']}" if s.get("nodes") else ""
    lines = [f"run         {s['run']}  ({s['recipe']}, executor {s['executor']}{shape})",
             f"state       {s['state']}" + (f": {s['error']}" if s.get("error") and s["state"] in ("failed", "stopped")
                                            else "")]
    if s["jobs"]:
        lines.append("jobs        " + " | ".join(_fmt_job(j) for j in s["jobs"]))
    p = s.get("progress")
    if p:
        of = f" of {p['train_iters']}" if p.get("train_iters") else ""
        parts = [f"step {p['iteration']}{of}", f"samples {p['consumed_samples']}"]
        if p.get("loss") is not None:
            parts.append(f"loss {p['loss']:.4f}")
        if p.get("tokens_per_s") is not None:
            parts.append(f"{p['tokens_per_s']:,.0f} tokens/s")
        if p.get("time"):
            parts.append(f"logged {max(0, time.time() - p['time']):.0f}s ago")
        lines.append("progress    " + " | ".join(parts))
    else:
        lines.append("progress    no training step logged yet")
    e = s.get("eval")
    if e and e.get("loss") is not None:
        lines.append(f"eval        {e.get('group', 'validation')} loss {e['loss']:.4f} at step {e.get('iteration')}")
    lines.append(f"checkpoint  {s['checkpoint'] or 'none yet'}")
    if s.get("zero_shot"):
        lines.append(format_scores(s["zero_shot"]))
    if s["failures"]:
        lines.append(f"failures    {s['failures']} in a row")
    if s.get("resume"):
        lines.append(f"resume with: {s['resume']}")
    return "\n".join(lines)


def format_run_list(root: Path, limit: int = 20) -> str:
    runs = list_runs(root)[-limit:]
    if not runs:
        return f"no run folders under {root}"
    rows = []
    for run in runs:
        s = run_status(run)
        p = s.get("progress") or {}
        step = f"step {p['iteration']}" if p else "-"
        loss = f"loss {p['loss']:.4f}" if p.get("loss") is not None else ""
        jobs = ",".join(j["job_id"] for j in s["jobs"]) or "-"
        rows.append((f"{run.parent.name}/{run.name}", s["state"], str(s["executor"]), jobs, step, loss))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5] for r in rows)


def is_active(run_dir: Path) -> bool:
    """Whether the run may still write to its log."""
    info = RunInfo(run_dir).read()
    return executors.of_run(info).active(info)


# ------------------------------------------------------------------------------------------------ logs

def log_file(run_dir: Path) -> Path | None:
    main = run_dir / "logs" / "main.log"
    if main.exists():
        return main
    others = sorted((p for p in (run_dir / "logs").glob("*.out")), key=lambda p: p.stat().st_mtime)
    others += sorted(run_dir.glob("submitit/*/*.out"), key=lambda p: p.stat().st_mtime)
    return others[-1] if others else None


def show_logs(run_dir: Path, follow: bool, out: IO[str] = sys.stdout, poll_s: float = 0.5,
              check_every_s: float = 2.0) -> int:
    path = log_file(run_dir)
    if not follow:
        if path is None:
            print(f"no log yet in {run_dir / 'logs'}", file=sys.stderr)
            return 0
        with open(path, errors="replace") as fh:
            for chunk in iter(lambda: fh.read(1 << 16), ""):
                out.write(chunk)
        out.flush()
        return 0
    # Follow main.log, which every job of a chain appends to, until the run's jobs have ended (then drain what is
    # left), or ^C. Not a job's own SLURM output file: the next job of the chain writes another one.
    main = run_dir / "logs" / "main.log"
    fh = None
    last_check = 0.0
    active = True
    try:
        while True:
            if fh is None and main.exists():
                fh = open(main, errors="replace")
            got = fh.read() if fh is not None else ""
            if got:
                out.write(got)
                out.flush()
            now = time.monotonic()
            if now - last_check >= check_every_s:
                last_check = now
                was_active, active = active, is_active(run_dir)
                if not active and not was_active and not got:
                    if fh is None and (path := log_file(run_dir)) is not None:  # a job that died before its log
                        out.write(path.read_text(errors="replace"))
                        out.flush()
                    return 0
            if not got:
                time.sleep(poll_s)
    finally:
        if fh is not None:
            fh.close()


# ---------------------------------------------------------------------------------------------- cancel

def cancel_run(run_dir: Path) -> int:
    info = RunInfo(run_dir).read()
    return executors.of_run(info).cancel(run_dir, info)
