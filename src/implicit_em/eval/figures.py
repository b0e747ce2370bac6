"""Figures: the component grid (the paper's Figure 4) and small plot helpers, all saved as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

#: diverging colormap for the component grid, centred at zero (blue negative, red positive)
COMPONENT_CMAP = "RdBu_r"


#: the component grid shows at most this many components (the most used ones when usage is known)
GRID_MAX_COMPONENTS = 256


def grid_components(
    n_components: int, usage: torch.Tensor | None = None, max_components: int = GRID_MAX_COMPONENTS
) -> torch.Tensor:
    """Indices of the components a grid shows: all of them when K <= ``max_components``; else the
    ``max_components`` with the largest usage (mean responsibility), most used first, or the first ones
    when no usage is given."""
    if n_components <= max_components:
        return torch.arange(n_components)
    if usage is None:
        return torch.arange(max_components)
    return torch.argsort(usage.detach().double().cpu().reshape(-1), descending=True, stable=True)[:max_components]


def component_grid(
    weights: torch.Tensor,
    image_shape: tuple[int, ...],
    columns: int | None = None,
    pad: int = 1,
    usage: torch.Tensor | None = None,
    max_components: int = GRID_MAX_COMPONENTS,
) -> np.ndarray:
    """Tile the rows of W (K x D) as images of ``image_shape``: H x W, or C x H x W for colour.

    At most ``max_components`` tiles, chosen by :func:`grid_components` (the most used first when
    ``usage``, a K-vector, is given), so the grid costs the same at K = 16,384 as at 256.
    Each component is scaled by its own max |w| into [-1, 1], so 0 stays 0 (the colormap's centre).
    Returns a (rows * (H + pad) - pad) x (columns * (W + pad) - pad) array, with a trailing channel axis of
    3 for colour images; the padding reads 0.
    """
    index = grid_components(weights.shape[0], usage, max_components)
    w = weights.detach()[index.to(weights.device)].double().cpu()
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


def component_figure(
    weights: torch.Tensor,
    image_shape: tuple[int, ...],
    title: str = "",
    usage: torch.Tensor | None = None,
    max_components: int = GRID_MAX_COMPONENTS,
):
    """The component grid as a matplotlib Figure (diverging colormap at [-1, 1]; colour shown with 0 as grey),
    drawn with the object API, so the caller's backend is left alone. Above ``max_components`` components the
    title says which are shown (the most used, given ``usage``)."""
    from matplotlib.figure import Figure

    grid = component_grid(weights, image_shape, usage=usage, max_components=max_components)
    k = weights.shape[0]
    if k > max_components:
        which = "most used" if usage is not None else "first"
        title = f"{title}\n" if title else ""
        title += f"the {max_components} {which} of {k} components"
    fig = Figure(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + (0.4 if title else 0)))
    ax = fig.subplots()
    if grid.ndim == 3:
        ax.imshow((grid + 1) / 2)
    else:
        ax.imshow(grid, cmap=COMPONENT_CMAP, vmin=-1, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig


def save_component_grid(
    weights: torch.Tensor,
    image_shape: tuple[int, ...],
    path: str | Path,
    title: str = "",
    usage: torch.Tensor | None = None,
    max_components: int = GRID_MAX_COMPONENTS,
) -> Path:
    """Write :func:`component_figure` as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    component_figure(weights, image_shape, title, usage, max_components).savefig(path, dpi=100, bbox_inches="tight")
    return path
