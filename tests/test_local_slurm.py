"""End-to-end checks of the local SLURM cluster (scripts/local-slurm) that launcher tests rely on.

Every wait is bounded; the whole file takes well under two minutes (most of it is the --signal test,
whose signal SLURM delivers on its own schedule of up to a minute).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.timeout(150, func_only=True)


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster):
    """The session cluster; cancels whatever a test left running."""
    before = len(slurm_cluster.submitted)
    yield slurm_cluster
    slurm_cluster.cancel_unfinished(slurm_cluster.submitted[before:])


def wait_for_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.1)
    raise TimeoutError(f"{path} did not appear within {timeout}s")


def test_cluster_shape(cluster: SlurmCluster):
    assert len(cluster.nodes) >= 2
    assert cluster.nodes[:2] == ["n1", "n2"]
    assert cluster.partition == "debug"
    assert cluster.cpus_per_node == 8
    assert cluster.gpus_per_node == 8
    states = cluster.run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t").stdout.split("\n")
    for line in filter(None, states):
        assert line.split()[1] in {"idle", "mix", "alloc", "comp"}, line
    # The state file the fixture reads says what SLURM itself reports.
    seen = {}
    for line in cluster.run("sinfo", "-h", "-N", "-o", "%N %P %c %G").stdout.split("\n"):
        if line.strip():
            name, part, cpus, gres = line.split()[:4]
            seen[name] = (part.rstrip("*"), int(cpus), int(gres.split(":")[-1].split("(")[0]))
    assert sorted(seen, key=lambda n: (len(n), n)) == cluster.nodes
    assert set(seen.values()) == {(cluster.partition, cluster.cpus_per_node, cluster.gpus_per_node)}


def test_two_node_job_sees_rank_node_and_gpus(cluster: SlurmCluster, tmp_path: Path):
    script = """#!/bin/bash
srun bash -c 'echo "$SLURM_PROCID $SLURMD_NODENAME $CUDA_VISIBLE_DEVICES $SLURM_GPUS_ON_NODE" > rank.$SLURM_PROCID'
"""
    job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--job-name=mtf-2node",
                         "--output=slurm-%j.out", script=script, cwd=tmp_path)
    state = cluster.wait_job(job, timeout=60)
    log = (tmp_path / f"slurm-{job}.out").read_text() if (tmp_path / f"slurm-{job}.out").exists() else ""
    assert state == "COMPLETED", log
    rows = sorted((tmp_path / f"rank.{i}").read_text().split() for i in range(2))
    assert [r[0] for r in rows] == ["0", "1"]
    assert sorted(r[1] for r in rows) == ["n1", "n2"]
    for row in rows:
        assert row[2] == "0,1,2,3,4,5,6,7"
        assert row[3] == "8"


def test_nodelist_expands_to_resolvable_hostnames(cluster: SlurmCluster, tmp_path: Path):
    # What launchers do for MASTER_ADDR: first name of `scontrol show hostnames $SLURM_JOB_NODELIST`.
    script = """#!/bin/bash
echo "$SLURM_JOB_NODELIST" > nodelist
scontrol show hostnames "$SLURM_JOB_NODELIST" > hostnames
for h in $(cat hostnames); do getent hosts "$h" | awk '{print $1}'; done > addresses
"""
    job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--output=slurm-%j.out", script=script, cwd=tmp_path)
    assert cluster.wait_job(job, timeout=60) == "COMPLETED"
    assert (tmp_path / "nodelist").read_text().strip() == "n[1-2]"
    assert (tmp_path / "hostnames").read_text().split() == ["n1", "n2"]
    assert (tmp_path / "addresses").read_text().split() == ["127.0.0.1", "127.0.0.1"]
    assert socket.gethostbyname("n1") == socket.gethostbyname("n2") == "127.0.0.1"


def test_dependency_afterany_runs_after_a_failed_job(cluster: SlurmCluster, tmp_path: Path):
    first = cluster.sbatch("--output=first.out", "--wrap", "sleep 3; touch first.done; exit 3", cwd=tmp_path)
    second = cluster.sbatch(f"--dependency=afterany:{first}", "--output=second.out",
                            "--wrap", "test -e first.done && echo ok > second.ok", cwd=tmp_path)
    # While the first job runs, the second waits on it (the reason is set on the next scheduling pass).
    deadline = time.monotonic() + 2.5
    while True:
        rec = cluster.job_records(second)[0]
        assert rec["JobState"] == "PENDING", rec
        if rec["Reason"] == "Dependency" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert rec["Reason"] == "Dependency", rec
    assert cluster.wait_job(first, timeout=60) == "FAILED"
    assert cluster.wait_job(second, timeout=60) == "COMPLETED"
    assert (tmp_path / "second.ok").read_text().strip() == "ok"
    assert cluster.job_records(first)[0]["ExitCode"] == "3:0"


def test_scancel_sends_sigterm_to_the_batch_shell(cluster: SlurmCluster, tmp_path: Path):
    script = """#!/bin/bash
trap 'echo TERM > got_signal; exit 0' TERM
echo ready > ready
while :; do sleep 1 & wait $!; done
"""
    job = cluster.sbatch("--output=slurm-%j.out", script=script, cwd=tmp_path)
    assert cluster.wait_state(job, "RUNNING", timeout=60) == "RUNNING"
    wait_for_file(tmp_path / "ready", timeout=30)
    cluster.scancel(job)
    assert cluster.wait_job(job, timeout=60) == "CANCELLED"
    assert wait_for_file(tmp_path / "got_signal", timeout=10).strip() == "TERM"


def test_wait_job_is_bounded_for_a_job_that_cannot_run(cluster: SlurmCluster, tmp_path: Path):
    # More nodes than exist: SLURM accepts it and leaves it pending forever.
    job = cluster.sbatch(f"--nodes={len(cluster.nodes) + 1}", "--wrap", "true", cwd=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        cluster.wait_job(job, timeout=2)
    assert time.monotonic() - t0 < 10
    cluster.scancel(job)
    assert cluster.wait_job(job, timeout=30) == "CANCELLED"


def test_signal_reaches_batch_shell_before_time_limit(cluster: SlurmCluster, tmp_path: Path):
    # --time has a 1 minute granularity and SLURM checks signals on its own period (~30 s): USR1@59 on a
    # 1 minute limit arrives somewhere between ~1 s and ~35 s. Assert only "before the limit".
    script = """#!/bin/bash
trap 'date +%s > got_usr1; exit 0' USR1
date +%s > started
while :; do sleep 1 & wait $!; done
"""
    job = cluster.sbatch("--time=1", "--signal=B:USR1@59", "--output=slurm-%j.out", script=script, cwd=tmp_path)
    state = cluster.wait_job(job, timeout=110)
    assert (tmp_path / "got_usr1").exists(), f"no USR1 before the job ended ({state})"
    assert state == "COMPLETED"  # the trap exited 0 before the time limit (else TIMEOUT)
    started = int((tmp_path / "started").read_text())
    got = int((tmp_path / "got_usr1").read_text())
    assert 0 <= got - started < 60
