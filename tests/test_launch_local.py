"""A local run's whole life through the CLI, as a user types it: what the terminal shows, Ctrl-C (save, stop,
record), `mtf-train resume` to the same losses, a launcher killed outright (status, cancel and `logs -f` see
through it), and the trainer's first error line in run.json and status. The real trainer on CPU, 2 processes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import BIN, RECIPES, ROOT, mtf

pytestmark = pytest.mark.timeout(600, func_only=True)

TINY = str(RECIPES / "tiny-local.yaml")
STEPS = 20
QUICK = ["eval.iters=0", "logging.log_interval=1", "checkpoint.interval=1000", f"training.train_iters={STEPS}"]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def only_run(runs: Path) -> Path:
    (run,) = [p for p in (runs / "tiny-local").iterdir() if not p.name.startswith(".")]
    return run


def losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["iteration"], r["loss"]) for r in recs if r["kind"] == "train"]


def info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def status(run: Path) -> dict:
    return json.loads(mtf("status", str(run), "--json", check=True).stdout)


def start(runs: Path, *extra: str) -> subprocess.Popen:
    """`mtf-train run` in a process group of its own, as a shell starts a foreground command."""
    return subprocess.Popen([str(BIN / "mtf-train"), "run", TINY, "--runs-dir", str(runs), *sets(*QUICK, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(runs: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs_made = list((runs / "tiny-local").glob("2*")) if (runs / "tiny-local").exists() else []
        if runs_made and (runs_made[0] / "metrics.jsonl").exists() and losses(runs_made[0]) \
                and losses(runs_made[0])[-1][0] >= step:
            return runs_made[0]
        if proc.poll() is not None:
            raise AssertionError(f"ended early: {proc.stdout.read()[-2000:]} {proc.stderr.read()[-2000:]}")
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no step {step} within {timeout}s")


# What the terminal shows of a local run: the plan, where the run is, the trainer's own lines. No library noise.
SHOWN = [r"plan for tiny-local", r"  +\S.*", r"run folder: ", r"running on this machine: bash .* \(full log: ",
         r"loaded ", r"training \d+ steps \(", r"FLOPs per token: ", r"MFU: ", r"step \d+/\d+ \| samples \d+ \| loss ", r"saved checkpoint ",
         r"exiting at step \d+ \(kill switch\) after saving; resume with: mtf-train resume ", r"training finished at step",
         r"checkpoint: ", r"metrics: ", r"loss curve: ", r"local run (completed|stopped at step)", r"resuming ", r""]


def assert_quiet(out: str) -> None:
    for line in out.splitlines():
        assert any(re.match(p, line) if p else not line for p in SHOWN), f"unexpected line: {line!r}\n{out}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[tuple[int, float]]:
    """An uninterrupted run (README's first command, shortened)."""
    runs = tmp_path_factory.mktemp("straight")
    proc = mtf(TINY, "--runs-dir", str(runs), *sets(*QUICK), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_quiet(proc.stdout)
    assert proc.stderr == ""
    run = only_run(runs)
    assert f"training finished at step {STEPS}" in proc.stdout and f"local run completed; run folder: {run}" in proc.stdout
    assert "UserWarning" in (run / "logs" / "main.log").read_text()  # the noise is kept, in the log file
    assert info(run)["state"] == "completed"
    return losses(run)


def test_ctrl_c_saves_and_resume_continues_with_the_same_losses(straight, tmp_path):
    runs = tmp_path / "runs"
    proc = start(runs)
    run = wait_for_step(runs, proc, 2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, out + err
    stopped = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("global_step"))
    assert 2 <= stopped < STEPS and losses(run)[-1][0] == stopped
    assert err.splitlines()[-1].startswith("mtf-train: SIGINT: saving a checkpoint, then stopping")
    assert f"local run stopped at step {stopped} of {STEPS} (SIGINT), checkpoint saved; resume with: " \
           f"mtf-train resume {run}" in out
    assert_quiet(out)
    assert "Traceback" not in (run / "logs" / "main.log").read_text()  # the workers never saw the SIGINT
    assert info(run)["state"] == "stopped" and not (run / "finished").exists()
    s = status(run)
    assert s["state"] == "stopped" and s["resume"] == f"mtf-train resume {run}"
    assert f"resume with: mtf-train resume {run}" in mtf("status", str(run), check=True).stdout
    # One command, from another folder, with the run named relative to it.
    proc = mtf("resume", f"tiny-local/{run.name}", "--runs-dir", "runs", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"resuming {run} from step {stopped}" in proc.stdout and f"training finished at step {STEPS}" in proc.stdout
    assert_quiet(proc.stdout)
    assert losses(run) == straight  # the same floats, step for step
    assert status(run)["state"] == "finished" and info(run)["state"] == "completed"
    line = mtf("resume", str(run)).stderr.strip()
    assert line == f"mtf-train: error: {run}: has finished (step {STEPS} of {STEPS}): nothing to resume"


def test_a_killed_launcher_leaves_a_job_that_status_cancel_and_logs_see(tmp_path):
    runs = tmp_path / "runs"
    proc = start(runs, "training.train_iters=1000")  # outlasts the test; 100000 would cost a ~27 s packing index
    run = wait_for_step(runs, proc, 2)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher alone, killed outright
    proc.communicate(timeout=30)
    assert status(run)["state"] == "running"  # its job trains on
    assert "is still running" in mtf("resume", str(run)).stderr
    follow = subprocess.Popen([str(BIN / "mtf-train"), "logs", str(run), "-f"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        out = mtf("cancel", str(run), check=True).stdout
        assert out.startswith("asked the local run to save and exit")
        followed, _ = follow.communicate(timeout=240)  # ends by itself once the job has ended
    finally:
        if follow.poll() is None:
            follow.kill()
    stopped = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("global_step"))
    assert f"exiting at step {stopped} (kill switch) after saving" in followed
    s = status(run)
    assert s["state"] == "stopped" and s["error"] is None and s["resume"] == f"mtf-train resume {run}"
    assert "nothing to cancel: the local run's processes have ended (stopped)" in mtf("cancel", str(run), check=True).stdout
    assert info(run)["state"] == "stopped"


def test_the_trainers_first_error_line_lands_in_run_json_and_status(tmp_path):
    """Data damaged after the run was rendered: the trainer's one-line error is what the user reads."""
    data = tmp_path / "data"
    data.mkdir()
    for p in (ROOT / "data" / "sample").glob("xp3_*_document.*"):
        (data / p.name).write_bytes(p.read_bytes())
    runs = tmp_path / "runs"
    mtf(TINY, "--dry-run", "--runs-dir", str(runs), *sets(*QUICK, f"data.root={data}"), check=True)
    run = only_run(runs)
    bin_ = data / "xp3_es_inputs_document.bin"
    with open(bin_, "r+b") as fh:
        fh.truncate(bin_.stat().st_size // 2)
    proc = mtf("resume", str(run), timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    error = info(run)["error"]
    assert error.startswith(f"mtf_train.train: error: {bin_}: holds ") and "cut short" in error, error
    (line,) = proc.stderr.strip().splitlines()
    assert line == f"mtf-train: error: {run}: {error}; the log is {run / 'logs' / 'main.log'}"
    s = status(run)
    assert s["state"] == "failed" and s["error"] == error and s["resume"] == f"mtf-train resume {run}"
    assert f"state       failed: {error}" in mtf("status", str(run), check=True).stdout
