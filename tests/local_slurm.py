"""A real multi-node SLURM cluster on this one Debian machine, for tests and CI (`scripts/local-slurm` runs this).

    scripts/local-slurm up [--nodes N] [--accounting] [--lease PID]
    scripts/local-slurm down
    scripts/local-slurm status          exit 0 when up, 3 when down or broken
    scripts/local-slurm release PID     drop a lease taken with `up --lease PID`; the last lease
                                        to go takes down a cluster that a lease brought up

Nodes n1..nN (default 2), each with 8 CPUs and 8 fake GPUs (character devices, like /dev/null), all in
partition `debug`; slurmctld and one slurmd per node on 127.0.0.1, munge for auth. Needs root. Installs
Debian's slurmctld slurmd slurm-client munge only when the binaries are missing (plus slurmdbd and
mariadb-server for --accounting).

Environment:
  MTF_SLURM_ROOT          state, spool, pid files, logs, fake devices (default /tmp/mtf-slurm)
  MTF_SLURM_UP_TIMEOUT    seconds to wait for every node to be idle (default 60)
  MTF_SLURM_LOCK_TIMEOUT  seconds to wait for another up/down to finish (default 600)

There is one cluster per machine (the clients read /etc/slurm/slurm.conf, ports are fixed), so up/down/release
serialise on a machine-wide lock, and `down` finds the root of the running cluster in the header of
/etc/slurm/slurm.conf. What the cluster is (nodes, partition, leases, ...) is kept in `state.json` under the root,
which tests/slurm_cluster.py reads. Processes are only ever stopped through their pid files (or, for a job step
left behind, through an open file under the root), never by name. Standard library only: it runs before any
virtualenv exists.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PROG = "local-slurm"
LOCK_FILE = Path("/tmp/mtf-local-slurm.lock")
CONF_DIR = Path("/etc/slurm")
HOSTS = Path("/etc/hosts")
TAG = "# mtf-local-slurm"       # marks our /etc/hosts line and the first line of our config files
MARKER = ".mtf-local-slurm"     # file in the root: only a folder holding it is ever removed
STATE = "state.json"            # what the cluster is, under the root
PARTITION = "debug"
CPUS = 8
GPUS = 8
BASE_PORT = 17000               # node i listens on BASE_PORT+i
DBD_PORT = 16819                # slurmdbd (accounting only)
DB_PORT = 16306                 # private MariaDB (accounting only)
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
ACCT_PACKAGES = ["slurmdbd", "mariadb-server"]
# The binaries a cluster needs; the test fixture reads these too.
BINARIES = ("slurmctld", "slurmd", "slurmstepd", "sinfo", "squeue", "sbatch", "srun", "scontrol", "scancel",
            "munged", "munge", "unmunge")
ACCT_BINARIES = ("slurmdbd", "mariadbd", "mariadb-install-db", "mariadb")
CONF_FILES = ("slurm.conf", "gres.conf", "cgroup.conf", "slurmdbd.conf")
REFUSED_ROOTS = {"", "/", "/tmp", "/root", "/home", "/etc", "/usr", "/var", "/run", "/opt", "/srv"}
SLURM_EXES = {"slurmctld", "slurmd", "slurmstepd", "slurmdbd", "mariadbd", "mysqld"}
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class Failed(Exception):
    """One line for the user; exit 1."""


def env() -> dict[str, str]:
    """The environment for SLURM's commands: sbin on PATH, the C locale."""
    e = dict(os.environ, LC_ALL="C")
    path = e.get("PATH", "/usr/bin:/bin").split(":")
    e["PATH"] = ":".join(path + [p for p in SBIN if p not in path])
    return e


ENV = env()


def say(text: str) -> None:
    print(f"{PROG}: {text}", flush=True)


def which(binary: str) -> str | None:
    return shutil.which(binary, path=ENV["PATH"])


def run(*args: str, timeout: float | None = None, **kw) -> subprocess.CompletedProcess | None:
    """A command with its output captured; None when it is missing or does not answer in time."""
    try:
        if "input" not in kw:
            kw["stdin"] = subprocess.DEVNULL
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=ENV, **kw)
    except (OSError, subprocess.TimeoutExpired):
        return None


def output(*args: str, timeout: float = 10) -> str:
    """A command's stdout; "" when it fails, is missing or does not answer in time."""
    proc = run(*args, timeout=timeout)
    return proc.stdout if proc is not None and proc.returncode == 0 else ""


def ok(*args: str, timeout: float = 10) -> bool:
    proc = run(*args, timeout=timeout)
    return proc is not None and proc.returncode == 0


def start(name: str, root: Path, *args: str) -> None:
    """Start a daemon that forks into the background; its start-up output goes to log/start-NAME.log."""
    log = root / "log" / f"start-{name}.log"
    with open(log, "ab") as out:
        code = subprocess.run(list(args), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              env=ENV).returncode
    if code != 0:
        log_tails(root)
        raise Failed(f"{name} failed to start")


def wait_for(test, seconds: float, poll: float = 0.1) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if test():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


# ------------------------------------------------------------------------------------------------- where

def abs_root(text: str) -> Path:
    if not text.startswith("/"):
        raise Failed(f"MTF_SLURM_ROOT must be an absolute path, got '{text}'")
    r = text.rstrip("/")
    if r in REFUSED_ROOTS:
        raise Failed(f"refusing MTF_SLURM_ROOT='{text}'")
    return Path(r)


def env_root() -> Path:
    return abs_root(os.environ.get("MTF_SLURM_ROOT", "/tmp/mtf-slurm"))


def conf_header() -> dict[str, str] | None:
    """The `key=value` fields of our slurm.conf's first line (root, nodes, accounting); None if it is not ours."""
    try:
        first = (CONF_DIR / "slurm.conf").read_text().split("\n", 1)[0]
    except OSError:
        return None
    if not first.startswith(TAG + " "):
        return None
    return dict(t.split("=", 1) for t in first.split() if "=" in t)


def conf_root() -> Path | None:
    h = conf_header()
    return Path(h["root"]) if h and h.get("root") else None


def read_state(root: Path | None = None) -> dict | None:
    """The running cluster's state.json (root: from /etc/slurm/slurm.conf); None when there is none."""
    root = root or conf_root()
    if root is None:
        return None
    try:
        return json.loads((root / STATE).read_text())
    except (OSError, ValueError):
        return None


def new_state(root: Path, n: int, accounting: bool, lease_managed: bool = False, leases=()) -> dict:
    return {"root": str(root), "nodes": [f"n{i}" for i in range(1, n + 1)], "partition": PARTITION,
            "cpus_per_node": CPUS, "gpus_per_node": GPUS, "accounting": accounting, "lease_managed": lease_managed,
            "leases": sorted(set(leases)), "slurmctld": "127.0.0.1", "dbd_port": DBD_PORT if accounting else None,
            "db_port": DB_PORT if accounting else None, "logs": str(root / "log")}


def write_state(state: dict) -> None:
    root = Path(state["root"])
    tmp = root / f".{STATE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, root / STATE)


def take_lock():
    """The machine-wide lock every up/down/release holds."""
    timeout = float(os.environ.get("MTF_SLURM_LOCK_TIMEOUT", "600"))
    fh = open(LOCK_FILE, "w")  # not inherited by the daemons we start (close-on-exec)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise Failed(f"another {PROG} up/down held {LOCK_FILE} for over {timeout:g}s") from None
            time.sleep(0.2)


# --------------------------------------------------------------------------------------------- processes

def exe_name(pid: int) -> str | None:
    """The binary a process runs: Debian's slurmd is an alternative for /usr/sbin/slurmd-wlm."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return os.path.basename(exe.removesuffix(" (deleted)")).removesuffix("-wlm")


def live_pid(pidfile: Path, exe: str) -> int | None:
    """The pid in a pid file, only if that process is alive and runs the expected binary."""
    try:
        digits = re.sub(r"\D", "", pidfile.read_text())
    except OSError:
        return None
    if not digits or not Path(f"/proc/{digits}").is_dir() or exe_name(int(digits)) != exe:
        return None
    return int(digits)


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"^State:\s*Z", status, re.M)


def stop_pids(wait_s: float, pids: list[int]) -> None:
    """SIGTERM, wait up to `wait_s` for all of them, then SIGKILL what is left."""
    pids = [p for p in pids if p]
    if not pids:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in [p for p in pids if alive(p)]:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        if wait_for(lambda: not any(alive(p) for p in pids), wait_s if sig == signal.SIGTERM else 2):
            return
        if sig == signal.SIGTERM:
            say(f"still alive after {wait_s:g}s, sending SIGKILL: {' '.join(str(p) for p in pids if alive(p))}")


def leftover_pids(root: Path) -> list[int]:
    """Slurm processes (by binary) that hold a file open under the root: what pid files may have missed."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid() or exe_name(int(d.name)) not in SLURM_EXES:
            continue
        try:
            fds = list((d / "fd").iterdir())
        except OSError:
            continue
        if any(_link(fd).startswith(f"{root}/") for fd in fds):
            out.append(int(d.name))
    return out


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


def munge_ok() -> bool:
    cred = output("munge", "-n")
    proc = run("unmunge", timeout=10, input=cred) if cred else None
    return proc is not None and proc.returncode == 0


def log_tails(root: Path) -> None:
    for f in sorted((root / "log").glob("*.log")):
        lines = f.read_text(errors="replace").splitlines()[-25:]
        print(f"----- tail of {f}", *lines, sep="\n", file=sys.stderr)


def node_range(n: int) -> str:
    return "n1" if n == 1 else f"n[1-{n}]"


# -------------------------------------------------------------------------------------------- packages

def missing_binaries(accounting: bool) -> list[str]:
    return [b for b in BINARIES + (ACCT_BINARIES if accounting else ()) if which(b) is None]


def install_packages(accounting: bool) -> None:
    missing = missing_binaries(accounting)
    if not missing:
        return
    pkgs = PACKAGES + (ACCT_PACKAGES if accounting else [])
    if which("apt-get") is None:
        raise Failed(f"missing {' '.join(missing)} and apt-get is not available: install {' '.join(pkgs)} first")
    say(f"missing {' '.join(missing)}: installing {' '.join(pkgs)} (apt-get)")
    # Packages must not start their services: there is no init here, and we start the daemons ourselves.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    apt_env = dict(ENV, DEBIAN_FRONTEND="noninteractive")
    try:
        code = subprocess.run(["apt-get", "update", "-q"], env=apt_env, stdin=subprocess.DEVNULL).returncode
        if code == 0:
            code = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs], env=apt_env,
                                  stdin=subprocess.DEVNULL).returncode
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    if code != 0:
        raise Failed(f"apt-get failed (exit {code}) installing {' '.join(pkgs)}")
    missing = missing_binaries(accounting)
    if missing:
        raise Failed(f"still missing after apt-get install: {' '.join(missing)}")


# ---------------------------------------------------------------------------------------------- munge

def start_munge(root: Path) -> None:
    if munge_ok():
        return
    if not ok("id", "munge"):
        raise Failed("no 'munge' user: is the munge package installed?")
    key = Path("/etc/munge/munge.key")
    if not key.is_file() or key.stat().st_size == 0:
        say(f"creating {key}")
        key.parent.mkdir(parents=True, exist_ok=True)
        if which("mungekey"):
            if not ok("mungekey", "--create", f"--keyfile={key}", "--force"):
                raise Failed(f"mungekey could not create {key}")
        else:
            key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    Path("/run/munge").chmod(0o755)
    # As root munged refuses a key owned by munge ("Keyfile is insecure"), so run it as munge.
    if subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], env=ENV,
                      stdin=subprocess.DEVNULL).returncode != 0:
        raise Failed("munged failed to start (see /var/log/munge/munged.log)")
    if not wait_for(munge_ok, 5):
        try:
            print(*Path("/var/log/munge/munged.log").read_text().splitlines()[-20:], sep="\n", file=sys.stderr)
        except OSError:
            pass
        raise Failed("munged started but 'munge -n | unmunge' still fails after 5s")
    try:
        shutil.copy("/run/munge/munged.pid", root / "run" / "munged.pid")
    except OSError:
        pass
    (root / "run" / "munged.ours").touch()


# -------------------------------------------------------------------------------------------- configs

def hosts_remove() -> None:
    try:
        lines = HOSTS.read_text().splitlines()
    except OSError:
        return
    if not any(TAG in ln for ln in lines):
        return
    # Rewrite in place: /etc/hosts is often a bind mount that cannot be replaced by rename.
    HOSTS.write_text("".join(ln + "\n" for ln in lines if TAG not in ln))


def hosts_add(n: int) -> None:
    hosts_remove()
    with open(HOSTS, "a") as fh:
        fh.write("127.0.0.1 " + "".join(f"n{i} " for i in range(1, n + 1)) + TAG + "\n")


def ours(path: Path) -> bool:
    try:
        with open(path) as fh:
            return TAG in fh.readline()
    except OSError:
        return False


def backup_foreign_confs() -> None:
    """Keep a config file that is not ours as *.mtf-orig; `down` puts it back."""
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    for f in CONF_FILES:
        p, orig = CONF_DIR / f, CONF_DIR / f"{f}.mtf-orig"
        if p.is_file() and not ours(p) and not orig.exists():
            say(f"keeping the existing {p} as {orig.name}")
            p.rename(orig)


def remove_our_confs() -> None:
    for f in CONF_FILES:
        p, orig = CONF_DIR / f, CONF_DIR / f"{f}.mtf-orig"
        if p.is_file() and ours(p):
            p.unlink()
        if orig.is_file() and not p.exists():
            orig.rename(p)


def write_confs(root: Path, n: int, accounting: bool) -> None:
    for d in ("state", "run", "log", "dev", *(f"spool/n{i}" for i in range(1, n + 1))):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(GPUS):
        dev = root / "dev" / f"gpu{i}"
        if not dev.is_char_device():
            try:
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
            except OSError:
                raise Failed(f"mknod {dev} failed: fake GPUs need character devices (is {root} on a nodev "
                             f"mount?)") from None
    ports = str(BASE_PORT + 1) if n == 1 else f"[{BASE_PORT + 1}-{BASE_PORT + n}]"
    backup_foreign_confs()
    acct = int(accounting)
    # The header: `down` finds the running cluster's root here.
    conf = f"""{TAG} root={root} nodes={n} accounting={acct} (written by scripts/local-slurm; removed by 'down')
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
NodeName={node_range(n)} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports} CPUs={CPUS} Boards=1 SocketsPerBoard=1 CoresPerSocket={CPUS} ThreadsPerCore=1 RealMemory=16000 Gres=gpu:{GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    if accounting:
        conf += f"""AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={DBD_PORT}
"""
        dbd = CONF_DIR / "slurmdbd.conf"
        dbd.write_text(f"""{TAG} root={root}
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={DBD_PORT}
SlurmUser=root
PidFile={root}/run/slurmdbd.pid
LogFile={root}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={DB_PORT}
StorageUser=root
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)
    (CONF_DIR / "slurm.conf").write_text(conf)
    (CONF_DIR / "gres.conf").write_text(f"{TAG} root={root}\nAutoDetect=off\nName=gpu File={root}/dev/gpu[0-{GPUS - 1}]\n")
    # v1 initialises lazily and needs no cgroup filesystem; v2 fails on hybrid hosts.
    (CONF_DIR / "cgroup.conf").write_text(f"{TAG} root={root}\nCgroupPlugin=cgroup/v1\n")
    hosts_add(n)


# ------------------------------------------------------------------------------------------ accounting

def start_accounting(root: Path) -> None:
    """A private MariaDB, run as root (a throwaway test database) on loopback only, then slurmdbd."""
    data = root / "db" / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(root / "log" / "mariadb-install.log", "wb") as out:
        code = subprocess.run(["mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={data}",
                               "--auth-root-authentication-method=normal", "--skip-test-db"], stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV).returncode
    if code != 0:
        print(*(root / "log" / "mariadb-install.log").read_text().splitlines()[-20:], sep="\n", file=sys.stderr)
        raise Failed("mariadb-install-db failed")
    subprocess.Popen(["mariadbd", "--no-defaults", "--user=root", f"--datadir={data}", "--bind-address=127.0.0.1",
                      f"--port={DB_PORT}", f"--socket={root}/db/mysqld.sock", f"--pid-file={root}/run/mariadbd.pid",
                      f"--log-error={root}/log/mariadb.log", "--innodb-buffer-pool-size=32M",
                      "--innodb-log-file-size=8M"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, env=ENV)
    if not wait_for(lambda: ok("mariadb", "--no-defaults", "-uroot", "-h127.0.0.1", f"-P{DB_PORT}", "-e",
                               "select 1"), 30):
        log_tails(root)
        raise Failed(f"MariaDB did not answer on 127.0.0.1:{DB_PORT} within 30s")
    start("slurmdbd", root, "slurmdbd")
    if not wait_for(lambda: ok("sacctmgr", "-i", "show", "cluster", timeout=5), 30):
        log_tails(root)
        raise Failed("slurmdbd did not answer within 30s")
    run("sacctmgr", "-i", "add", "cluster", "local", timeout=10)


# ------------------------------------------------------------------------------------------ up / down

def daemon_pids(root: Path, n: int, accounting: bool) -> tuple[list[tuple[str, int]], bool]:
    """(name, pid) of the cluster's live daemons, and whether every one of them is alive."""
    files = [("slurmctld", root / "run" / "slurmctld.pid")]
    files += [("slurmd", root / "run" / f"slurmd-n{i}.pid") for i in range(1, n + 1)]
    if accounting:
        files += [("slurmdbd", root / "run" / "slurmdbd.pid"), ("mariadbd", root / "run" / "mariadbd.pid")]
    found = [(name, live_pid(f, name)) for name, f in files]
    return [(name, pid) for name, pid in found if pid], all(pid for _, pid in found)


def node_states() -> list[tuple[str, str]]:
    """(node, state) of each node of the partition, from sinfo ([] when it does not answer)."""
    text = output("sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t")
    return sorted({tuple(ln.split()[:2]) for ln in text.splitlines() if len(ln.split()) >= 2})


def healthy() -> dict | None:
    """The running cluster's state when it is fully up and every node usable, else None."""
    state = read_state()
    if state is None:
        return None
    root, n = Path(state["root"]), len(state["nodes"])
    _, all_alive = daemon_pids(root, n, state["accounting"])
    if not all_alive or not munge_ok():
        return None
    if sum(s in ("idle", "mix", "alloc", "comp") for _, s in node_states()) != n:
        return None
    return state


def print_summary(state: dict) -> None:
    n, root = len(state["nodes"]), state["root"]
    say(f"up: {n} node(s) {node_range(n)} in partition '{PARTITION}', {CPUS} CPUs and {GPUS} fake GPUs each")
    say(f"root: {root}")
    say(f"logs: {root}/log/ (slurmctld.log, slurmd-nX.log), munged: /var/log/munge/munged.log")


def leftovers(root: Path) -> bool:
    """Anything of a cluster that is not (fully) up: our slurm.conf, a marked root, our /etc/hosts line."""
    try:
        in_hosts = TAG in HOSTS.read_text()
    except OSError:
        in_hosts = False
    return conf_root() is not None or (root / MARKER).exists() or in_hosts


def cmd_up(nodes: int | None, accounting: bool, lease: int | None) -> None:
    n = nodes or 2
    if not 1 <= n <= 64:
        raise Failed(f"--nodes must be 1..64, got '{n}'")
    if os.geteuid() != 0:
        raise Failed("must run as root (it installs packages, writes /etc/slurm and /etc/hosts)")
    root = env_root()
    _lock = take_lock()

    state = healthy()
    if state is not None:
        cur_root = Path(state["root"])
        if nodes is not None and len(state["nodes"]) != n:
            raise Failed(f"already up with {len(state['nodes'])} node(s), not {n}: run '{sys.argv[0]} down' first")
        if accounting and not state["accounting"]:
            raise Failed(f"already up without accounting: run '{sys.argv[0]} down' first")
        if cur_root != root:
            say(f"note: the running cluster's root is {cur_root} (not {root})")
        if lease is not None:
            state["leases"] = sorted(set(state["leases"]) | {lease})
        write_state(state)
        say("already up")
        print_summary(state)
        return

    t0 = time.monotonic()
    # Anything half up (a crash, a killed run, another root): take it down first.
    if leftovers(root):
        say("found a stale or broken cluster: taking it down first")
        do_down()
    if root.exists() and not (root / MARKER).exists() and any(root.iterdir()):
        raise Failed(f"{root} exists, is not empty and is not ours (no {MARKER}): set MTF_SLURM_ROOT elsewhere")

    install_packages(accounting)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()
    for d in ("state", "run", "log", "dev"):
        (root / d).mkdir(exist_ok=True)
    try:
        start_munge(root)
        write_confs(root, n, accounting)
        if accounting:
            start_accounting(root)
        start("slurmctld", root, "slurmctld")
        if not wait_for(lambda: "is UP" in output("scontrol", "ping", timeout=5), 10):
            log_tails(root)
            raise Failed("slurmctld does not answer 'scontrol ping' after 10s")
        for i in range(1, n + 1):
            start(f"slurmd-n{i}", root, "slurmd", "-N", f"n{i}")
        timeout = float(os.environ.get("MTF_SLURM_UP_TIMEOUT", "60"))
        idle = lambda: sum(s == "idle" for _, s in node_states())  # noqa: E731
        if not wait_for(lambda: idle() == n, timeout):
            print("sinfo:", *(" ".join(x) for x in node_states()), sep="\n", file=sys.stderr)
            log_tails(root)
            raise Failed(f"only {idle()} of {n} node(s) idle after {timeout:g}s (MTF_SLURM_UP_TIMEOUT)")
        if accounting:  # give slurmctld a moment to register with slurmdbd so the first job is recorded
            wait_for(lambda: ok("sacct", "-n", "-X", timeout=5), 5)
    except BaseException as err:
        # A half-started cluster is taken down again; its logs are kept beside the root.
        keep = Path(f"{root}-failed-logs")
        shutil.rmtree(keep, ignore_errors=True)
        try:
            shutil.copytree(root / "log", keep)
        except OSError:
            pass
        if isinstance(err, Failed):
            print(f"{PROG}: error: {err}", file=sys.stderr)
        try:
            do_down()
        finally:
            print(f"{PROG}: took the half-started cluster down again; its logs are kept in {keep}", file=sys.stderr)
        if isinstance(err, Failed):
            raise SystemExit(1) from None
        raise
    state = new_state(root, n, accounting, lease_managed=lease is not None,
                      leases=[lease] if lease is not None else [])
    write_state(state)
    shutil.rmtree(f"{root}-failed-logs", ignore_errors=True)
    say(f"started in {time.monotonic() - t0:.1f}s")
    print_summary(state)


def do_down() -> None:
    """Take the cluster down (the caller holds the lock): jobs, daemons, leftovers, munged if ours, files."""
    root = conf_root() or env_root()
    run_dir = root / "run"
    # 1. cancel every job, wait (bounded) until they are gone, so no job step outlives its slurmd.
    if live_pid(run_dir / "slurmctld.pid", "slurmctld"):
        jobs = sorted(set(output("squeue", "-h", "-o", "%A").split()))
        if jobs:
            say(f"cancelling jobs: {' '.join(jobs)}")
            run("scancel", *jobs, timeout=10)
            wait_for(lambda: not output("squeue", "-h", "-o", "%A", timeout=5).split(), 15)
    # 2. slurmd, then slurmctld, then slurmdbd and MariaDB: SIGTERM by pid file, SIGKILL as a last resort.
    stop_pids(10, [live_pid(f, "slurmd") for f in sorted(run_dir.glob("slurmd-*.pid"))])
    stop_pids(10, [live_pid(run_dir / "slurmctld.pid", "slurmctld")])
    stop_pids(10, [live_pid(run_dir / "slurmdbd.pid", "slurmdbd")])
    stop_pids(20, [live_pid(run_dir / "mariadbd.pid", "mariadbd")])
    # 3. job steps (or daemons whose pid file is gone) still holding files under the root.
    if root.is_dir():
        pids = leftover_pids(root)
        if pids:
            say(f"stopping leftover slurm processes holding files in {root}: {' '.join(map(str, pids))}")
        stop_pids(5, pids)
    # 4. munged, only if we started it.
    if (run_dir / "munged.ours").exists():
        stop_pids(5, [live_pid(Path("/run/munge/munged.pid"), "munged")])
    # 5. files.
    hosts_remove()
    remove_our_confs()
    if root.is_dir():
        if (root / MARKER).exists():
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"not removing {root}: it has no {MARKER}")


def cmd_down() -> None:
    if os.geteuid() != 0:
        raise Failed("must run as root")
    _lock = take_lock()
    if not leftovers(env_root()):
        say("already down")
        return
    t0 = time.monotonic()
    do_down()
    say(f"down ({time.monotonic() - t0:.1f}s)")


def cmd_release(pid: int) -> None:
    if os.geteuid() != 0:
        raise Failed("must run as root")
    _lock = take_lock()
    state = read_state()
    if state is None:
        say("already down")
        return
    left = [p for p in state["leases"] if p != pid and Path(f"/proc/{p}").is_dir()]
    state["leases"] = left
    write_state(state)
    if left:
        say(f"still in use by pid(s) {' '.join(map(str, left))}: leaving it up")
    elif state["lease_managed"]:
        say("last lease released: taking it down")
        do_down()
        say("down")
    else:
        say("no leases left, but it was not brought up by a lease: leaving it up")


def cmd_status() -> int:
    state = read_state()
    if state is None:
        say("down (leftovers present: run 'scripts/local-slurm down')" if leftovers(env_root()) else "down")
        return 3
    if healthy() is not None:
        print_summary(state)
        if state["accounting"]:
            say(f"accounting: slurmdbd on 127.0.0.1:{DBD_PORT}, MariaDB on 127.0.0.1:{DB_PORT}")
        if state["leases"]:
            say(f"leases (pids): {' '.join(map(str, state['leases']))}")
        for args in (["sinfo", "-N", "-o", "%N %P %t %c %G"], ["squeue"]):
            proc = run(*args, timeout=10)
            if proc is not None:
                print(proc.stdout, end="")
        return 0
    root = Path(state["root"])
    say(f"broken: configured ({len(state['nodes'])} nodes, root {root}) but not every daemon/node is up")
    for name, pid in daemon_pids(root, len(state["nodes"]), state["accounting"])[0]:
        say(f"  running: {name} {pid}")
    proc = run("sinfo", "-N", timeout=10)
    if proc is not None:
        print(proc.stdout + proc.stderr, end="")
    say(f"logs: {root}/log/")
    return 3


def parse_up(args: list[str]) -> tuple[int | None, bool, int | None]:
    nodes, accounting, lease = None, False, None
    it = iter(args)
    for a in it:
        key, eq, value = a.partition("=")
        if key in ("--nodes", "--lease") and not eq:
            value = next(it, None)
            if value is None:
                raise Failed(f"{key} needs a {'number' if key == '--nodes' else 'pid'}")
        if key == "--nodes":
            if not value.isdigit():
                raise Failed(f"--nodes must be 1..64, got '{value}'")
            nodes = int(value)
        elif key == "--lease":
            if not value.isdigit():
                raise Failed(f"--lease must be a pid, got '{value}'")
            lease = int(value)
        elif a == "--accounting":
            accounting = True
        else:
            raise Failed(f"unknown option for up: {a}")
    return nodes, accounting, lease


def main(argv: list[str]) -> int:
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if cmd == "up":
            if "-h" in args or "--help" in args:
                print(__doc__)
                return 0
            cmd_up(*parse_up(args))
        elif cmd == "down":
            if args:
                raise Failed("down takes no options")
            cmd_down()
        elif cmd == "status":
            return cmd_status()
        elif cmd == "release":
            if len(args) != 1 or not args[0].isdigit():
                raise Failed(f"usage: {PROG} release PID")
            cmd_release(int(args[0]))
        elif cmd in ("-h", "--help", "help"):
            print(__doc__)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Failed as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
