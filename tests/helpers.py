"""Shared test helpers: run the CLI as a user types it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
BIN = Path(sys.executable).parent


def mtf(*args: str, cwd: str | os.PathLike | None = None, env: dict | None = None, timeout: float = 120,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run the installed `mtf-train` console script."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([str(BIN / "mtf-train"), *args], cwd=cwd or ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mtf-train {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


HEAVY = ("torch", "deepspeed", "megatron", "transformers")
_PROBE = ("import json, sys\nfrom mtf_train.cli import main\ntry:\n    code = main(sys.argv[2:])\nfinally:\n"
          "    sys.stdout.flush()\n    open(sys.argv[1], 'w').write(json.dumps(sorted(m for m in sys.modules "
          f"if m in {HEAVY!r})))\nsys.exit(code)\n")


def mtf_imports(*args: str, cwd: str | os.PathLike | None = None, env: dict | None = None,
                timeout: float = 120) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`mtf-train ARGS` through the console script's `main`, and which of HEAVY it imported on the way."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "imports.json"
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(report), *args], cwd=cwd or ROOT,
                              env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=timeout)
        return proc, json.loads(report.read_text())


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert the CLI failed the way bad input must: exit 2, one stderr line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def assert_torch_free_read_equal(path: Path) -> None:
    """`TorchFile.load(torch_free=True)` gives what the torch reader gives for `path`: the same structure,
    tensors' dtypes, shapes, strides and offsets, DeepSpeed's records' fields, plain values."""
    from mtf_train.ckpt.torchzip import LazyTensor, Record, TorchFile

    def plain(obj):
        if isinstance(obj, LazyTensor):
            return ("tensor", str(obj.dtype).replace("torch.", ""), tuple(obj.shape), obj.stride_, obj.offset,
                    obj.nbytes, obj.storage.key)
        if isinstance(obj, Record):
            return (obj.name.rsplit(".", 1)[1], obj.value if obj.args else obj.state)
        if type(obj).__module__.startswith("deepspeed"):  # the real record, as a Record stands for it
            return (type(obj).__name__, obj.value if hasattr(obj, "value") else getattr(obj, "__dict__", None))
        if isinstance(obj, dict):
            return (type(obj).__name__, {k: plain(v) for k, v in obj.items()})
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        if type(obj).__name__ == "dtype" and type(obj).__module__ == "torch":
            return str(obj).replace("torch.", "")
        if type(obj).__module__ == "numpy":  # the RNG state's array
            return ("numpy", obj.tolist())
        if type(obj).__name__ == "Namespace":
            return ("Namespace", plain(vars(obj)))
        return obj

    with TorchFile(path) as tf:
        free, full = plain(tf.load(torch_free=True)), plain(tf.load())
    assert free == full, path
