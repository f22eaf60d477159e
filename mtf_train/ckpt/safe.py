"""Reading checkpoint files without trusting them: integrity first, then an allowlisted unpickler.

Every `torch.save` file is a zip archive whose records carry CRC-32s (torch writes them by default).
`check_file` recomputes them (and checks each record's header and bounds), so flipped bytes, truncation and
zero-byte files are found before anything is unpickled. The cost is one sequential read of the file
(docs/benchmarks.md has the numbers).

Unpickling never imports what a checkpoint names: `allowed_globals()` is the whole list of classes and
functions a checkpoint may reference (tensors and their storages, plain containers, `argparse.Namespace`,
torch dtypes, numpy's RNG state, the few DeepSpeed records of its optimizer states), with the 2022
Megatron-DeepSpeed enums (`megatron.enums.*`) mapped to local copies. `load` is `torch.load(weights_only=True)`
with that list; `guard_torch_load` routes DeepSpeed's own `torch.load(weights_only=False)` calls through the
same path while it loads a checkpoint. Anything else is refused with one line naming the file and the global.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import os
import struct
import threading
import zipfile
import zlib
from pathlib import Path

from mtf_train.errors import UserError


class UnsafeCheckpoint(UserError):
    """A checkpoint file that is damaged or needs more than the allowlist to unpickle: one line, exit 2."""

    def __reduce__(self):  # raised in DeepSpeed's converter workers, it crosses a process boundary
        return type(self), (self.where, self.reason)


# --- the 2022 Megatron-DeepSpeed enums (megatron/enums.py), by value ----------------------------------------


class PositionEmbeddingType(enum.Enum):
    rotary = 1
    absolute = 2
    alibi = 3


class AttnMaskType(enum.Enum):
    padding = 1
    causal = 2
    prefix = 3
    custom = 4


class LayerType(enum.Enum):
    encoder = 1
    decoder = 2


class AttnType(enum.Enum):
    self_attn = 1
    cross_attn = 2


_LOCAL_ENUMS = {"megatron.enums.PositionEmbeddingType": PositionEmbeddingType,
                "megatron.enums.AttnMaskType": AttnMaskType,
                "megatron.enums.LayerType": LayerType,
                "megatron.enums.AttnType": AttnType}

# Globals resolved from a fixed module when a pickle names them (never from the name the pickle gives).
_FIXED = {
    "argparse.Namespace": ("argparse", "Namespace"),
    "collections.OrderedDict": ("collections", "OrderedDict"),
    "collections.defaultdict": ("collections", "defaultdict"),
    "builtins.set": ("builtins", "set"),
    "builtins.frozenset": ("builtins", "frozenset"),
    "builtins.slice": ("builtins", "slice"),
    "builtins.range": ("builtins", "range"),
    "pathlib.PosixPath": ("pathlib", "PosixPath"),
    "pathlib.Path": ("pathlib", "PosixPath"),
    # numpy RNG state (np.random.get_state(): a uint32 array); numpy 1 and 2 spell the module differently
    "numpy.core.multiarray._reconstruct": ("numpy", "_mtf_reconstruct"),
    "numpy._core.multiarray._reconstruct": ("numpy", "_mtf_reconstruct"),
    "numpy.ndarray": ("numpy", "ndarray"),
    "numpy.dtype": ("numpy", "dtype"),
    "numpy.core.multiarray.scalar": ("numpy", "_mtf_scalar"),
    "numpy._core.multiarray.scalar": ("numpy", "_mtf_scalar"),
    # DeepSpeed's records in optimizer and model-state files
    "deepspeed.utils.tensor_fragment.fragment_address": ("deepspeed.utils.tensor_fragment", "fragment_address"),
    "deepspeed.runtime.zero.config.ZeroStageEnum": ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": ("deepspeed.runtime.fp16.loss_scaler",
                                                             "DynamicLossScaler"),
}

ALLOWED_TEXT = ("tensors, plain containers, argparse.Namespace, torch dtypes, numpy RNG state, DeepSpeed's "
                "optimizer records and the 2022 megatron.enums")


def _numpy_helpers():
    import numpy as np

    mod = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return {"_mtf_reconstruct": mod._reconstruct, "_mtf_scalar": mod.scalar}


def is_allowlisted(name: str) -> bool:
    """Whether a global of that name may be unpickled, without importing its module."""
    return name in _LOCAL_ENUMS or name in _FIXED


def resolve(name: str):
    """The object an allowlisted global name stands for; None when it is not allowed."""
    if name in _LOCAL_ENUMS:
        return _LOCAL_ENUMS[name]
    if name in _FIXED:
        module, attr = _FIXED[name]
        if module == "numpy" and attr.startswith("_mtf_"):
            return _numpy_helpers()[attr]
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return None
    if name.startswith("numpy.dtypes.") and name.endswith("DType"):  # numpy 2 pickles dtype classes by name
        import numpy as np

        cls = getattr(getattr(np, "dtypes", None), name.rsplit(".", 1)[1], None)
        return cls if isinstance(cls, type) and issubclass(cls, np.dtype) else None
    return None


@functools.lru_cache(maxsize=1)
def allowed_globals() -> tuple:
    """(object, "module.name") pairs for `torch.serialization.safe_globals` (what torch does not allow by
    default)."""
    out = []
    for name in [*_LOCAL_ENUMS, *_FIXED]:
        obj = resolve(name)
        if obj is not None:
            out.append((obj, name))
    import numpy as np

    for cls_name in dir(getattr(np, "dtypes", object())):
        if cls_name.endswith("DType"):
            obj = resolve(f"numpy.dtypes.{cls_name}")
            if obj is not None:
                out.append((obj, f"numpy.dtypes.{cls_name}"))
    return tuple(out)


# --- integrity ------------------------------------------------------------------------------------------------

_CHUNK = 16 << 20


# Files whose CRCs matched in this process, by (path, inode, size, mtime, ctime): a tool checks its input before
# importing torch and again where it reads, and a checkpoint is read once for both.
_verified: set[tuple] = set()


def check_file(path: str | os.PathLike) -> None:
    """Raise UnsafeCheckpoint unless `path` is a complete torch archive whose records match their CRC-32s."""
    path = Path(path)
    where = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UnsafeCheckpoint(where, "no such file") from None
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _verified:
        return
    _check_records(path, st.st_size)
    _verified.add(key)


def _check_records(path: Path, size: int) -> None:
    where = str(path)
    if size == 0:
        raise UnsafeCheckpoint(where, "empty file (0 bytes): truncated or corrupt")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise UnsafeCheckpoint(where, f"truncated or corrupt: not a complete torch archive ({err})") from None
    with zf, open(path, "rb", buffering=0) as fh:
        infos = zf.infolist()
        if not any(i.filename.endswith("data.pkl") for i in infos):
            raise UnsafeCheckpoint(where, "not a torch.save archive (no data.pkl)")
        checked = 0
        for info in infos:
            fh.seek(info.header_offset)
            header = fh.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise UnsafeCheckpoint(where, f"truncated or corrupt: bad record header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            if info.compress_type != zipfile.ZIP_STORED:
                raise UnsafeCheckpoint(where, f"compressed record {info.filename}: not a torch.save archive")
            if start + info.file_size > size:
                raise UnsafeCheckpoint(where, f"truncated: record {info.filename} runs past the end of the file")
            if info.CRC == 0 and info.file_size:  # saved with torch's crc32 option off: nothing to compare with
                continue
            fh.seek(start)
            crc, left = 0, info.file_size
            buf = bytearray(min(_CHUNK, max(1, left)))
            view = memoryview(buf)
            while left:
                n = fh.readinto(view[:min(left, len(buf))])
                if not n:
                    raise UnsafeCheckpoint(where, f"truncated: record {info.filename} ends early")
                crc = zlib.crc32(view[:n], crc)
                left -= n
            if crc != info.CRC:
                raise UnsafeCheckpoint(where, f"corrupt: record {info.filename.split('/', 1)[-1]} does not match "
                                       "its CRC-32 (changed bytes)")
            checked += 1


def fix_crcs(path: str | os.PathLike) -> None:
    """Rewrite the CRC-32 of every record of a torch archive whose data was filled in place after saving (the
    skeleton files of `ckpt reshape`), in the local headers and the central directory alike."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        start_dir = zf.start_dir
    with open(path, "r+b", buffering=0) as fh:
        crcs = {}
        for info in infos:
            fh.seek(info.header_offset)
            header = fh.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            crc, left = 0, info.file_size
            while left:
                chunk = fh.read(min(left, _CHUNK))
                if not chunk:
                    raise OSError(f"{path}: record {info.filename} ends early")
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            crcs[info.filename] = crc
            fh.seek(info.header_offset + 14)
            fh.write(struct.pack("<I", crc))
        fh.seek(start_dir)
        for _ in infos:
            entry = fh.read(46)
            if entry[:4] != b"PK\x01\x02":
                raise OSError(f"{path}: unexpected zip central directory")
            n, e, c = struct.unpack("<HHH", entry[28:34])
            name = fh.read(n).decode("utf-8")
            here = fh.tell()
            fh.seek(here - n - 46 + 16)
            fh.write(struct.pack("<I", crcs[name]))
            fh.seek(here + e + c)


# --- loading --------------------------------------------------------------------------------------------------


def refusal_reason(what: str) -> str:
    return (f"refused to unpickle: it references {what}, which is not on mtf-train's allowlist ({ALLOWED_TEXT}); "
            "loading it would run code the file names")


def _refusal(path, err: Exception) -> UnsafeCheckpoint:
    import re

    text = str(err)
    m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global:? ([\w.]+)", text)
    what = m.group(1) if m else (text.splitlines()[0][:160] if text else type(err).__name__)
    return UnsafeCheckpoint(str(path), refusal_reason(what))


_real_torch_load = None
_lock = threading.RLock()


def load(path, map_location="cpu", check: bool = True, **kwargs):
    """`torch.load(path, weights_only=True)` with the allowlist, after `check_file` (unless `check=False`)."""
    import pickle

    import torch

    if check and isinstance(path, (str, os.PathLike)):
        check_file(path)
    kwargs.pop("weights_only", None)
    loader = _real_torch_load or torch.load
    try:
        with torch.serialization.safe_globals(list(allowed_globals())):
            return loader(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise UnsafeCheckpoint(str(path), f"truncated or corrupt ({str(err).splitlines()[0][:160]})") from None


@contextlib.contextmanager
def guard_torch_load(check: bool = True):
    """While active, every `torch.load` in this process (DeepSpeed's, with `weights_only=False`, included) is
    `load`: integrity-checked, weights only, allowlisted."""
    global _real_torch_load
    import torch

    with _lock:
        if _real_torch_load is not None:  # nested: already guarded
            yield
            return
        _real_torch_load = torch.load

        def guarded(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kw):
            extra = {"mmap": mmap} if mmap is not None else {}
            return load(f, map_location=map_location, check=check, **extra, **kw)

        torch.load = guarded
        try:
            yield
        finally:
            torch.load = _real_torch_load
            _real_torch_load = None
