"""How processes start and end: `verify.run_ranks` (the verification runs' ranks, as torchrun starts them) and
`process.exit_now` (entry points end without the interpreter's teardown, losing nothing)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from mtf_train.ckpt.verify import run_ranks

pytestmark = pytest.mark.unit

RANK_ENV = ("import os; print(os.environ['RANK'], os.environ['LOCAL_RANK'], os.environ['WORLD_SIZE'], "
            "os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'], flush=True)")


def test_ranks_get_torchruns_environment(tmp_path):
    with open(tmp_path / "log", "w") as fh:
        assert run_ranks([sys.executable, "-c", RANK_ENV], 3, {}, fh, tmp_path) == 0
    rows = sorted(line.split() for line in (tmp_path / "log").read_text().splitlines())
    assert [r[:4] for r in rows] == [[str(i), str(i), "3", "127.0.0.1"] for i in range(3)]
    assert len({r[4] for r in rows}) == 1 and int(rows[0][4]) > 0  # one rendezvous port for all


def test_first_failing_rank_stops_the_others(tmp_path):
    """Rank 1 fails at once; rank 0 would wait for it forever (as a rank in a collective does)."""
    code = "import os, sys, time; r = int(os.environ['RANK']); time.sleep(600) if r == 0 else sys.exit(3)"
    start = time.monotonic()
    with open(tmp_path / "log", "w") as fh:
        assert run_ranks([sys.executable, "-c", code], 2, {}, fh, tmp_path) == 3
    assert time.monotonic() - start < 30
    with open(tmp_path / "log", "w") as fh, pytest.raises(subprocess.TimeoutExpired):
        run_ranks([sys.executable, "-c", "import time; time.sleep(600)"], 2, {}, fh, tmp_path, timeout=1)
    out = subprocess.run(["pgrep", "-f", "time.sleep\\(600\\)"], capture_output=True, text=True).stdout
    assert out == "", "a rank outlived run_ranks"


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
