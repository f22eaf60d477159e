"""How processes start and end: `mtf_train.ranks` (one machine's ranks, as torchrun starts them, sharing one
import) and `process.exit_now` (entry points end without the interpreter's teardown, losing nothing)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

# A program for the launcher: PRELOAD names `heavy`, which records every process that imports it; main prints
# the rank's environment and arguments, or does what $ACT says.
HEAVY = "import os, pathlib\npathlib.Path(os.environ['OUT'], f'imported-{os.getpid()}').touch()\n"
PROBE = """
import os, signal, sys, time
PRELOAD = ("heavy",)
def main(argv):
    r, act = int(os.environ["RANK"]), os.environ.get("ACT", "")
    if act == "fail" and r == 1:
        return 3
    if act in ("fail", "sleep"):
        time.sleep(600)
    if act == "term":
        signal.signal(signal.SIGTERM, lambda *_: (open(os.path.join(os.environ["OUT"], f"term-{r}"), "w").close(),
                                                  sys.exit(0)))
        open(os.path.join(os.environ["OUT"], f"ready-{r}"), "w").close()
        time.sleep(600)
    os.write(1, " ".join(map(str, (r, os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"],
             os.environ["MASTER_PORT"], os.getppid(), "heavy" in sys.modules, repr(argv)))).encode() + b"\\n")  # one write
    return 0
if __name__ == "__main__":  # spawned ranks run `python -m probe ARGS`
    sys.exit(main(sys.argv[1:]))
"""


def launcher(tmp_path: Path, world: int, *args: str, act: str = "", thread: bool = False) -> subprocess.Popen:
    (tmp_path / "heavy.py").write_text(HEAVY + ("import threading, time\nthreading.Thread(target=time.sleep, "
                                                "args=(600,), daemon=True).start()\n" if thread else ""))
    (tmp_path / "probe.py").write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OUT=str(tmp_path),
               ACT=act)
    return subprocess.Popen([sys.executable, "-m", "mtf_train.ranks", "--nproc_per_node", str(world), "-m", "probe",
                             f"--tag={tmp_path}", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("thread", [False, True], ids=["fork", "spawn-when-a-thread-is-left"])
def test_ranks_get_torchruns_environment_and_share_one_import(tmp_path, thread):
    proc = launcher(tmp_path, 3, "--lr", "1e-4", "-m", "x", thread=thread)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    rows = sorted(line.split(None, 7) for line in out.splitlines())
    assert [r[:4] for r in rows] == [[str(i), str(i), "3", "127.0.0.1"] for i in range(3)]
    assert len({r[4] for r in rows}) == 1 and int(rows[0][4]) > 0  # one rendezvous port for all
    assert {r[7] for r in rows} == {repr([f"--tag={tmp_path}", "--lr", "1e-4", "-m", "x"])}  # the program's arguments, as given
    importers = {int(p.name.removeprefix("imported-")) for p in tmp_path.glob("imported-*")}
    if not thread:  # forked: the launcher imported PRELOAD once, and every rank is its child and has it
        assert importers == {proc.pid} and {int(r[5]) for r in rows} == {proc.pid} and {r[6] for r in rows} == {"True"}
    else:  # a preload that leaves a thread: fresh processes, said once
        assert "threads after importing probe: starting fresh processes" in err
        assert {r[6] for r in rows} == {"False"}


def test_first_failing_rank_stops_the_others(tmp_path):
    """Rank 1 fails at once; rank 0 would wait for it forever (as a rank in a collective does)."""
    start = time.monotonic()
    proc = launcher(tmp_path, 2, act="fail")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and time.monotonic() - start < 60  # 1 whatever the rank's code, as torchrun
    assert "mtf_train.ranks: rank 1 exited with code 3; the other ranks were stopped" in err
    assert not alive(tmp_path)


def alive(tmp_path: Path) -> str:
    """The pids of this test's launcher and ranks."""
    return subprocess.run(["pgrep", "-f", "--", f"-m probe --tag={tmp_path}( |$)"], capture_output=True,
                          text=True).stdout


def wait_for(cond, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_signals_reach_the_ranks_and_a_killed_launcher_leaves_none(tmp_path):
    proc = launcher(tmp_path, 2, act="term")
    wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == 2, "ranks ready")
    proc.send_signal(signal.SIGTERM)  # as torchrun: passed to every rank, whose handlers save and exit 0
    proc.communicate(timeout=60)
    assert proc.returncode == 0 and sorted(p.name for p in tmp_path.glob("term-*")) == ["term-0", "term-1"]

    proc = launcher(tmp_path, 2, act="sleep")
    wait_for(lambda: len(alive(tmp_path).split()) == 3, "launcher and 2 ranks")
    proc.kill()  # no chance to clean up: the ranks die with it (parent-death signal)
    proc.communicate(timeout=60)
    wait_for(lambda: alive(tmp_path) == "", "ranks outlived their launcher", timeout=10)


def test_the_launcher_refuses_a_command_without_a_runnable_module():
    proc = subprocess.run([sys.executable, "-m", "mtf_train.ranks", "--nproc_per_node", "2"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "-m MODULE is required" in proc.stderr and "Traceback" not in proc.stderr
    for module, error in (("string", "string has no main(argv) to run"), ("json", "no module named json.__main__")):
        proc = subprocess.run([sys.executable, "-m", "mtf_train.ranks", "--nproc_per_node", "2", "-m", module],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.strip() == f"python -m mtf_train.ranks: error: {error}"


def test_exit_now_keeps_the_exit_code_and_everything_written(tmp_path):
    """Buffered output, logging handlers, atexit handlers and non-daemon threads all finish before the end."""
    script = tmp_path / "s.py"
    script.write_text(f"""
import atexit, logging, sys, threading, time
from mtf_train.process import exit_now
logging.basicConfig(filename={str(tmp_path / 'log')!r}, level=logging.INFO)
logging.info("logged")
atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').write('ran'))
threading.Thread(target=lambda: (time.sleep(0.5), open({str(tmp_path / 'thread')!r}, 'w').write('done'))).start()
sys.stdout.write("buffered")
exit_now(7)
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7 and proc.stdout == "buffered", proc
    assert "logged" in (tmp_path / "log").read_text()
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"


CALLER = """
import atexit, os, sys, threading, time
from pathlib import Path
from mtf_train import ranks
out = Path(os.environ["OUT"])
if sys.argv[1] == "thread":
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
atexit.register(lambda: open(out / f"atexit-{os.getpid()}", "w").close())
sys.stdout.write("caller line\\n")  # still buffered when the ranks fork: printed once, by the caller
for n in (1, 2):
    code = ranks.run(2, "probe", [f"--tag={out}", f"run{n}"], out / "log", cwd=out / "cwd", env={"ACT": ""})
    print("code", code)
os.environ["ACT"] = "fail"
print("code", ranks.run(2, "probe", [f"--tag={out}"], out / "fail.log", env={"ACT": "fail"}))
def switches():
    status = Path("/proc/self/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])
before = switches()
try:
    ranks.run(2, "probe", [f"--tag={out}"], out / "slow.log", env={"ACT": "sleep"}, timeout=2)
except TimeoutError as err:
    print("timeout", err)
(out / "wakeups").write_text(str(switches() - before))
try:
    os.waitpid(-1, os.WNOHANG)
    print("a child is left")
except ChildProcessError:
    print("no child left")
"""


@pytest.mark.parametrize("thread", [False, True], ids=["forked-from-the-caller", "subprocess-when-a-thread-runs"])
def test_run_from_a_caller(tmp_path, thread):
    """`ranks.run`, as the checkpoint tools call it: the ranks fork from the caller (which imports PRELOAD once for
    all its runs) unless a thread runs there; their output goes to the log; the caller's buffered output and exit
    handlers stay the caller's; a failed rank gives 1, a timeout kills the ranks."""
    (tmp_path / "heavy.py").write_text(HEAVY)
    # each line in one write: the two ranks share the log
    (tmp_path / "probe.py").write_text(PROBE.replace('os.write(1, " ".join(',
                                                     'os.write(1, (os.getcwd() + "\\n").encode())\n    os.write(1, " ".join('))
    (tmp_path / "cwd").mkdir()
    (tmp_path / "caller.py").write_text(CALLER)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, str(tmp_path / "caller.py"), "thread" if thread else "-"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "caller line" and lines[1:4] == ["code 0", "code 0", "code 1"], proc.stdout
    assert lines[4].startswith("timeout probe on 2 ranks: not done within 2 s") and lines[5:] == ["no child left"]
    assert proc.stderr == ""  # what the imports and the ranks print is in the logs
    log = (tmp_path / "log").read_text().splitlines()
    rows = sorted(line.split(None, 7) for line in log if not line.startswith("/"))
    assert [r[:3] for r in rows] == [["0", "0", "2"], ["0", "0", "2"], ["1", "1", "2"], ["1", "1", "2"]], log
    assert sorted(r[7] for r in rows) == sorted(2 * [repr([f"--tag={tmp_path}", f"run{n}"]) for n in (1, 2)])
    assert {line for line in log if line.startswith("/")} == {str(tmp_path / "cwd")}
    assert "rank 1 exited with code 3; the other ranks were stopped" in (tmp_path / "fail.log").read_text()
    importers = {p.name for p in tmp_path.glob("imported-*")}
    caller_pid = [p.name.removeprefix("atexit-") for p in tmp_path.glob("atexit-*")]
    assert len(caller_pid) == 1  # the caller's exit handler ran once, in the caller
    if thread:  # each run's launcher imported it, and the caller never did
        assert len(importers) == 4 and f"imported-{caller_pid[0]}" not in importers
    else:
        assert importers == {f"imported-{caller_pid[0]}"} and {r[6] for r in rows} == {"True"}
        # Waiting for forked ranks blocks until one exits or the timeout: no polling while they run (a 20 ms poll
        # woke the caller ~100 times in those 2 s).
        assert int((tmp_path / "wakeups").read_text()) < 30


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
def test_exit_watch_returns_exited_children_without_reaping_them(monkeypatch, pidfd):
    """`ranks._ExitWatch`: the ranks that ended, waited for without a poll loop where Linux has pidfds; left for the
    caller to reap. `no-pidfd` removes os.pidfd_open, as on a kernel before 5.3 (not reproducible here for real)."""
    import subprocess as sp
    import time

    from mtf_train import ranks

    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open")
    quick, slow = (sp.Popen([sys.executable, "-c", f"import time; time.sleep({t})"]) for t in (0.3, 30))
    try:
        with ranks._ExitWatch([quick.pid, slow.pid]) as watch:
            assert bool(watch.fds) == pidfd
            t0 = time.monotonic()
            assert watch.ended(0.05) == [] and time.monotonic() - t0 < 1
            assert watch.ended(60) == [quick.pid]
            assert os.waitpid(quick.pid, 0)[0] == quick.pid  # not reaped by the watch
            quick.returncode = 0
            assert watch.ended(0.1) == []
    finally:
        slow.kill()
        slow.wait()


LINES = """
import os
from mtf_train.process import one_write_per_line
def main(argv):
    one_write_per_line()
    for i in range(3000):
        print(f"rank {os.environ['RANK']} line {i} " + "x" * 40)
    return 0
"""


def test_ranks_sharing_a_log_write_whole_lines(tmp_path):
    """The job script exports PYTHONUNBUFFERED, under which print() writes a line and its newline separately: ranks
    sharing one log break each other's lines (9396 of these 12000, measured without it). The trainer's entry makes each
    line one write, for stdout and stderr."""
    (tmp_path / "lines.py").write_text(LINES)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with open(tmp_path / "log", "w") as log:
        subprocess.run([sys.executable, "-m", "mtf_train.ranks", "--nproc_per_node", "4", "-m", "lines"],
                       env=env, stdout=log, stderr=subprocess.STDOUT, timeout=120, check=True)
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 12000 and all(re.fullmatch(r"rank \d line \d+ x{40}", x) for x in lines)
    code = ("import sys\nfrom mtf_train.train.__main__ import main\nmain(['--no-such-flag'])\n"
            "print(sys.stdout.line_buffering, sys.stdout.write_through, sys.stderr.line_buffering, "
            "sys.stderr.write_through)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert out.split() == ["True", "False", "True", "False"], out
