"""Launching without a cluster: run folders, failed submissions, status/logs/cancel on runs that never ran,
preflight's summary, and what the launch path imports. Fast: no trainer, no SLURM."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtf_train.launch.preflight import format_summary, summarize
from mtf_train.launch.runfolder import create_run_folder
from mtf_train.recipe.directives import parse_extra as _extra_sbatch
from tests.helpers import BIN, RECIPES, ROOT, mtf, one_line_error

TINY = str(RECIPES / "tiny-local.yaml")
TWO_NODES = ["--set", "cluster.nodes=2", "--set", "cluster.gpus_per_node=1"]


def runs_of(root: Path, recipe: str = "tiny-local") -> list[Path]:
    return sorted(p for p in (root / recipe).iterdir() if not p.name.startswith("."))


def one_line_failure(proc: subprocess.CompletedProcess) -> str:
    """A failure the user's environment caused: exit 1, one stderr line, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_no_sbatch_leaves_a_failed_run_folder_and_one_line(tmp_path):
    env = {"PATH": "/nonexistent"}  # the console script's shebang is absolute; git and sbatch are gone
    proc = mtf(TINY, "--executor", "slurm", "--runs-dir", str(tmp_path), *TWO_NODES, env=env)
    line = one_line_failure(proc)
    (run,) = runs_of(tmp_path)
    assert line == f"mtf-train: error: {run}: sbatch not found on PATH (use --executor local on a single machine)"
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "failed" and info["error"].startswith("sbatch not found")
    assert "submit failed: sbatch not found" in (run / "events.log").read_text()
    assert (run / "job.sbatch").is_file() and (run / "logs").is_dir()
    # status and logs say what happened, without a traceback.
    out = mtf("status", str(run), check=True).stdout
    assert "state       failed: sbatch not found on PATH" in out and "progress    no training step logged yet" in out
    proc = mtf("logs", str(run), check=True)
    assert proc.stdout == "" and "no log yet" in proc.stderr
    assert "nothing to cancel" in mtf("cancel", str(run), check=True).stdout


def test_run_folder_is_complete_and_never_overwritten(tmp_path):
    mtf(TINY, "--dry-run", "--runs-dir", str(tmp_path), *TWO_NODES, "--set", "executor=slurm", check=True)
    (run,) = runs_of(tmp_path)
    info = json.loads((run / "run.json").read_text())
    for key in ("python", "torch", "deepspeed", "megatron-core", "mtf-train", "git_commit", "git_dirty"):
        assert key in info["versions"], key
    assert info["command"][0] == "mtf-train" and "--dry-run" in info["command"]
    assert info["save"] == str(run / "checkpoints") and info["train_iters"] == 120 and info["nodes"] == 2
    for name in ("job.sbatch", "recipe.resolved.yaml", "plan.txt", "ds_config.json", "events.log"):
        assert (run / name).is_file(), name
    # A folder that appears under the chosen name makes the publication fail rather than overwrite it.
    calls = []

    def fill(final: Path, staging: Path) -> None:
        calls.append(final)
        (staging / "x").write_text("new")
        final.mkdir()
        (final / "x").write_text("old")

    with pytest.raises(OSError):
        create_run_folder(tmp_path, "race", fill)
    (only,) = [p for p in (tmp_path / "race").iterdir()]
    assert only == calls[0] and (only / "x").read_text() == "old"  # untouched; the staging folder is gone


@pytest.mark.parametrize("args, message", [
    (["--chain", "0"], "--chain must be at least 1, got 0"),
    (["--chain", "2", "--executor", "local"], "--chain needs executor slurm or submitit"),
])
def test_bad_chain_is_one_line(tmp_path, args, message):
    line = one_line_error(mtf(TINY, "--runs-dir", str(tmp_path), *args))
    assert message in line


def test_unknown_run_is_one_line(tmp_path):
    for cmd in ("status", "logs", "cancel"):
        line = one_line_error(mtf(cmd, "no-such-run", "--runs-dir", str(tmp_path)))
        assert line.startswith("mtf-train: error: no-such-run: no such run folder"), line
    line = one_line_error(mtf("status", "--runs-dir", str(tmp_path / "empty")))
    assert "no run folders here" in line


def test_runs_are_found_by_path_name_and_recipe(tmp_path):
    made = []
    for _ in range(2):  # possibly within one second: the order is the creation order, not the name's
        out = mtf(TINY, "--dry-run", "--runs-dir", str(tmp_path), check=True).stdout
        made.append(Path(out.split("run folder: ")[1].split()[0]))
    first, second = made
    env = {"MTF_RUNS_DIR": str(tmp_path)}
    assert f"run         {second} " in mtf("status", env=env, check=True).stdout  # the latest run
    assert f"run         {second} " in mtf("status", "tiny-local", env=env, check=True).stdout
    assert f"run         {first} " in mtf("status", first.name, env=env, check=True).stdout
    assert f"run         {first} " in mtf("status", f"tiny-local/{first.name}", env=env, check=True).stdout
    listing = mtf("status", "--all", env=env, check=True).stdout.splitlines()
    assert [x.split()[0] for x in listing] == [f"tiny-local/{first.name}", f"tiny-local/{second.name}"]
    assert all("rendered (dry run)" in x for x in listing)
    status = json.loads(mtf("status", str(first), "--json", check=True).stdout)
    assert status["state"] == "rendered (dry run)" and status["jobs"] == [] and status["checkpoint"] is None


def test_status_reads_progress_from_the_run_folder(tmp_path):
    mtf(TINY, "--dry-run", "--runs-dir", str(tmp_path), check=True)
    (run,) = runs_of(tmp_path)
    records = [{"kind": "train", "iteration": i, "consumed_samples": 16 * i, "loss": 8.0 - i / 10, "lr": 1e-3,
                "tokens_per_s": 12345.6} for i in (1, 2, 3)]
    records.append({"kind": "eval", "group": "validation", "iteration": 3, "loss": 7.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tra')
    (run / "checkpoints" / "global_step3").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("global_step3\n")
    out = mtf("status", str(run), check=True).stdout
    assert "progress    step 3 of 120 | samples 48 | loss 7.7000 | 12,346 tokens/s" in out
    assert "eval        validation loss 7.5000 at step 3" in out
    assert f"checkpoint  {run / 'checkpoints' / 'global_step3'}" in out


def test_extra_sbatch_lines_become_submitit_parameters():
    assert _extra_sbatch(["--mail-type=END", "--requeue", "--comment hello world"]) == \
        {"mail_type": "END", "requeue": True, "comment": "hello world"}


def preflight_records(rates: dict[str, list[float]], gpus: int) -> dict:
    records, rank = [], 0
    for node, node_rates in rates.items():
        for local, rate in enumerate(node_rates):
            records.append({"rank": rank, "local_rank": local, "node": node, "gpus": gpus, "device_name": "H100",
                            "matmul": {"rate": rate, "unit": "TFLOP/s" if gpus else "GFLOP/s"},
                            "allreduce": {"seconds": 0.01, "bytes": 256 << 20, "busbw_gb_s": 150.0,
                                          "correct": True}})
            rank += 1
    return {"world_size": rank, "backend": "nccl" if gpus else "gloo", "records": records}


def test_preflight_names_the_node_with_the_slowest_device():
    rates = {"g1": [700, 705], "g2": [702, 560], "g3": [699, 701]}  # one slow GPU on g2
    s = summarize(preflight_records(rates, gpus=2), expected_gpus=2)
    assert s["slowest"] == "g2" and s["worth_excluding"] and s["warnings"] == []
    text = format_summary(s)
    assert "slowest node: g2 (560.00 TFLOP/s, 20% below the median 699.00)" in text
    assert "--set 'cluster.exclude=[g2]'" in text
    s = summarize(preflight_records({"c1": [30.0], "c2": [29.5]}, gpus=0))
    text = format_summary(s)
    assert "no GPUs on any node" in text and "slowest node: c2" in text and "exclude" not in text
    s = summarize(preflight_records({"g1": [700]}, gpus=4), expected_gpus=8)
    assert s["warnings"] == ["g1 has 4 GPU(s), the recipe asks for 8"]


def test_launch_commands_import_no_torch(tmp_path):
    code = f"""
import sys
from mtf_train.cli import main
assert main([{TINY!r}, "--dry-run", "--runs-dir", {str(tmp_path)!r}, "--set", "executor=slurm"]) == 0
assert main(["status", "--runs-dir", {str(tmp_path)!r}]) == 0
assert main(["status", "--all", "--runs-dir", {str(tmp_path)!r}]) == 0
assert main(["logs", "--runs-dir", {str(tmp_path)!r}]) == 0
assert main(["cancel", "tiny-local", "--runs-dir", {str(tmp_path)!r}]) == 0
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ("torch", "deepspeed", "megatron", "transformers"))
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_help_lists_launch_commands():
    out = mtf("--help", check=True).stdout
    for cmd in ("status", "logs", "cancel", "preflight"):
        assert cmd in out
    assert "--chain N" in mtf("submit", "--help", check=True).stdout
    assert os.access(BIN / "mtf-train", os.X_OK)


def test_runs_dir_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "runs"
    f.write_text("")
    for args in ([TINY, "--dry-run"], ["status"], ["resume"]):
        line = one_line_error(mtf(*args, "--runs-dir", "runs", cwd=tmp_path))
        assert line == f"mtf-train: error: {f}: is a file, not a folder (--runs-dir names the root of run folders)"
    line = one_line_error(mtf(TINY, "--dry-run", env={"MTF_RUNS_DIR": str(f)}))
    assert line.endswith("is a file, not a folder ($MTF_RUNS_DIR names the root of run folders)")


def test_render_onto_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("x")
    line = one_line_error(mtf("render", TINY, "-o", "out", cwd=tmp_path))
    assert line == "mtf-train: error: out: -o: is a file; render writes a folder of files"
    assert (tmp_path / "out").read_text() == "x"


def test_resume_submits_a_slurm_run_again_and_says_why_it_cannot(tmp_path):
    """`resume` of a dry-run folder goes through the run's own executor (slurm: sbatch), failing like a submission
    where there is none; a run still running, or one that does not exist, is one line."""
    mtf(TINY, "--dry-run", "--runs-dir", str(tmp_path), *TWO_NODES, "--set", "executor=slurm", check=True)
    (run,) = runs_of(tmp_path)
    assert json.loads(mtf("status", str(run), "--json", check=True).stdout)["resume"] == f"mtf-train resume {run}"
    proc = mtf("resume", run.name, "--runs-dir", str(tmp_path), env={"PATH": "/nonexistent"})
    assert proc.stdout.startswith(f"resuming {run} from its start (no checkpoint yet)")
    assert one_line_failure(proc) == f"mtf-train: error: {run}: sbatch not found on PATH (use --executor local on a " \
                                     f"single machine)"
    assert "resume (slurm) from step 0" in (run / "events.log").read_text()
    assert (run / "failures").read_text() == "0\n"
    assert "no such run folder" in one_line_error(mtf("resume", "nope", "--runs-dir", str(tmp_path)))
    # A local run whose launcher is this very test process: alive, so not resumable.
    info = json.loads((run / "run.json").read_text())
    info.update(executor="local", state="running", job_ids=[], host=os.uname().nodename, pid=os.getpid())
    (run / "run.json").write_text(json.dumps(info))
    assert "is still running" in one_line_error(mtf("resume", str(run)))


def test_preflight_of_a_local_recipe_runs_here_not_through_sbatch(tmp_path):
    """executor: local in the recipe keeps preflight on this machine even where sbatch exists (here: one that
    would leave a mark if called)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\ntouch {tmp_path / 'sbatch-called'}\nexit 1\n")
    sbatch.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = mtf("preflight", TINY, "--runs-dir", str(tmp_path / "runs"), "--seconds", "0.2", "--timeout", "300",
               "--set", "cluster.gpus_per_node=1", env=env, timeout=360)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "sbatch-called").exists()
    (run,) = [p for p in (tmp_path / "runs" / "tiny-local-preflight").iterdir() if not p.name.startswith(".")]
    data = json.loads((run / "run.json").read_text())
    assert data["executor"] == "local" and data["state"] == "completed" and data["job_ids"] == []
    assert "slowest node:" in proc.stdout


def test_every_markdown_file_the_repository_names_is_in_it():
    """Comments and docs point at files a reader has, not at notes kept elsewhere."""
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True).stdout.split()
    # ... and the files the tool writes for the user (the evaluation's results table).
    names = {Path(f).name for f in tracked} | {"results.md"}
    missing = []
    for f in tracked:
        if f.endswith((".py", ".md", ".yaml", ".j2", ".txt")) or f.startswith("scripts/"):
            text = (ROOT / f).read_text(errors="replace")
            missing += [f"{f}: {m}" for m in sorted(set(re.findall(r"\b([\w-]+\.md)\b", text))) if m not in names]
    assert missing == []


def test_submitit_without_slurm_runs_here_stops_on_ctrl_c_and_resumes(tmp_path):
    """No srun/sbatch: submitit's local executor runs the job script's node role on this machine (the real
    trainer, 2 CPU processes). Ctrl-C at the terminal (SIGINT to the foreground process group) reaches mtf-train
    alone, which turns it into the kill switch: the job saves, the run is recorded as stopped, and `mtf-train
    resume` finishes it from that checkpoint, waiting for the job as the first command did."""
    code = f"""
import sys
from mtf_train.launch import slurm
real = slurm.available
slurm.available = lambda c="sbatch": False if c in ("srun", "sbatch") else real(c)
from mtf_train.cli import main
sys.exit(main(sys.argv[1:]))
"""
    args = [TINY, "--executor", "submitit", "--runs-dir", str(tmp_path), "--set", "eval.iters=0",
            "--set", "training.train_iters=12", "--set", "checkpoint.interval=1000", "--set", "logging.log_interval=1"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 300
    run = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "tiny-local").glob("2*/metrics.jsonl")) if (tmp_path / "tiny-local").exists() else []
        if found and len(found[0].read_text().splitlines()) >= 2:
            run = found[0].parent
            break
        time.sleep(0.3)
    assert run is not None, proc.communicate(timeout=60)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, out + err
    info = json.loads((run / "run.json").read_text())
    step = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("global_step"))
    assert info["state"] == "stopped" and step < 12 and not (run / "finished").exists()
    assert f"stopped at step {step} of 12 (SIGINT); resume with: mtf-train resume {run}" in out
    assert "Traceback" not in (run / "logs" / "main.log").read_text()
    done = subprocess.run([sys.executable, "-c", code, "resume", str(run)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "completed" and info["job_ids"] == [] and info["submitit"]["executor"] == "local"
    assert (run / "finished").exists() and "job=local finished: step 12 of 12" in (run / "events.log").read_text()
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step12"
    assert json.loads(mtf("status", str(run), "--json", check=True).stdout)["state"] == "finished"
    steps = [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 12 and sorted(set(steps)) == list(range(1, 13))


def test_trainer_refuses_deepspeed_activation_checkpointing_alone():
    """The flag picks how recomputation is done; without --checkpoint-activations it would be silently ignored."""
    args = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
            "--tokenizer-name-or-path", "x", "--train-weighted-split-paths-path", "p",
            "--deepspeed-activation-checkpointing"]
    proc = subprocess.run([sys.executable, "-m", "mtf_train.train", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "mtf_train.train: error: mtf_train.train: --deepspeed-activation-checkpointing needs --checkpoint-activations")
