"""`mtf-train` against the real local SLURM cluster (scripts/local-slurm, 2 nodes): the real trainer on CPU across
both nodes through the rendered job script, chains that stop and resume exactly, submitit's requeue, status,
logs, cancel, a failed sbatch, the failure cap, and preflight.

Every wait is bounded. The tiny recipe runs 2 nodes x 1 process (dp 2, gloo over loopback); its 16 steps take a
few seconds, so a cancel or signal is sent while the trainer ranks are held stopped (`stopped_at_a_step`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import BIN, RECIPES, mtf
from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.timeout(300, func_only=True)

TINY = str(RECIPES / "tiny-local.yaml")
STEPS = 16
# A short run that still clearly learns (loss about 7.86 -> 5.1): twice the recipe's learning rate, warm-up over 4
# steps; each resume test trains its STEPS steps across two jobs, so every step saved is saved four times over.
BASE = ["cluster.nodes=2", "cluster.gpus_per_node=1", "cluster.partition=debug", "eval.iters=0",
        "logging.log_interval=1", "checkpoint.interval=1000", f"training.train_iters={STEPS}",
        "optimizer.lr=6e-3", "optimizer.warmup_samples=64",
        # first-run flags: they must be dropped by every job after the first checkpoint (from random weights here)
        "checkpoint.no_load_optim=true", "checkpoint.reset_progress=true", "checkpoint.from_scratch=true"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(*items: str) -> list[str]:
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


def submit(runs: Path, *extra: str, executor: str = "slurm", chain: int | None = None,
           check: bool = True) -> tuple[Path | None, subprocess.CompletedProcess]:
    args = [TINY, "--executor", executor, "--runs-dir", str(runs),
            *sets(*BASE, f"cluster.master_port={free_port()}", *extra)]
    if chain:
        args += ["--chain", str(chain)]
    proc = mtf(*args, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    found = [p for p in (runs / "tiny-local").iterdir() if not p.name.startswith(".")] if runs.exists() else []
    return (found[0] if len(found) == 1 else None), proc


def info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def status(run: Path) -> dict:
    return json.loads(mtf("status", str(run), "--json", check=True).stdout)


def losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["iteration"], r["loss"]) for r in recs if r["kind"] == "train"]


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


def wait_for_step(run: Path, step: int, timeout: float = 120, poll: float = 0.5) -> int:
    def reached():
        try:
            got = losses(run)
        except (OSError, ValueError, KeyError):
            return None
        return got[-1][0] if got and got[-1][0] >= step else None
    return wait_until(reached, timeout, f"step {step} in {run}/metrics.jsonl", poll=poll)


def trainer_pids(run: Path) -> list[int]:
    """The run's trainer ranks on this machine (both nodes of the local cluster are here)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # not a process, or gone
            continue
        if "mtf_train.train" in argv and "torch.distributed.run" not in argv and str(run) in " ".join(argv):
            pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def stopped_at_a_step(run: Path, until: Path):
    """Holds the run's trainer ranks still (SIGSTOP) while the block sends its signal, and until `until` (the kill
    switch it causes) exists: the signal then lands at a known step on any machine, where a fast one would
    otherwise train all STEPS steps before it arrives. This is a real stop, as a debugger's or an admin's; SLURM
    continues a job's stopped processes itself before a cancel's TERM, and the block's end continues them."""
    pids = trainer_pids(run)
    assert len(pids) == 2, (pids, diagnose(run))
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
        wait_until(until.exists, 60, f"{until} after the signal\n{diagnose(run)}", poll=0.1)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def events(run: Path) -> str:
    return (run / "events.log").read_text()


def diagnose(run: Path) -> str:
    text = [f"--- events\n{events(run)}"]
    for log in sorted((run / "logs").glob("*")) + sorted(run.glob("submitit/*/*.out")):
        lines = [x for x in log.read_text(errors="replace").splitlines() if "Warning" not in x and "warn" not in x]
        text.append(f"--- {log.name}\n" + "\n".join(lines[-25:]))
    return "\n".join(text)


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    """The session cluster; cancels the jobs of every run a test left behind under tmp_path."""
    yield slurm_cluster
    ids = []
    for run_json in tmp_path.glob("**/run.json"):
        try:
            ids += [str(j) for j in json.loads(run_json.read_text()).get("job_ids", [])]
        except ValueError:
            pass
    slurm_cluster.cancel_unfinished(ids)


@pytest.fixture(scope="module")
def straight(slurm_cluster: SlurmCluster, tmp_path_factory):  # noqa: F811
    """One uninterrupted 2-node run of STEPS steps, submitted as a chain of 2: the first job finishes and
    cancels the second."""
    runs = tmp_path_factory.mktemp("straight")
    t0 = time.monotonic()
    run, proc = submit(runs, chain=2)
    job1, job2 = info(run)["job_ids"]
    try:
        state = slurm_cluster.wait_job(job1, timeout=240)
    finally:
        slurm_cluster.cancel_unfinished([job1, job2])
    return {"run": run, "jobs": (job1, job2), "state": state, "stdout": proc.stdout, "seconds": time.monotonic() - t0}


def test_two_node_run_completes_with_its_loss_in_the_run_folder(straight, slurm_cluster):
    run = straight["run"]
    assert straight["state"] == "COMPLETED", diagnose(run)
    job1, job2 = straight["jobs"]
    assert f"submitted a chain of 2 jobs: {job1} -> {job2}" in straight["stdout"]
    curve = losses(run)
    assert [i for i, _ in curve] == list(range(1, STEPS + 1))
    assert curve[-1][1] < curve[0][1] - 2.0, curve       # about 7.86 -> 5.1
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert (run / "finished").exists() and (run / "checkpoints" / "latest").read_text().strip() == f"global_step{STEPS}"
    log = events(run)
    assert f"job={job1} start: 2 node(s) x 1 on n[1-2], rendezvous n1:" in log
    assert f"job={job1} finished: step {STEPS} of {STEPS}" in log
    # The finished job cancelled the rest of its chain: job 2 never ran.
    assert f"job={job1} cancelled the pending jobs of the chain: finished" in log
    assert slurm_cluster.wait_job(job2, timeout=30) == "CANCELLED" and f"job={job2}" not in log
    s = status(run)
    assert s["state"] == "finished" and [j["state"] for j in s["jobs"]] == ["COMPLETED", "CANCELLED"]
    assert s["progress"]["iteration"] == STEPS and s["checkpoint"].endswith(f"global_step{STEPS}")
    text = mtf("status", str(run), check=True).stdout
    assert f"progress    step {STEPS} of {STEPS} |" in text and "tokens/s" in text
    assert f"training finished at step {STEPS}" in mtf("logs", str(run), check=True).stdout
    # Both ranks ran, one per node, with the rendered arguments.
    main_log = (run / "logs" / "main.log").read_text()
    assert "world 2 = pp 1 x tp 1 x dp 2" in main_log and "--no-load-optim" in (run / "job.sbatch").read_text()


def follow_logs(run: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "mtf-train"), "logs", str(run), "-f"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def followed(follow: subprocess.Popen, timeout: float) -> str:
    """What `logs -f` printed; it must end by itself (the run's jobs have ended) and exit 0."""
    try:
        out, err = follow.communicate(timeout=timeout)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 0, err
    return out


def test_chain_stops_on_the_pre_timeout_signal_and_a_stopped_run_resumes_with_one_command(straight,
                                                                                       cluster: SlurmCluster,
                                                                                       tmp_path):
    """A chain of 2. Job 1 gets what `--signal=B:USR1@margin` sends (USR1 to the batch shell), saves and exits;
    job 2 starts after it, drops the first-run flags and resumes from that checkpoint (status and logs are
    checked while it runs). Job 2 is stopped the same way: with no job left in the chain the run is stopped,
    status says how to resume it, and `mtf-train resume` (typed from another folder, the run named relative to
    it) submits job 3, which finishes with the same losses as the uninterrupted run, float for float."""
    run, _ = submit(tmp_path / "runs", chain=2)
    job1, job2 = info(run)["job_ids"]
    follow = follow_logs(run)
    try:
        wait_for_step(run, 3, poll=0.05)
        with stopped_at_a_step(run, run / "kill-switch"):
            cluster.run("scancel", "--batch", "--signal=USR1", job1)
        assert cluster.wait_job(job1, timeout=120) == "COMPLETED", diagnose(run)
        cluster.wait_state(job2, "RUNNING", timeout=60)
        s = status(run)
        stopped = s["progress"]["iteration"]
        assert s["state"] == "running" and [j["state"] for j in s["jobs"]] == ["COMPLETED", "RUNNING"], s
        assert 3 <= stopped < STEPS - 2 and s["checkpoint"] == str(run / "checkpoints" / f"global_step{stopped}")
        text = mtf("status", str(run), check=True).stdout
        assert f"jobs        {job1} COMPLETED" in text and f"| {job2} RUNNING" in text
        assert f"progress    step {stopped} of {STEPS} |" in text
        assert f"exiting at step {stopped} (kill switch) after saving" in mtf("logs", str(run), check=True).stdout
        # Job 2 resumed: stop it too, once it has trained a step.
        wait_for_step(run, stopped + 1, poll=0.05)
        with stopped_at_a_step(run, run / "kill-switch"):
            cluster.run("scancel", "--batch", "--signal=USR1", job2)
        assert cluster.wait_job(job2, timeout=120) == "COMPLETED", diagnose(run)
        out = followed(follow, timeout=60)  # `logs -f` ends by itself once the chain has ended
    finally:
        if follow.poll() is None:
            follow.kill()
    log = events(run)
    assert f"job={job1} saved and exited at step {stopped} of {STEPS}; the next job resumes" in log
    assert f"job={job1} first job: load {run / 'checkpoints'} --no-load-optim --reset-progress" in log
    assert f"job={job1} signal USR1: save and exit" in log
    assert f"job={job2} resume from {run / 'checkpoints'} (global_step{stopped})" in log
    assert f"exiting at step {stopped} (kill switch) after saving" in out
    s = status(run)
    second = s["progress"]["iteration"]
    assert stopped < second < STEPS and s["state"] == "stopped" and s["resume"] == f"mtf-train resume {run}", s
    assert f"job={job2} saved and exited at step {second} of {STEPS}; resume with: mtf-train resume {run}" in log
    assert f"resume with: mtf-train resume {run}" in mtf("status", str(run), check=True).stdout
    proc = mtf("resume", f"tiny-local/{run.name}", "--runs-dir", "runs", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = info(run)["job_ids"]  # the run's chain of 2 again: job 3 finishes and cancels job 4
    assert len(ids) == 4 and ids[:2] == [job1, job2], ids
    assert f"resuming {run} from step {second}" in proc.stdout
    assert f"submitted a chain of 2 jobs: {ids[2]} -> {ids[3]}" in proc.stdout
    follow = follow_logs(run)
    assert cluster.wait_job(ids[2], timeout=180) == "COMPLETED", diagnose(run)
    assert cluster.wait_job(ids[3], timeout=30) == "CANCELLED"
    out = followed(follow, timeout=60)
    log = events(run)
    assert f"job={ids[2]} resume from {run / 'checkpoints'} (global_step{second})" in log
    assert f"job={ids[2]} finished: step {STEPS} of {STEPS}" in log
    assert f"training finished at step {STEPS}" in out
    # The loss continues exactly: the same floats as the uninterrupted run, step for step.
    assert losses(run) == losses(straight["run"])
    assert status(run)["state"] == "finished"
    assert "nothing to resume" in mtf("resume", str(run)).stderr


def test_cancel_stops_the_whole_chain(cluster: SlurmCluster, tmp_path):
    run, _ = submit(tmp_path / "runs", "training.train_iters=1000", chain=2)  # outlasts the test
    job1, job2 = info(run)["job_ids"]
    cluster.wait_state(job1, "RUNNING", timeout=60)
    out = mtf("cancel", str(run), check=True).stdout
    assert f"cancelled job(s) {job1} {job2} of {run}" in out
    assert cluster.wait_job(job1, timeout=60) == "CANCELLED"
    assert cluster.wait_job(job2, timeout=60) == "CANCELLED"
    assert f"job={job2}" not in events(run) and f"cancelled jobs {job1} {job2}" in events(run)
    s = status(run)
    assert s["state"] == "cancelled" and [j["state"] for j in s["jobs"]] == ["CANCELLED", "CANCELLED"]
    assert "nothing to cancel" in mtf("cancel", str(run), check=True).stdout


def test_failed_sbatch_marks_the_run_failed_with_sbatchs_message(cluster: SlurmCluster, tmp_path):
    run, proc = submit(tmp_path / "runs", "cluster.partition=nope", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"mtf-train: error: {run}: sbatch failed: sbatch: error: invalid partition specified: nope "
                    f"sbatch: error: Batch job submission failed: Invalid partition name specified")
    data = info(run)
    assert data["state"] == "failed" and data["job_ids"] == [] and "Invalid partition name" in data["error"]
    assert data["submit_commands"] == [["sbatch", "--parsable", str(run / "job.sbatch")]]
    assert "submit failed: sbatch failed: sbatch: error: invalid partition" in events(run)


def test_consecutive_failures_stop_the_chain(cluster: SlurmCluster, tmp_path):
    """A launcher that fails at once (python = /bin/false): three failures in a row, then the third job cancels
    the fourth."""
    run, _ = submit(tmp_path / "runs", "runtime.python=/bin/false", chain=4)
    ids = info(run)["job_ids"]
    for job in ids[:3]:
        assert cluster.wait_job(job, timeout=60) == "FAILED"
    assert cluster.wait_job(ids[3], timeout=30) == "CANCELLED"
    log = events(run)
    # Both nodes' launchers fail; when one fails first, srun's --kill-on-bad-exit terminates the other, and srun
    # then reports 143 (SIGTERM) rather than 1: which comes first is a race.
    assert re.search(rf"job={ids[2]} failed: exit (1|143) \(3 in a row\)", log), log
    assert f"job={ids[2]} cancelled the pending jobs of the chain: 3 failures in a row" in log
    assert f"job={ids[3]}" not in log and (run / "failures").read_text().strip() == "3"
    assert status(run)["state"] == "failed"


def test_a_cancelled_submitit_run_resumes_with_one_command_and_requeues_at_the_pre_timeout_signal(
        straight, cluster: SlurmCluster, tmp_path):
    """submitit, one task per node. `mtf-train cancel` (scancel: TERM, the kill switch, a save) then
    `mtf-train resume`: a new submitit job resumes from the save. That job then gets submitit's signal (USR2 to
    every task): task 0 touches the kill switch, waits for the save and requeues the job, which resumes exactly
    there and finishes with the same losses as the uninterrupted run."""
    run, proc = submit(tmp_path / "runs", executor="submitit")
    (job1,) = info(run)["job_ids"]
    assert f"submitted job {job1} through submitit" in proc.stdout
    wait_for_step(run, 1, poll=0.05)
    with stopped_at_a_step(run, run / "kill-switch"):  # SLURM continues them, with the TERM
        assert f"cancelled job(s) {job1}" in mtf("cancel", str(run), check=True).stdout
    assert cluster.wait_job(job1, timeout=120) == "CANCELLED"
    s = status(run)
    assert s["state"] == "cancelled" and s["resume"] == f"mtf-train resume {run}", s
    proc = mtf("resume", str(run), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = info(run)["job_ids"]
    assert len(ids) == 2 and ids[0] == job1 and f"submitted job {ids[1]} through submitit" in proc.stdout
    job = ids[1]
    wait_until(lambda: f"job={job} resume from" in events(run), 120, f"job {job} to start\n{diagnose(run)}")
    ran = max(i for i, _ in losses(run))  # job 1's last step; its save may be earlier
    wait_for_step(run, ran + 1, poll=0.05)  # job 2 trains on past it
    with stopped_at_a_step(run, run / "kill-switch"):
        cluster.run("scancel", "--signal=USR2", job)  # what submitit's --signal=USR2@margin does
    wait_until(lambda: (run / "finished").exists(), 240, f"submitit run {run} to finish\n{diagnose(run)}")
    assert cluster.wait_job(job, timeout=60) == "COMPLETED", diagnose(run)
    log = events(run)
    resumed = [int(x) for x in re.findall(rf"job={job} resume from {re.escape(str(run / 'checkpoints'))} "
                                          r"\(global_step(\d+)\)", log)]
    stopped = int(log.split(f"job={job} saved and exited at step ")[1].split()[0])
    assert len(resumed) == 2 and resumed[0] <= ran < stopped == resumed[1], (resumed, ran, log)
    assert f"job={job} submitit pre-timeout signal: save, exit and requeue" in log
    assert log.count(f"job={job} start: 2 node(s) x 1 (role node)") == 2
    # Steps trained past the last save before the cancel are logged twice; from the resumed job on, each step
    # once (the requeue resumes exactly where it saved), and every step's loss is the uninterrupted run's.
    got = losses(run)
    first = next((k for k in range(1, len(got)) if got[k][0] <= got[k - 1][0]), 0)  # job 2's first step, if a repeat
    before = got[first - 1][0] if first else resumed[0]
    assert [i for i, _ in got] == list(range(1, before + 1)) + list(range(resumed[0] + 1, STEPS + 1)), got
    assert sorted(dict(got).items()) == losses(straight["run"])
    assert got[-(STEPS - resumed[0]):] == losses(straight["run"])[resumed[0]:]
    for submission in run.glob("submitit/*/*_submission.sh"):
        text = submission.read_text()
        for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=USR2@300",
                     "#SBATCH --partition=debug", "#SBATCH --time=30"):
            assert line in text, (submission, line)
    assert status(run)["state"] == "finished"


def test_preflight_measures_each_node_and_names_the_slowest(cluster: SlurmCluster, tmp_path):
    # The tiny recipe says executor local (which keeps preflight on this machine): ask for SLURM.
    proc = mtf("preflight", TINY, "--executor", "slurm", "--runs-dir", str(tmp_path), "--seconds", "0.5", "--timeout", "120",
               *sets("cluster.nodes=2", "cluster.gpus_per_node=1", "cluster.partition=debug",
                     f"cluster.master_port={free_port()}"), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = [p for p in (tmp_path / "tiny-local-preflight").iterdir() if not p.name.startswith(".")]
    result = json.loads((run / "preflight.json").read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert sorted(r["node"] for r in result["records"]) == ["n1", "n2"]
    assert all(r["gpus"] == 0 and r["matmul"]["rate"] > 0 and r["allreduce"]["correct"] for r in result["records"])
    table = proc.stdout.split("waiting")[1]
    rows = {line.split()[0]: float(line.split()[3]) for line in table.splitlines() if line.startswith(("n1 ", "n2 "))}
    assert set(rows) == {"n1", "n2"}
    slowest = min(rows, key=rows.get)
    assert f"slowest node: {slowest} (" in proc.stdout
    assert "no GPUs on any node" in proc.stdout and "all-reduce across 2 node(s) (gloo)" in proc.stdout
    assert (run / "preflight.txt").read_text().strip() in proc.stdout
    assert info(run)["state"] == "completed" and info(run)["slowest"] == slowest
