"""Simplex grids and segments, and the PNGs drawn from them."""

import pytest
import torch

from dist_subspace.evaluation.landscape import plot_segments, plot_triangle, segment_points, triangle_grid

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("resolution", [1, 3, 8])
def test_triangle_grid_covers_simplex(resolution):
    grid = triangle_grid(resolution)
    n = resolution
    assert grid.shape == ((n + 1) * (n + 2) // 2 + (n % 3 != 0), 3)
    torch.testing.assert_close(grid.sum(dim=1), torch.ones(len(grid)))
    assert (grid >= 0).all()
    rows = {tuple(round(v, 6) for v in p) for p in grid.tolist()}
    assert {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)} <= rows
    assert (round(1 / 3, 6),) * 3 in rows
    assert len(rows) == len(grid)  # no duplicates


def test_segment_points():
    alpha = segment_points(4, 5)
    assert alpha.shape == (4, 5, 4)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(4, 5))
    torch.testing.assert_close(alpha[:, 0], torch.eye(4))  # t = 0: the vertices
    torch.testing.assert_close(alpha[:, -1], torch.full((4, 4), 0.25))  # t = 1: the centroid


def test_plot_triangle_writes_png(tmp_path):
    grid = triangle_grid(6)
    values = 1 - (grid - 1 / 3).norm(dim=1)  # peaks at the centroid
    path = plot_triangle(grid, values, tmp_path / "sub" / "landscape.png", "dev accuracy", "accuracy")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000
    with pytest.raises(ValueError, match=r"points \[G, 3\]"):
        plot_triangle(grid[:, :2], values, tmp_path / "bad.png")


def test_plot_segments_writes_png(tmp_path):
    steps = 7
    ts = torch.linspace(0, 1, steps)
    values = torch.rand(4, steps)  # K = 4
    path = plot_segments(ts, values, tmp_path / "segments.png", "vertex to centroid", "accuracy")
    assert path.read_bytes()[:8] == PNG
