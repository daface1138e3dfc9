"""PNG overlays of CT slices with the true and predicted liver outlines.

Slices come as RAS (X, Y) arrays; they are shown the radiological way (patient's right on the
image's left, anterior at the top), i.e. transposed and flipped on both axes.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: must be chosen before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def radiological(slice_xy: np.ndarray) -> np.ndarray:
    """(X, Y) RAS slice -> (rows, cols) image with anterior up and patient right on the left."""
    return slice_xy.T[::-1, ::-1]


def overlay(
    ct_hu: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray | None,
    path: Path,
    *,
    title: str = "",
    window_hu: tuple[float, float] = (-200.0, 300.0),
) -> Path:
    """Write one axial slice with truth (green) and prediction (red) outlines to ``path``."""
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.imshow(radiological(ct_hu), cmap="gray", vmin=window_hu[0], vmax=window_hu[1])
    for m, color, label in ((truth, "lime", "truth"), (pred, "red", "prediction")):
        if m is not None and m.any():
            ax.contour(radiological(m.astype(float)), levels=[0.5], colors=color, linewidths=1)
            ax.plot([], [], color=color, label=label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def overlay_slices(truth: np.ndarray, pred: np.ndarray, n: int) -> list[int]:
    """``n`` axial indices spread over the liver (truth or prediction), for overlays."""
    z = np.flatnonzero((truth | pred).any(axis=(0, 1)))
    if z.size == 0 or n == 0:
        return []
    picks = np.linspace(z[0], z[-1], n + 2)[1:-1] if n < z.size else z
    return sorted({int(round(p)) for p in picks})
