"""Finding a DeepSpeed pipeline checkpoint and its files, and output folders that are complete or absent.

    <root>/latest                                     "global_stepN"
    <root>/global_stepN/layer_XX-model_YY-model_states.pt      layer XX, tensor rank YY
    <root>/global_stepN/mp_rank_MM_model_states.pt             MM = pp_stage * tp + tp_rank: client state
    <root>/global_stepN/[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt   D = data-parallel rank
    <root>/global_stepN_universal/zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, <root>/latest_universal

The files themselves are read and written lazily by `torchzip`. `Checkpoint.check` verifies a step before a
tool trusts it: every layer file the model's depth requires (and no other), every file's records against their
CRC-32s.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mtf_train.ckpt.errors import CkptError, VerifyError  # noqa: F401 (also imported from here)

LAYER_RE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
LAYER_NO_MODEL_RE = re.compile(r"^layer_(\d+)-model_states\.pt$")
MP_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
STEP_RE = re.compile(r"^global_step(\d+)$")


# --- finding a checkpoint -----------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """One saved step: its folder, files and the parallel degrees the file names give."""

    root: Path                      # the folder holding `latest` (or the step folder's parent)
    path: Path                      # .../global_stepN
    tag: str
    layer_files: dict[tuple[int, int], Path] = field(default_factory=dict)   # (layer, tp rank)
    mp_files: dict[int, Path] = field(default_factory=dict)                  # mp rank
    optim_files: dict[tuple[int, int], Path] = field(default_factory=dict)   # (dp rank, mp rank)
    bf16_optim: bool = False
    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def iteration(self) -> int | None:
        m = STEP_RE.match(self.tag)
        return int(m.group(1)) if m else None

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.layer_files})

    def mp_rank(self, pp_stage: int, tp_rank: int) -> int:
        return pp_stage * self.tp + tp_rank

    def optim_file(self, dp_rank: int, pp_stage: int, tp_rank: int) -> Path:
        return self.optim_files[(dp_rank, self.mp_rank(pp_stage, tp_rank))]

    def files(self) -> list[Path]:
        return sorted([*self.layer_files.values(), *self.mp_files.values(), *self.optim_files.values()])

    def check(self, num_layers: int | None = None, crc: bool = True) -> None:
        """Raise CkptError unless the step is complete (every layer file `num_layers` blocks need, no other)
        and, with `crc`, every file's records match their CRC-32s."""
        from mtf_train.ckpt.safe import UnsafeCheckpoint, check_file

        if num_layers is not None:
            required = {1, *range(3, num_layers + 3), num_layers + 4}
            allowed = required | {num_layers + 5}  # the tied embedding's copy on the last stage
            have = set(self.layers)
            missing, extra = sorted(required - have), sorted(have - allowed)
            if missing:
                names = ", ".join(f"layer_{x:02d}-model_*-model_states.pt" for x in missing[:3])
                raise CkptError(str(self.path), f"missing layer file(s) {names}: a {num_layers}-layer model needs "
                                f"layers {sorted(required)}; the checkpoint is incomplete")
            if extra:
                f = self.layer_files[min(k for k in self.layer_files if k[0] == extra[0])]
                raise CkptError(str(f), f"unexpected layer file: the saved args say {num_layers} layers (layers "
                                f"{sorted(required)}); the checkpoint's files do not belong together")
        if crc:  # zlib's crc32 releases the GIL: files are checked in parallel on a many-core node
            from concurrent.futures import ThreadPoolExecutor

            def one(path):
                try:
                    check_file(path)
                except UnsafeCheckpoint as err:
                    return err
                return None

            files = self.files()
            with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(files)))) as pool:
                errors = list(pool.map(one, files))
            for err in errors:
                if err is not None:
                    raise CkptError(err.where, err.reason)

    @property
    def universal_path(self) -> Path | None:
        """The universal form of this step, when `latest_universal` (or the usual folder) has one."""
        tag = read_text(self.root / "latest_universal")
        for cand in ([self.root / tag] if tag else []) + [self.root / f"{self.tag}_universal"]:
            if (cand / "zero").is_dir() and cand.name.startswith(self.tag + "_"):
                return cand
        return None


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def locate(folder: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """The checkpoint in `folder`: a checkpoint root with `latest`, a run folder (its `checkpoints/`), or a
    `global_stepN` folder itself. `step` picks `global_step{step}` instead of `latest`."""
    folder = Path(os.path.abspath(folder))  # verification workers run in another working directory
    if not folder.exists():
        raise CkptError(str(folder), "no such folder")
    if not folder.is_dir():
        raise CkptError(str(folder), "not a folder")
    if STEP_RE.match(folder.name) and step is None:
        root, tag = folder.parent, folder.name
    else:
        root = folder
        if (not (root / "latest").exists() and (root / "checkpoints").is_dir()
                and not any(STEP_RE.match(p.name) for p in root.iterdir())):
            root = root / "checkpoints"  # a run folder
        if step is not None:
            tag = f"global_step{step}"
        else:
            tag = read_text(root / "latest")
            if tag is None:
                steps = sorted(p.name for p in root.glob("global_step*") if STEP_RE.match(p.name))
                hint = f" (found {', '.join(steps[-3:])}: pass --step N)" if steps else ""
                raise CkptError(str(root), f"no `latest` file: not a checkpoint folder{hint}")
    path = root / tag
    if not path.is_dir():
        raise CkptError(str(root), f"{'latest names ' if step is None else ''}{tag}, which does not exist")
    ck = Checkpoint(root=root, path=path, tag=tag)
    for p in path.iterdir():
        if m := LAYER_RE.match(p.name):
            ck.layer_files[(int(m.group(1)), int(m.group(2)))] = p
        elif m := LAYER_NO_MODEL_RE.match(p.name):
            ck.layer_files[(int(m.group(1)), 0)] = p
        elif m := MP_RE.match(p.name):
            ck.mp_files[int(m.group(1))] = p
        elif m := OPTIM_RE.match(p.name):
            ck.optim_files[(int(m.group(2)), int(m.group(3)))] = p
            ck.bf16_optim = ck.bf16_optim or bool(m.group(1))
    _degrees(ck)
    return ck


def _degrees(ck: Checkpoint) -> None:
    where = str(ck.path)
    if not ck.layer_files:
        raise CkptError(where, "no layer_XX-model_YY-model_states.pt files: not a pipeline checkpoint")
    if not ck.mp_files:
        raise CkptError(where, "no mp_rank_XX_model_states.pt files")
    tps = {t for _, t in ck.layer_files}
    ck.tp = max(tps) + 1
    if tps != set(range(ck.tp)):
        raise CkptError(where, f"layer files for tensor ranks {sorted(tps)}: some are missing")
    for layer in ck.layers:
        missing = [t for t in range(ck.tp) if (layer, t) not in ck.layer_files]
        if missing:
            raise CkptError(where, f"layer {layer:02d} has no file for tensor rank(s) {missing}")
    n_mp = max(ck.mp_files) + 1
    if set(ck.mp_files) != set(range(n_mp)):
        raise CkptError(where, f"mp_rank files {sorted(ck.mp_files)}: some are missing")
    if n_mp % ck.tp:
        raise CkptError(where, f"{n_mp} mp_rank files do not divide into {ck.tp} tensor ranks")
    ck.pp = n_mp // ck.tp
    if ck.optim_files:
        dps = {d for d, _ in ck.optim_files}
        ck.dp = max(dps) + 1
        missing = [(d, m) for d in range(ck.dp) for m in range(n_mp) if (d, m) not in ck.optim_files]
        if missing:
            d, m = missing[0]
            raise CkptError(where, f"{len(missing)} optimizer file(s) missing, e.g. zero_pp_rank_{d}_mp_rank_{m:02d}")


# --- output folders: complete or absent ---------------------------------------------------------------------


def check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CkptError(str(out), "already exists and is not empty (choose a new output folder)")
    if not out.parent.exists():
        raise CkptError(str(out), f"parent folder {out.parent} does not exist")


@contextlib.contextmanager
def staged(out: Path):
    """Yield a temporary sibling of `out`; rename it to `out` only when the block completes."""
    out = Path(out)
    check_output(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def mem_available() -> int:
    """Bytes of memory available to new work on this host (MemAvailable), else a guess."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
