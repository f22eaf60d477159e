"""The built-in trainer end to end: `mtf-train run` on the shipped sample, on CPU (gloo), real DeepSpeed.

Resume must be exact (bit for bit), and every exit path saves a checkpoint and exits 0.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import RECIPES, mtf

TINY = str(RECIPES / "tiny-local.yaml")
# No loss curve (a second of CPU per job): the default run above draws and checks it.
QUICK = ["eval.iters=0", "logging.log_interval=1", "checkpoint.interval=1000", "logging.loss_curve=false"]
# A run that outlasts any test that stops it (minutes at ~0.3 s a step). Not 100000: its packing index (1.6M samples,
# thousands of epochs of the tiny sample) alone costs ~27 s of CPU to build.
LONG = 1000


def sets(*items: str) -> list[str]:
    out = []
    for item in items:
        out += ["--set", item]
    return out


def only_run(runs: Path) -> Path:
    (run,) = [p for p in (runs / "tiny-local").iterdir() if not p.name.startswith(".")]
    return run


def losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["loss"]) for r in recs if r["kind"] == "train"]


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def test_local_default_trains_and_reports_where_things_are(tiny_default_run):
    """README command one: `mtf-train recipes/tiny-local.yaml` (executor local; the session's shared run,
    tests/fixtures.py, which also asserts its exit code 0)."""
    run, stdout = tiny_default_run
    curve = losses(run)
    assert curve[-1][0] == 120
    first, last = curve[0][1], curve[-1][1]
    assert last < first - 2.0, curve            # the loss clearly falls (about 7.2 -> 2.4)
    assert latest(run) == "global_step120"
    files = {p.name for p in (run / "checkpoints" / "global_step120").iterdir()}
    assert {"layer_01-model_00-model_states.pt", "layer_03-model_00-model_states.pt",
            "layer_06-model_00-model_states.pt", "mp_rank_00_model_states.pt"} <= files
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert (run / "finished").exists()
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["iteration"] for e in evals] == [40, 80, 120] and evals[0]["group"] == "validation"
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    for what in (f"checkpoint: {run / 'checkpoints'}", f"loss curve: {run / 'loss_curve.png'}"):
        assert what in stdout
    # MFU needs a GPU's peak: on CPU the log says so once, after the FLOPs formula, and no step claims one.
    assert stdout.count("MFU: n/a on CPU") == 1 and "FLOPs per token: model 72*l*h^2" in stdout
    assert " | MFU " not in stdout and "TFLOP/s per GPU" in stdout
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "completed" and info["executor"] == "local"


def start_job(tmp_path, *extra: str) -> tuple[Path, subprocess.Popen]:
    """Render a long local run and start its job script (the batch shell) in the background."""
    runs = tmp_path / "runs"
    mtf(TINY, "--dry-run", "--runs-dir", str(runs), *sets(*QUICK, f"training.train_iters={LONG}", *extra),
        check=True)
    run = only_run(runs)
    proc = subprocess.Popen(["bash", str(run / "job.sbatch")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return run, proc


def wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and any(i >= step for i, _ in losses(run)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("timed out waiting for training steps")


def finish(run: Path, proc: subprocess.Popen, timeout: float = 120, first: int = 2) -> str:
    """The job's output, once it has ended with 0 and saved at step `first` or later, where it stopped."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out[-3000:]
    step = int(latest(run).removeprefix("global_step"))
    assert first <= step < LONG and (run / "checkpoints" / f"global_step{step}").is_dir()
    assert losses(run)[-1][0] == step  # it saved where it stopped
    assert not (run / "finished").exists()
    return out


def trainer_pids(batch_shell: int) -> list[int]:
    """The training processes: the children of the launcher (mtf_train.ranks), itself under the batch shell."""
    out = subprocess.run(["ps", "-ww", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    children: dict[int, list[tuple[int, str]]] = {}
    for pid, ppid, args in rows:
        children.setdefault(int(ppid), []).append((int(pid), args))
    found, todo = [], [(batch_shell, "")]
    while todo:
        parent, parent_args = todo.pop()
        for pid, args in children.get(parent, []):
            todo.append((pid, args))
            if "mtf_train.train" in args and "mtf_train.ranks" in parent_args:
                found.append(pid)
    return found


@pytest.mark.parametrize("how", ["kill-switch", "usr1-to-batch-shell", "sigterm-to-trainer"])
def test_exit_paths_save_and_exit_zero(tmp_path, how):
    run, proc = start_job(tmp_path)
    wait_for_step(run, proc, 2)
    if how == "kill-switch":
        (run / "kill-switch").touch()
        reason = "kill switch"
    elif how == "usr1-to-batch-shell":
        os.kill(proc.pid, signal.SIGUSR1)   # what SLURM's --signal=B:USR1@margin does
        reason = "kill switch"
    else:
        pids = trainer_pids(proc.pid)
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGTERM)     # what scancel sends to every task
        reason = "signal SIGTERM"
    out = finish(run, proc)
    assert f"({reason}) after saving" in out
    if how == "usr1-to-batch-shell":
        assert "signal USR1: save and exit" in (run / "events.log").read_text()


def test_exit_duration_saves_and_exits_zero(tmp_path):
    """A duration shorter than the job's start-up: the job still trains one step (as Megatron checks after each
    step), then saves it and exits; it never saves the step it started from and makes no progress."""
    run, proc = start_job(tmp_path, "training.exit_duration_in_mins=0.0001")  # 6 ms
    out = finish(run, proc, timeout=180, first=1)
    assert "exiting at step 1 (exit duration) after saving" in out
    assert latest(run) == "global_step1"


def test_bf16_stops_saves_and_resumes_exactly_past_an_interrupted_save(tmp_path):
    """bf16 runs as DeepSpeed's BF16_Optimizer (ZeRO-1, fp32 gradient accumulation). The run stops at step 2 (exit
    interval) with that step saved. The next job (the same script: the next job of a chain) resumes and, a real
    fault, cannot write one of step 4's files: `latest` must stay at step 2. The job after that resumes from step 2
    again and trains steps 3 and 4 bit for bit as the failed job did (data order and RNG included)."""
    runs = tmp_path / "runs"
    mtf("run", TINY, "--runs-dir", str(runs), check=True, timeout=300,
        *sets(*QUICK, "precision.dtype=bf16", "training.train_iters=4", "checkpoint.interval=2",
              "training.exit_interval=2"))
    run = only_run(runs)
    assert json.loads((run / "ds_config.json").read_text())["data_types"] == {"grad_accum_dtype": "fp32"}
    assert latest(run) == "global_step2" and not (run / "finished").exists()
    assert "saved and exited at step 2 of 4" in (run / "events.log").read_text()
    assert any(p.name.startswith("bf16_zero_pp_rank_0") for p in (run / "checkpoints/global_step2").iterdir())
    blocker = run / "checkpoints" / "global_step4" / "layer_03-model_00-model_states.pt"
    blocker.mkdir(parents=True)  # a folder where DeepSpeed wants to write a file
    # The next job of the run resumes, trains on to step 4 and fails while saving it.
    proc = subprocess.run(["bash", str(run / "job.sbatch")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "loaded" in proc.stdout and "global_step2" in proc.stdout
    assert latest(run) == "global_step2"
    assert "failed: exit" in (run / "events.log").read_text()
    blocker.rmdir()
    proc = subprocess.run(["bash", str(run / "job.sbatch")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "global_step2" in proc.stdout and latest(run) == "global_step4"
    assert (run / "finished").exists()
    assert "loss curve:" not in proc.stdout and not (run / "loss_curve.png").exists()  # logging.loss_curve=false
    got = losses(run)  # appended by each job: steps 1-2, the failed job's 3-4, the last job's 3-4
    assert [i for i, _ in got] == [1, 2, 3, 4, 3, 4] and all(0 < x < 20 for _, x in got)
    assert got[4:] == got[2:4]  # exact float equality
