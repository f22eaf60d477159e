"""PNG figures (the loss curve, accuracy against step), drawn with matplotlib's object API: no pyplot, so no
process-wide backend switch (`matplotlib.use`) and no global figure list to close, whoever calls these."""
from __future__ import annotations

from pathlib import Path

from mtf_train.files import atomic_path


def figure(width: float, height: float, dpi: int = 100):
    """(figure, axes) of one plot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    return fig, fig.subplots()


def save_png(fig, path: Path, dpi: int | None = None) -> Path:
    """Lay the figure out and write it to `path` as PNG (Agg, chosen by the format), atomically."""
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the temporary name has no .png to go by
        fig.savefig(tmp, format="png", dpi=dpi or "figure")
    return Path(path)
