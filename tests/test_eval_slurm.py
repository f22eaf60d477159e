"""The recipe's evaluation job on the real local SLURM cluster (scripts/local-slurm): `mtf-train RECIPE` with
`eval.zero_shot.job` submits the tiny training chain and then eval.sbatch, which runs the real lm-eval on the
run's saved steps; the results land in the run folder and `mtf-train status` shows them.
"""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from tests.helpers import RECIPES, mtf
from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.timeout(900, func_only=True)

TINY = str(RECIPES / "tiny-local.yaml")
STEPS = 30
# Offline, as on a cluster node without internet (sbatch passes the submitting environment to the jobs); one
# thread each, as this machine's cores are shared.
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def diagnose(run: Path) -> str:
    text = [f"--- events\n{(run / 'events.log').read_text()}"]
    for log in sorted((run / "logs").glob("*")):
        text.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(text)


def submit_one_job_with_eval(tmp_path: Path, *extra: str) -> tuple[Path, object, str, str]:
    """The tiny recipe as one training job on one node, with its evaluation job after it (afterok)."""
    args = [TINY, "--executor", "slurm", "--runs-dir", str(tmp_path / "runs")]
    for s in ("cluster.nodes=1", "cluster.gpus_per_node=1", "cluster.partition=debug",
              "eval.zero_shot.job=after_training", f"cluster.master_port={free_port()}", *extra):
        args += ["--set", s]
    proc = mtf(*args, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    (run,) = [p for p in (tmp_path / "runs" / "tiny-local").iterdir() if not p.name.startswith(".")]
    (job,) = info(run)["job_ids"]
    (ev,) = info(run)["eval_job_ids"]
    return run, proc, job, ev


def test_eval_job_follows_the_chain_and_status_shows_its_scores(slurm_cluster: SlurmCluster, tmp_path):
    """A chain of 2 saving at steps 15 and 30; eval.zero_shot.job=every_step: the evaluation job waits for the
    chain's last job (afterany: the first job finishes training and cancels the second), then evaluates both
    saved steps on the shipped sample (XCOPA, from the recipe's eval.zero_shot.data_dir)."""
    runs = tmp_path / "runs"
    sets = ["cluster.nodes=1", "cluster.gpus_per_node=1", "cluster.partition=debug", "eval.iters=0",
            "checkpoint.interval=15", f"training.train_iters={STEPS}", f"cluster.master_port={free_port()}",
            "eval.zero_shot.job=every_step", "eval.zero_shot.tasks=[xcopa]", "eval.zero_shot.time=00:15:00"]
    args = [TINY, "--executor", "slurm", "--runs-dir", str(runs), "--chain", "2"]
    for s in sets:
        args += ["--set", s]
    proc = mtf(*args, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    (run,) = [p for p in (runs / "tiny-local").iterdir() if not p.name.startswith(".")]
    job1, job2 = info(run)["job_ids"]
    (ev,) = info(run)["eval_job_ids"]
    try:
        assert f"submitted evaluation job {ev}, after job {job2} (afterany); results in {run / 'eval'}" in proc.stdout
        assert slurm_cluster.wait_job(job1, timeout=300) == "COMPLETED", diagnose(run)
        assert slurm_cluster.wait_job(job2, timeout=30) == "CANCELLED"
        assert slurm_cluster.wait_job(ev, timeout=600) == "COMPLETED", diagnose(run)
    finally:
        slurm_cluster.cancel_unfinished([job1, job2, ev])
    for step in (15, 30):
        res = json.loads((run / "eval" / f"step_{step}" / "results.json").read_text())
        assert res["step"] == step and set(res["tasks"]) == {"xcopa"}, res
        assert set(res["tasks"]["xcopa"]) == {"sw", "zh"} and res["tasks"]["xcopa"]["zh"]["n"] == 40
        assert (run / "hf" / f"step_{step}" / "config.json").is_file()
    assert (run / "eval" / "accuracy_vs_step.png").stat().st_size > 5000
    events = (run / "events.log").read_text()
    assert f"job={ev} eval: start (every saved step)" in events
    assert f"job={ev} eval: done; results in {run / 'eval'}" in events
    # The job's output is the user's lines (the table); what the libraries print is in logs/eval.log.
    out = (run / "logs" / f"tiny-local-eval-{ev}.out").read_text()
    assert "| xcopa |" in out and "it/s" not in out and "Warning" not in out, out
    assert (run / "logs" / "eval.log").is_file()
    status = mtf("status", str(run), check=True).stdout
    assert re.search(r"^zero-shot   step 30: xcopa \d+\.\d \(% accuracy", status, re.M), status
    assert json.loads(mtf("status", str(run), "--json", check=True).stdout)["state"] == "finished"


def test_a_failed_training_job_cancels_its_evaluation_job(slurm_cluster: SlurmCluster, tmp_path):
    """One training job (afterok) whose launcher fails at once (python = /bin/false): its evaluation job can
    never run, and is cancelled rather than left pending."""
    run, proc, job, ev = submit_one_job_with_eval(tmp_path, "runtime.python=/bin/false")
    try:
        assert f"submitted evaluation job {ev}, after job {job} (afterok)" in proc.stdout
        assert slurm_cluster.wait_job(job, timeout=60) == "FAILED"
        assert slurm_cluster.wait_job(ev, timeout=60) == "CANCELLED"
    finally:
        slurm_cluster.cancel_unfinished([job, ev])
    assert f"job={ev}" not in (run / "events.log").read_text() and not (run / "eval").exists()


def test_cancel_takes_the_evaluation_job_with_the_training_job(slurm_cluster: SlurmCluster, tmp_path):
    """`mtf-train cancel RUN` right after submission: the evaluation job waiting on the training job is cancelled
    with it, not left to start on a run that never finished."""
    run, proc, job, ev = submit_one_job_with_eval(tmp_path)
    try:
        out = mtf("cancel", str(run), env=ENV, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"cancelled job(s) {job} {ev} of {run}" in out.stdout
        assert slurm_cluster.wait_job(job, timeout=60) == "CANCELLED"
        assert slurm_cluster.wait_job(ev, timeout=60) == "CANCELLED"
    finally:
        slurm_cluster.cancel_unfinished([job, ev])
    assert info(run)["state"] == "cancelled" and not (run / "eval").exists()
