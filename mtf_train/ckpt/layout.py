"""The files of a DeepSpeed pipeline checkpoint, read and written one tensor at a time.

    <root>/latest                                     "global_stepN"
    <root>/global_stepN/layer_XX-model_YY-model_states.pt      layer XX, tensor rank YY
    <root>/global_stepN/mp_rank_MM_model_states.pt             MM = pp_stage * tp + tp_rank: client state
    <root>/global_stepN/[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt   D = data-parallel rank
    <root>/global_stepN_universal/zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, <root>/latest_universal

`torch.save` files are zip archives whose tensors are stored uncompressed, one record per storage. `TorchFile`
unpickles only the small `data.pkl` and hands out `LazyTensor`s that read their bytes with plain file reads
when asked, so a 100 GB optimizer shard costs nothing until a slice of it is needed. `write_skeleton` does the
reverse: it saves the structure with `torch.serialization.skip_data` (the records are reserved, sparse, never
in memory), the caller fills each tensor range in place and `close` writes the records' CRC-32s. Unpickling
resolves only the globals of `safe`'s allowlist (a 2022 checkpoint's `megatron.enums` become local enums);
anything else is refused. `Checkpoint.check` verifies a step before a tool trusts it: every layer file the
model's depth requires (and no other), every file's records against their CRC-32s.
"""
from __future__ import annotations

import _compat_pickle
import contextlib
import io
import os
import pickle
import re
import shutil
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from mtf_train.errors import UserError


class CkptError(UserError):
    """Bad checkpoint input: one line, exit 2."""


class VerifyError(UserError):
    """A conversion whose verification failed: one line, exit 1 (nothing written)."""

    exit_code = 1


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


# --- lazy reading -------------------------------------------------------------------------------------------


class LazyStorage:
    def __init__(self, tfile: "TorchFile", key: str, dtype, numel: int):
        self.file, self.key, self.dtype, self.numel = tfile, key, dtype, numel


class LazyTensor:
    """A tensor of a `TorchFile`, read on demand. `read(start, count)` gives elements of its flat (contiguous)
    data; `load()` the whole tensor."""

    def __init__(self, storage: LazyStorage, offset: int, size, stride):
        self.storage, self.offset, self.shape, self.stride_ = storage, offset, tuple(size), tuple(stride)

    @property
    def dtype(self):
        return self.storage.dtype

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel() * self.itemsize

    @property
    def itemsize(self) -> int:
        import torch

        return torch.empty((), dtype=self.dtype).element_size()

    def is_contiguous(self) -> bool:
        expected, acc = [], 1
        for s in reversed(self.shape):
            expected.append(acc)
            acc *= s
        return tuple(reversed(expected)) == self.stride_ or self.numel() <= 1

    def read(self, start: int = 0, count: int | None = None):
        """Elements [start, start+count) of the flat tensor, as a new 1-D tensor."""
        if not self.is_contiguous():
            return self.load().reshape(-1)[start:start + (count if count is not None else self.numel())].clone()
        count = self.numel() - start if count is None else count
        if start < 0 or count < 0 or start + count > self.numel():
            raise CkptError(str(self.storage.file.path), f"read of [{start}, {start + count}) outside a tensor of "
                            f"{self.numel()} elements")
        return self.storage.file.read_elements(self.storage, self.offset + start, count)

    def load(self):
        import torch

        if self.is_contiguous():
            return self.read().view(self.shape)
        n = max((s - 1) * st for s, st in zip(self.shape, self.stride_)) + 1 if self.numel() else 0
        flat = self.storage.file.read_elements(self.storage, self.offset, n)
        return torch.as_strided(flat, self.shape, self.stride_).clone()

    def __repr__(self):
        return f"LazyTensor({list(self.shape)}, {self.dtype})"


def _torch_allowed_globals() -> dict:
    """What torch's own weights-only unpickler allows (tensors, storages, dtypes, Size, OrderedDict, ...)."""
    from torch import _weights_only_unpickler as wou

    return dict(wou._get_allowed_globals())


def _rebuild_lazy(storage, storage_offset, size, stride, *rest):
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


class TorchFile:
    """A `torch.save` zip file opened for lazy reading (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
            self._zip = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise CkptError(str(self.path), "no such file") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise CkptError(str(self.path), f"truncated or corrupt ({err})") from None
        pkl = [n for n in self._zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CkptError(str(self.path), "not a torch.save archive (no data.pkl)")
        self._prefix = pkl[0][: -len("data.pkl")]
        self._records: dict[str, tuple[int, int]] = {}
        self._fh = None

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def record(self, key: str) -> tuple[int, int]:
        """(byte offset of the data in the file, size) of storage `key`."""
        if key not in self._records:
            try:
                info = self._zip.getinfo(f"{self._prefix}data/{key}")
            except KeyError:
                raise CkptError(str(self.path), f"storage {key} missing: truncated or corrupt") from None
            if info.compress_type != zipfile.ZIP_STORED:
                raise CkptError(str(self.path), "compressed torch archive: cannot read lazily")
            with open(self.path, "rb") as fh:
                fh.seek(info.header_offset)
                header = fh.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise CkptError(str(self.path), "truncated or corrupt (bad record header)")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            if start + info.file_size > self.size:
                raise CkptError(str(self.path), "truncated (a record runs past the end of the file)")
            self._records[key] = (start, info.file_size)
        return self._records[key]

    def load(self):
        """The pickled object with every tensor as a `LazyTensor`."""
        import torch

        try:
            data = self._zip.read(self._prefix + "data.pkl")
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise CkptError(str(self.path), f"truncated or corrupt ({err})") from None
        tfile = self
        storages: dict[str, LazyStorage] = {}

        from mtf_train.ckpt.safe import UnsafeCheckpoint, refusal_reason, resolve

        torch_allowed = _torch_allowed_globals()

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):  # never imports what the file names: allowlist only
                if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 spells builtins the py2 way
                    module, name = _compat_pickle.NAME_MAPPING[(module, name)]
                elif module in _compat_pickle.IMPORT_MAPPING:
                    module = _compat_pickle.IMPORT_MAPPING[module]
                if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                                         "_rebuild_tensor"):
                    return _rebuild_lazy
                if module == "torch._utils" and name == "_rebuild_parameter":
                    return _rebuild_parameter
                if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
                    return getattr(torch, name)
                full = f"{module}.{name}"
                obj = torch_allowed.get(full)
                if obj is None:
                    obj = resolve(full)
                if obj is None:
                    raise UnsafeCheckpoint(str(tfile.path), refusal_reason(full))
                return obj

            def persistent_load(self, pid):
                _, storage_type, key, _location, numel = pid
                with warnings.catch_warnings():  # TypedStorage classes warn on any use
                    warnings.simplefilter("ignore")
                    dtype = getattr(storage_type, "dtype", None)
                if not isinstance(dtype, torch.dtype):
                    dtype = torch.uint8
                if key not in storages:
                    storages[key] = LazyStorage(tfile, key, dtype, numel)
                return storages[key]

        try:
            return Unpickler(io.BytesIO(data)).load()
        except UnsafeCheckpoint as err:
            raise CkptError(err.where, err.reason) from None
        except Exception as err:  # a broken pickle: any exception type is possible
            raise CkptError(str(self.path), f"corrupt data.pkl ({type(err).__name__}: {err})") from None

    def read_elements(self, storage: LazyStorage, start: int, count: int):
        import torch

        out = torch.empty(count, dtype=storage.dtype)
        if count == 0:
            return out
        offset, size = self.record(storage.key)
        nbytes = count * out.element_size()
        begin = offset + start * out.element_size()
        if begin + nbytes > offset + size:
            raise CkptError(str(self.path), f"storage {storage.key} is shorter than its tensors: corrupt")
        if self._fh is None:
            self._fh = open(self.path, "rb", buffering=0)
        self._fh.seek(begin)
        view = memoryview(out.view(torch.uint8).numpy())
        got = 0
        while got < nbytes:
            n = self._fh.readinto(view[got:])
            if not n:
                raise CkptError(str(self.path), "truncated (unexpected end of file)")
            got += n
        return out


def load_small(path: str | os.PathLike):
    """Everything of a small file (client state, a layer), tensors materialised."""
    with TorchFile(path) as tf:
        return materialize(tf.load())


def materialize(obj):
    if isinstance(obj, LazyTensor):
        return obj.load()
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) is not dict else {}
        for k, v in obj.items():
            out[k] = materialize(v)
        return out
    if isinstance(obj, list):
        return [materialize(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(materialize(v) for v in obj)
    return obj


def check_archive(path: Path) -> None:
    """Integrity: every record of the archive is present and matches its CRC-32 (see `safe.check_file`)."""
    from mtf_train.ckpt.safe import UnsafeCheckpoint, check_file

    try:
        check_file(path)
    except UnsafeCheckpoint as err:
        raise CkptError(err.where, err.reason) from None


# --- writing tensor by tensor -------------------------------------------------------------------------------


class SkeletonFile:
    """A file saved with its tensors' space reserved; `write(lazy, start, values)` fills a range in place."""

    def __init__(self, path: Path, obj):
        import torch
        from torch.serialization import skip_data

        self.path = path
        with skip_data():
            torch.save(obj, path)
        self._tf = TorchFile(path)
        self.lazy = self._tf.load()
        self._fh = open(path, "r+b", buffering=0)

    def write(self, lazy: LazyTensor, start: int, values) -> None:
        import torch

        values = values.reshape(-1).contiguous()
        if values.dtype != lazy.dtype:
            values = values.to(lazy.dtype)
        if start + values.numel() > lazy.numel():
            raise RuntimeError(f"{self.path}: write past the end of a tensor")
        offset, _ = self._tf.record(lazy.storage.key)
        self._fh.seek(offset + (lazy.offset + start) * values.element_size())
        self._fh.write(memoryview(values.view(torch.uint8).numpy()))

    def close(self) -> None:
        from mtf_train.ckpt.safe import fix_crcs

        self._fh.close()
        self._tf.close()
        fix_crcs(self.path)  # the records were filled after torch wrote their CRC-32s


def empty_like_shape(shape, dtype):
    """A placeholder tensor for a skeleton: allocated lazily by the OS, so it costs no memory."""
    import torch

    return torch.empty(tuple(shape), dtype=dtype)


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
