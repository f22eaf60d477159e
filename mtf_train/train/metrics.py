"""Training logs: one stdout line per log interval, TensorBoard scalars, metrics.jsonl and a loss-curve PNG.

Only global rank 0 writes (DeepSpeed broadcasts the step's loss from the last pipeline stage to every stage).
`mtf-train status` reads metrics.jsonl.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


class Metrics:
    def __init__(self, run_dir: Path, tensorboard_dir: str | None, queue_size: int, enabled: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=queue_size)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record.get("iteration", 0)
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("time", "iteration", "kind") and isinstance(value, (int, float)):
                    prefix = "validation/" if record.get("kind") == "eval" else "train/"
                    self.tb.add_scalar(prefix + key, value, step)

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def close(self, loss_curve: bool = True) -> Path | None:
        """Flush TensorBoard and draw the loss curve (unless not asked to); return the PNG's path."""
        if not self.enabled:
            return None
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        return plot_loss_curve(self.path, self.run_dir / "loss_curve.png") if loss_curve else None


def read_metrics(path: Path) -> list[dict]:
    out = []
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a crash
    except OSError:
        pass
    return out


def plot_loss_curve(metrics_path: Path, png: Path) -> Path | None:
    records = read_metrics(metrics_path)
    train = [(r["iteration"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    if not train:
        return None
    from mtf_train.plots import figure, save_png

    fig, ax = figure(7, 4)
    ax.plot(*zip(*train), label="train", lw=1.2)
    groups = sorted({r["group"] for r in records if r.get("kind") == "eval"})
    for g in groups:
        pts = [(r["iteration"], r["loss"]) for r in records if r.get("kind") == "eval" and r["group"] == g]
        ax.plot(*zip(*pts), "o-", label=f"validation: {g}", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (target tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, png)
