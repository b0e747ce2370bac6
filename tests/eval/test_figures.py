"""The component grid (the paper's Figure 4): layout, scaling to [-1, 1], zero padding, the saved PNG."""

import matplotlib.image
import numpy as np
import pytest
import torch

from implicit_em.eval import figures
from implicit_em.eval.figures import COMPONENT_CMAP, component_figure, component_grid, save_component_grid


def _weights(k, d, seed=0):
    w = torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    return w * torch.linspace(0.01, 100, k)[:, None]  # components of very different scales


def _tiles(grid, k, h, w, columns, pad=1):
    for i in range(k):
        r, c = divmod(i, columns)
        yield grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w]


def _chw(index, image_shape):
    """A grid tile's (h, w[, c]) index as an index into the component's image_shape."""
    return (index[2], index[0], index[1]) if len(image_shape) == 3 else index


def _padding_mask(shape, k, h, w, columns, pad=1):
    """True where no component tile lies: the pad lines and unused tiles."""
    mask = np.ones(shape[:2], dtype=bool)
    for i in range(k):
        r, c = divmod(i, columns)
        mask[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = False
    return mask


@pytest.mark.parametrize(
    "k, image_shape, expected_shape, columns",
    [
        (10, (8, 8), (3 * 9 - 1, 4 * 9 - 1), 4),  # 10 components: 4 columns, 3 rows
        (16, (28, 28), (4 * 29 - 1, 4 * 29 - 1), 4),
        (5, (3, 32, 32), (2 * 33 - 1, 3 * 33 - 1, 3), 3),  # colour: channels last
    ],
)
def test_component_grid_shape_scaling_and_padding(k, image_shape, expected_shape, columns):
    d = int(np.prod(image_shape))
    w = _weights(k, d)
    grid = component_grid(w, image_shape)
    assert grid.shape == expected_shape
    assert grid.min() >= -1 and grid.max() <= 1
    h, wd = image_shape[-2:]
    for i, tile in enumerate(_tiles(grid, k, h, wd, columns)):
        scaled = (w[i] / w[i].abs().max()).double()
        expected = scaled.reshape(image_shape)
        if len(image_shape) == 3:
            expected = expected.permute(1, 2, 0)  # C x H x W -> H x W x C
        np.testing.assert_allclose(tile, expected.numpy(), atol=1e-12)
        assert np.abs(tile).max() == pytest.approx(1.0)  # each component's max |w| maps to 1
        # the sign is kept (0 stays 0, the colormap's centre): the extreme reads +-1 with w's sign
        j = np.unravel_index(np.abs(tile).argmax(), tile.shape)
        assert tile[j] == pytest.approx(float(torch.sign(w[i]).reshape(image_shape).numpy()[_chw(j, image_shape)]))
    assert (grid[_padding_mask(grid.shape, k, h, wd, columns)] == 0).all()


def test_component_grid_explicit_columns_and_zero_component():
    w = torch.zeros(3, 4)
    w[1] = torch.tensor([2.0, -4.0, 1.0, 0.0])
    grid = component_grid(w, (2, 2), columns=3, pad=2)
    assert grid.shape == (2, 3 * 4 - 2)
    np.testing.assert_allclose(grid[:, 4:6], [[0.5, -1.0], [0.25, 0.0]])
    assert (grid[:, :4] == 0).all() and (grid[:, 6:] == 0).all()  # zero component stays 0 (no NaN)
    assert np.isfinite(grid).all()


def test_save_component_grid_writes_png(tmp_path):
    path = save_component_grid(_weights(16, 64), (8, 8), tmp_path / "sub" / "components.png", title="components")
    assert path == tmp_path / "sub" / "components.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    colour = save_component_grid(_weights(4, 3 * 32 * 32), (3, 32, 32), tmp_path / "colour.png")
    assert colour.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_component_cmap_is_diverging():
    cmap = matplotlib.colormaps[COMPONENT_CMAP]
    low, mid, high = (np.array(cmap(v)[:3]) for v in (0.0, 0.5, 1.0))
    assert mid.min() > 0.9  # a light, neutral centre at 0
    assert low[2] > 2 * max(low[0], low[1]) and high[0] > 2 * max(high[1], high[2])  # blue -, red +
    # symmetric in lightness around the centre, darker towards both ends
    lightness = [np.array(cmap(v)[:3]).mean() for v in np.linspace(0, 1, 11)]
    assert max(lightness) == pytest.approx(lightness[5], abs=0.05)
    assert lightness[0] < lightness[5] and lightness[-1] < lightness[5]


def test_plot_uses_the_diverging_map_at_minus_one_to_one():
    fig = component_figure(_weights(9, 64), (8, 8))
    (image,) = fig.axes[0].get_images()
    assert image.get_clim() == (-1, 1)
    assert image.get_cmap().name == COMPONENT_CMAP
    assert figures.COMPONENT_CMAP == "RdBu_r"
    # colour grids are shown with 0 as mid-grey: (grid + 1) / 2 in [0, 1]
    fig = component_figure(_weights(4, 3 * 8 * 8), (3, 8, 8))
    data = np.asarray(fig.axes[0].get_images()[0].get_array())
    assert data.min() >= 0 and data.max() <= 1 and data[8, 0, 0] == 0.5  # a padding pixel


def test_grid_at_k_16384_shows_the_most_used_components_first(tmp_path):
    import time

    k = 16384
    w = torch.randn(k, 64, generator=torch.Generator().manual_seed(1))
    usage = torch.rand(k, generator=torch.Generator().manual_seed(2))
    top = torch.argsort(usage, descending=True)[:256]
    start = time.perf_counter()
    grid = component_grid(w, (8, 8), usage=usage)
    assert time.perf_counter() - start < 5  # 256 tiles, not 16,384
    assert grid.shape == (16 * 9 - 1, 16 * 9 - 1)  # 256 tiles: 16 x 16
    for i, tile in enumerate(_tiles(grid, 256, 8, 8, 16)):
        j = int(top[i])  # tile i is the i-th most used component
        np.testing.assert_allclose(tile, (w[j] / w[j].abs().max()).double().reshape(8, 8).numpy(), atol=1e-12)
    # no usage: the first components; a smaller limit; K under the limit: every component, in order
    first = component_grid(w, (8, 8), max_components=4)
    np.testing.assert_allclose(first, component_grid(w[:4], (8, 8)))
    assert torch.equal(figures.grid_components(10, usage[:10]), torch.arange(10))
    # the saved figure says what it shows
    path = save_component_grid(w, (8, 8), tmp_path / "many.png", title="run", usage=usage)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert component_figure(w, (8, 8), "run", usage).axes[0].get_title() == "run\nthe 256 most used of 16384 components"
