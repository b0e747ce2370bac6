"""Figures: the component grid (the paper's Figure 4) and small plot helpers, all saved as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

#: diverging colormap for the component grid, centred at zero (blue negative, red positive)
FEATURE_CMAP = "RdBu_r"


def feature_grid(
    weights: torch.Tensor, image_shape: tuple[int, ...], columns: int | None = None, pad: int = 1
) -> np.ndarray:
    """Tile the rows of W (K x D) as images of ``image_shape``: H x W, or C x H x W for colour.

    Each component is scaled by its own max |w| into [-1, 1], so 0 stays 0 (the colormap's centre).
    Returns a (rows * (H + pad) - pad) x (columns * (W + pad) - pad) array, with a trailing channel axis of
    3 for colour images; the padding reads 0.
    """
    w = weights.detach().double().cpu()
    k = w.shape[0]
    w = w / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    colour = len(image_shape) == 3
    if colour:
        images = w.reshape(k, *image_shape).permute(0, 2, 3, 1).numpy()  # K x H x W x C
    else:
        images = w.reshape(k, *image_shape[-2:]).numpy()
    h, wd = images.shape[1:3]
    columns = columns or math.ceil(math.sqrt(k))
    rows = math.ceil(k / columns)
    grid = np.zeros((rows * (h + pad) - pad, columns * (wd + pad) - pad, *images.shape[3:]))
    for i in range(k):
        r, c = divmod(i, columns)
        grid[r * (h + pad) : r * (h + pad) + h, c * (wd + pad) : c * (wd + pad) + wd] = images[i]
    return grid


def save_feature_grid(weights: torch.Tensor, image_shape: tuple[int, ...], path: str | Path, title: str = "") -> Path:
    """Write the component grid as a PNG (diverging colormap at [-1, 1]; colour shown with 0 as grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = feature_grid(weights, image_shape)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + (0.4 if title else 0)))
    if grid.ndim == 3:
        ax.imshow((grid + 1) / 2)
    else:
        ax.imshow(grid, cmap=FEATURE_CMAP, vmin=-1, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
