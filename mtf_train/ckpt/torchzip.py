"""A lazy reader and an in-place writer of torch.save's zip format: the riskiest code of the checkpoint tools.

`torch.save` files are zip archives whose tensors are stored uncompressed, one record per storage. `TorchFile`
unpickles only the small `data.pkl` and hands out `LazyTensor`s that read their bytes with plain file reads
when asked, so a 100 GB optimizer shard costs nothing until a slice of it is needed. `SkeletonFile` does the
reverse: it saves the structure with `torch.serialization.skip_data` (the records are reserved, sparse, never
in memory), the caller fills each tensor range in place and `close` writes the records' CRC-32s. Unpickling
resolves only the globals of `safe`'s allowlist (a 2022 checkpoint's `megatron.enums` become local enums);
anything else is refused.

`load(torch_free=True)` reads the same structure without importing torch (or DeepSpeed): tensors keep their
dtype as a name, `torch.Size` is a tuple, dtypes are `DTypeName`s and DeepSpeed's records are inert `Record`s.
That is all `ckpt inspect` and the tools' input checks need, so a damaged checkpoint is refused before torch's
seconds of import. A torch global it does not know raises `NeedsTorch`: the caller reads with torch instead.
"""
from __future__ import annotations

import _compat_pickle
import importlib
import io
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

from mtf_train.ckpt.errors import CkptError


# --- lazy reading -------------------------------------------------------------------------------------------

# The element types torch.save names storages by (its legacy typed classes), and their sizes in bytes.
STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                  "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
                  "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
                  "UntypedStorage": "uint8"}
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
            "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}


class NeedsTorch(Exception):
    """A torch-free read met a torch global it cannot stand in for: read the file with torch."""


class DTypeName(str):
    """A torch dtype read without torch: its name ("float32")."""

    def __repr__(self):
        return f"torch.{self}"


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = DTypeName(dtype)


class Record:
    """An allowlisted object of a package a torch-free read does not import (DeepSpeed's optimizer records):
    its constructor arguments (`value`: the first, an enum's value) and pickled state, nothing run."""

    name = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    @property
    def value(self):
        return self.args[0] if self.args else None

    def __repr__(self):
        return f"{self.name}{self.args}"


_record_classes: dict[str, type] = {}


def _record_class(full: str) -> type:
    if full not in _record_classes:
        _record_classes[full] = type(full.rsplit(".", 1)[1], (Record,), {"name": full})
    return _record_classes[full]


# What torch's weights-only unpickler allows besides torch's own names (numpy's byte strings need the first).
_TORCH_ALLOWS_TOO = {"_codecs.encode": ("codecs", "encode"), "builtins.bytearray": ("builtins", "bytearray"),
                     "builtins.complex": ("builtins", "complex"), "collections.Counter": ("collections", "Counter")}


def _torch_free_global(module: str, name: str):
    """The stand-in for torch global `module.name` in a torch-free read; NeedsTorch when there is none."""
    if module == "torch":
        if name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if name in ITEMSIZE:
            return DTypeName(name)
        if name == "Size":
            return tuple
        if name == "device":
            return lambda *a: ":".join(str(x) for x in a)
    raise NeedsTorch(f"{module}.{name}")


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
        if isinstance(self.dtype, str):
            return ITEMSIZE[self.dtype]
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

    def load(self, torch_free: bool = False):
        """The pickled object with every tensor as a `LazyTensor`; `torch_free`: see the module docstring."""
        if not torch_free:
            import torch
        try:
            data = self._zip.read(self._prefix + "data.pkl")
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise CkptError(str(self.path), f"truncated or corrupt ({err})") from None
        tfile = self
        storages: dict[str, LazyStorage] = {}

        from mtf_train.ckpt.safe import UnsafeCheckpoint, is_allowlisted, refusal_reason, resolve

        torch_allowed = {} if torch_free else _torch_allowed_globals()

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
                full = f"{module}.{name}"
                if torch_free:
                    if module == "torch" or module.startswith("torch."):
                        return _torch_free_global(module, name)
                    if full in _TORCH_ALLOWS_TOO:
                        mod, attr = _TORCH_ALLOWS_TOO[full]
                        return getattr(importlib.import_module(mod), attr)
                    if module.startswith("deepspeed.") and is_allowlisted(full):
                        return _record_class(full)
                if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
                    return getattr(torch, name)
                obj = torch_allowed.get(full)
                if obj is None:
                    obj = resolve(full)
                if obj is None:
                    raise UnsafeCheckpoint(str(tfile.path), refusal_reason(full))
                return obj

            def persistent_load(self, pid):
                _, storage_type, key, _location, numel = pid
                if torch_free:
                    if not isinstance(storage_type, _StorageType):
                        raise NeedsTorch(f"storage of type {storage_type!r}")
                    storages.setdefault(key, LazyStorage(tfile, key, storage_type.dtype, numel))
                    return storages[key]
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
        except NeedsTorch:
            raise
        except UnsafeCheckpoint as err:
            raise CkptError(err.where, err.reason) from None
        except Exception as err:  # a broken pickle: any exception type is possible
            if torch_free:  # or a stand-in that does not fit: the torch reader gives the verdict
                raise NeedsTorch(f"{type(err).__name__}: {err}") from None
            raise CkptError(str(self.path), f"corrupt data.pkl ({type(err).__name__}: {err})") from None

    def read_elements(self, storage: LazyStorage, start: int, count: int):
        import torch

        dtype = getattr(torch, storage.dtype) if isinstance(storage.dtype, str) else storage.dtype
        out = torch.empty(count, dtype=dtype)
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
