"""`python -m mtf_train.ranks --nproc_per_node N -m MODULE ARGS...`: one machine's ranks of a torch.distributed
program, as `torchrun --standalone` starts them, for less. The job script uses it for the built-in trainer when
it runs without SLURM (the local default); the checkpoint tools use it for their verification runs.

Every rank gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, NODE_RANK,
MASTER_ADDR=127.0.0.1 and one free MASTER_PORT; OMP_NUM_THREADS=1 unless set) and runs `MODULE.main(ARGS)`.

How the ranks start:
- fork, where torch is a CPU build (the local default, the tests): this process imports the modules MODULE lists
  in `PRELOAD` (torch, DeepSpeed, megatron-core: 4-5 s of CPU for each process that imports them) once, then
  forks the ranks, which share those pages. That is safe because nothing has run yet: no op, no process group,
  no device, and no thread besides this one (checked; with another thread the ranks are spawned instead).
- spawn, where torch is built with CUDA or ROCm: DeepSpeed's import asks the accelerator about its devices, and a
  forked child cannot use a driver its parent initialised; every rank is a fresh `python -m MODULE ARGS`.

Supervision as torchrun's: SIGTERM, SIGINT and SIGHUP to this process go to every rank (a signal ignored here, as
SIGINT under `mtf-train`'s local runs, stays ignored by the ranks); the first rank to fail stops the others with
SIGKILL (its peers are gone, so there is nothing left to save: the last complete checkpoint stays) and the exit
code is 1, as torchrun's, whatever the rank's (which the last line on stderr names), so the job script and
`mtf-train` see the same failure under either launcher. A rank dies with this process (Linux's parent-death signal),
so killing the launcher never leaves ranks behind.

`run(world, module, args, log=...)` does the same for a caller in this process (the checkpoint tools' verification
runs): with a CPU build of torch and no thread besides the caller's, the ranks fork from the caller, which imports
PRELOAD once for all its runs; otherwise it runs `python -m mtf_train.ranks` as a subprocess.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import importlib.util
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from mtf_train.process import exit_now

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PROG = "mtf_train.ranks"


def command(world: int, module: str, *args: str) -> list[str]:
    """The command line that runs `module`'s main(args) on `world` ranks of this machine."""
    return [sys.executable, "-m", PROG, "--nproc_per_node", str(world), "-m", module, *args]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun --standalone sets for local rank `rank` of `world` on one node."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "GROUP_RANK": "0", "NODE_RANK": "0", "ROLE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def free_port() -> int:
    with socket.socket() as s:  # rank 0's TCPStore binds it next
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_has_gpu_build() -> bool:
    """Whether the installed torch has CUDA or ROCm libraries, found without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return any(lib.glob("libtorch_cuda*.so*")) or any(lib.glob("libtorch_hip*.so*"))


def _die_with_parent(launcher: int) -> None:
    """Linux: SIGKILL this process when the launcher dies (prctl PR_SET_PDEATHSIG), or now if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != launcher:
        os._exit(128 + signal.SIGKILL)


def _has_process_group() -> bool:
    """Whether this process joined a torch.distributed group (its ranks must not inherit that)."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


class Ranks:
    """The started ranks (pids) and their supervision."""

    def __init__(self, module: str, args: list[str], world: int, output: int | None = None,
                 cwd: str | None = None, env: dict[str, str] | None = None, caller: bool = False):
        self.module, self.args, self.world = module, args, world
        self.output, self.cwd, self.env = output, cwd, env or {}  # a rank's stdout and stderr, folder, environment
        self.caller = caller  # forked from a caller (`run`), not from this module's own launcher process
        self.pids: dict[int, int] = {}  # pid -> rank

    def importable(self):
        """The program's module with its PRELOAD imported here, when the ranks can fork from this process
        (a CPU build of torch, no thread besides this one before and after the imports); else None."""
        if torch_has_gpu_build() or _threads() > 1 or _has_process_group():
            return None
        mod = importlib.import_module(_main_module(self.module))
        if not callable(getattr(mod, "main", None)):
            print(f"python -m {PROG}: error: {self.module} has no main(argv) to run", file=sys.stderr)
            raise SystemExit(2)
        for name in getattr(mod, "PRELOAD", ()):
            importlib.import_module(name)
        threads = _threads()
        if threads > 1:
            print(f"{PROG}: {threads} threads after importing {self.module}: starting fresh processes",
                  file=sys.stderr, flush=True)
            return None
        return mod

    def start(self, mod) -> None:
        """Fork the ranks: each runs `mod.main(args)`, or `python -m MODULE ARGS` when `mod` is None."""
        port = free_port()
        launcher = os.getpid()
        for stream in (sys.stdout, sys.stderr):  # else a child writes what this process had buffered, again
            stream.flush()
        for rank in range(self.world):
            env = {**self.env, **rank_env(rank, self.world, port)}
            pid = os.fork()
            if pid == 0:
                self._child(mod, launcher, env)
            self.pids[pid] = rank

    def _child(self, mod, launcher: int, env: dict[str, str]) -> None:
        """A rank: `mod.main(args)` here (forked), or a fresh `python -m MODULE ARGS` (spawned). Never returns."""
        code = 1
        try:
            for sig in FORWARDED:  # the launcher's handlers are not the rank's; an ignored signal stays ignored
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
            _die_with_parent(launcher)
            if self.caller:
                atexit._clear()  # the caller's exit handlers (its temporary folders) are not the rank's
            if self.output is not None:
                os.dup2(self.output, 1)
                os.dup2(self.output, 2)
            if self.cwd:
                os.chdir(self.cwd)
            if mod is None:
                os.execve(sys.executable, [sys.executable, "-m", self.module, *self.args], {**os.environ, **env})
            os.environ.update(env)
            if "torch" in sys.modules:  # imported before OMP_NUM_THREADS was the rank's (a caller's torch)
                sys.modules["torch"].set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
            sys.argv = [mod.__file__, *self.args]
            code = mod.main(self.args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            exit_now(code)

    def forward(self, signum, _frame) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int:
        """Until every rank ended (0), or the first failed (1; the others are killed then). Only the ranks are
        reaped (a caller's other children are its own business); past `timeout` seconds every rank is killed and
        TimeoutError raised, as on any exception here (Ctrl-C in a caller)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        live = dict(self.pids)
        try:
            with _ExitWatch(live) as watch:
                while live:
                    for pid in watch.ended(None if deadline is None else max(0.0, deadline - time.monotonic())):
                        _, status = os.waitpid(pid, 0)
                        del live[pid]
                        code = os.waitstatus_to_exitcode(status)
                        code = 128 - code if code < 0 else code
                        if code != 0:
                            self._kill(live)
                            live = {}
                            sys.stderr.flush()
                            os.write(2 if self.output is None else self.output,
                                     f"{PROG}: rank {self.pids[pid]} exited with code {code}; the other ranks were "
                                     f"stopped\n".encode())
                            return 1
                    if live and deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"{self.module} on {self.world} ranks: not done within {timeout:.0f} s")
            return 0
        finally:
            self._kill(live)

    @staticmethod
    def _kill(live) -> None:
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in live:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


class _ExitWatch:
    """Waits for some of this process's children to exit without reaping any (the caller reaps what `ended`
    returns) and without waking while they run: a pidfd per child, polled; where pidfds are missing (not Linux
    5.3+), `waitid(WNOWAIT)` every 20 ms."""

    def __init__(self, pids):
        self.fds: dict[int, int] = {}
        self.pending: list[int] = []
        self.poller = select.poll()
        try:
            for pid in pids:
                fd = os.pidfd_open(pid)
                self.fds[fd] = pid
                self.poller.register(fd, select.POLLIN)
        except (AttributeError, OSError):
            self.close()
            self.pending = list(pids)

    def ended(self, timeout: float | None) -> list[int]:
        """The children that have exited, waiting up to `timeout` seconds (None: until one does)."""
        if self.fds:
            events = self.poller.poll(None if timeout is None else timeout * 1000)
            pids = [self.fds.pop(fd) for fd, _ in events]
            for fd, _ in events:
                self.poller.unregister(fd)
                os.close(fd)
            return pids
        if not self.pending:
            return []
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            pids = [p for p in self.pending if os.waitid(os.P_PID, p, os.WEXITED | os.WNOHANG | os.WNOWAIT)]
            if pids or (end is not None and time.monotonic() >= end):
                self.pending = [p for p in self.pending if p not in pids]
                return pids
            time.sleep(0.02)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def _output_to(fd: int):
    """This process's stdout and stderr (the descriptors, so C-level writes too) go to `fd` for a while."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for x in saved:
            os.close(x)


def run(world: int, module: str, args: list[str], log, cwd=None, env: dict[str, str] | None = None,
        timeout: float | None = None) -> int:
    """`module`'s main(args) on `world` ranks of this machine for a caller in this process; every rank's output
    goes to the file `log`. The exit code as the launcher's (0, or 1 when a rank failed); TimeoutError past
    `timeout` (the ranks are killed). See the module docstring for when the ranks fork from here."""
    import subprocess

    with open(log, "ab") as fh:
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        ranks = Ranks(module, list(args), world, output=fh.fileno(), cwd=None if cwd is None else str(cwd), env=env,
                      caller=True)
        with _output_to(fh.fileno()):  # what the imports print (library warnings) is the ranks' log's, not the caller's
            mod = ranks.importable()
        if mod is None:
            try:
                return subprocess.run(command(world, module, *args), stdout=fh, stderr=subprocess.STDOUT, cwd=cwd,
                                      env={**os.environ, **env}, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{module} on {world} ranks: not done within {timeout:.0f} s") from None
        ranks.start(mod)
        return ranks.wait(timeout)


def _main_module(module: str) -> str:
    """The module `python -m MODULE` runs: a package's __main__."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        module += ".__main__"
        spec = importlib.util.find_spec(module)
    if spec is None:
        print(f"python -m {PROG}: error: no module named {module}", file=sys.stderr)
        raise SystemExit(2)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", usage=f"python -m {PROG} --nproc_per_node N -m MODULE ARGS...",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc_per_node", "--nproc-per-node", type=int, required=True, help="ranks to start")
    # Everything after `-m MODULE` is the program's (its options are not this parser's business).
    cut = argv.index("-m") if "-m" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    if cut + 1 >= len(argv):
        p.error("-m MODULE is required (a module with a main(argv))")
    if a.nproc_per_node < 1:
        p.error("--nproc_per_node must be at least 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several ranks on one machine
    ranks = Ranks(argv[cut + 1], argv[cut + 2:], a.nproc_per_node)
    for sig in FORWARDED:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, ranks.forward)
    ranks.start(ranks.importable())
    return ranks.wait()


if __name__ == "__main__":
    exit_now(main())
