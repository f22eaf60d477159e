"""CPU time of starting and ending the processes the trainer and the checkpoint tools start, as mtf-train does it
against the plain way, each a fresh process, alternated, on the same machine:

- end: import what every trainer rank imports (the trainer loop, torch._dynamo through the optimizer), then end
  the process as Python does (interpreter teardown) or with `mtf_train.process.exit_now`;
- ranks: a 2-rank gloo job whose ranks import what a trainer rank imports (init, barrier, destroy), started by
  `python -m torch.distributed.run --standalone` (each rank imports) or by `python -m mtf_train.ranks`, which
  imports once and forks the ranks on a CPU-only torch (the job script without SLURM);
- caller: a command that has imported torch (as `mtf-train ckpt reshape` has) runs two such jobs, 2 ranks then 1
  (a verification at the source's shape and at the new one): one `python -m mtf_train.ranks` subprocess per job,
  or `mtf_train.ranks.run`, whose ranks fork from the caller after it imported their modules once.

CPU time is user + system of the process tree (os.wait4's rusage of the children). Usage:
  .venv/bin/python benchmarks/process_exit.py [--repeats N]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

RANK_IMPORTS = "import sys, torch, torch._dynamo, mtf_train.train.loop\n"
END = {"teardown": RANK_IMPORTS + "sys.exit(0)\n",
       "exit_now": RANK_IMPORTS + "from mtf_train.process import exit_now; exit_now(0)\n"}
# The ranks' program: a module with PRELOAD and main(argv), as mtf_train.train and mtf_train.ckpt.worker are.
GLOO_RANK = """import importlib
PRELOAD = ("torch._dynamo", "mtf_train.train.loop")
def main(argv):
    for name in PRELOAD:
        importlib.import_module(name)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="env://"); dist.barrier(); dist.destroy_process_group()
    return 0
if __name__ == "__main__":
    from mtf_train.process import exit_now
    exit_now(main([]))
"""
LAUNCH = {"torchrun": "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-m', "
                      "'torch.distributed.run', '--standalone', '--nnodes', '1', '--nproc_per_node', '2', "
                      "'--max_restarts', '0', '-m', 'gloo_rank'], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))\n",
          "mtf_train.ranks": "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-m', 'mtf_train.ranks', "
                             "'--nproc_per_node', '2', '-m', 'gloo_rank'], stdout=subprocess.DEVNULL, "
                             "stderr=subprocess.STDOUT))\n"}

CALLER = {"subprocess": "import subprocess, sys, torch\nfrom mtf_train import ranks\nfor n in (2, 1):\n"
                        "    assert subprocess.call(ranks.command(n, 'gloo_rank'), stdout=subprocess.DEVNULL, "
                        "stderr=subprocess.STDOUT) == 0\n",
          "ranks.run": "import os, sys, torch\nfrom mtf_train import ranks\nfor n in (2, 1):\n"
                       "    assert ranks.run(n, 'gloo_rank', [], os.devnull) == 0\n"}


def cpu_of(code: str, path: str = "") -> tuple[float, float]:
    """(CPU seconds of the whole process tree, wall seconds); `path` goes on PYTHONPATH."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    env = dict(ENV, PYTHONPATH=os.pathsep.join(filter(None, (path, str(ROOT), ENV.get("PYTHONPATH")))))
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def compare(title: str, cases: dict[str, str], repeats: int, path: str = "") -> None:
    for code in cases.values():
        cpu_of(code, path)  # warm the page cache
    got = {name: [] for name in cases}
    for _ in range(repeats):
        for name, code in cases.items():
            got[name].append(cpu_of(code, path))
    med = {name: (statistics.median(c for c, _ in r), statistics.median(w for _, w in r)) for name, r in got.items()}
    for name, (c, w) in med.items():
        print(f"{title:6s} {name:15s}: median CPU {c:5.2f} s, wall {w:5.2f} s over {repeats}")
    (base, ours) = list(med)
    print(f"{title:6s} ratio {ours} / {base}: CPU {med[ours][0] / med[base][0]:.2f}, "
          f"wall {med[ours][1] / med[base][1]:.2f} (saves {med[base][0] - med[ours][0]:.2f} CPU s each)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"torch {metadata.version('torch')}, deepspeed {metadata.version('deepspeed')}, "
          f"megatron-core {metadata.version('megatron-core')}")
    compare("end", END, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "gloo_rank.py").write_text(GLOO_RANK)
        compare("ranks", LAUNCH, args.repeats, tmp)
        compare("caller", CALLER, args.repeats, tmp)


if __name__ == "__main__":
    main()
