"""The metric over the simplex: points to evaluate at, and plots of the results.

Plain torch for the points; matplotlib (object API on the Agg canvas: no pyplot, no global backend switch) is
imported only inside the plotting functions, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

# Corners of the equilateral triangle: v0 bottom left, v1 bottom right, v2 top.
_CORNERS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])  # [3, 2]


def triangle_grid(resolution: int) -> torch.Tensor:
    """Barycentric points ``[G, 3]`` covering the triangle: every ``(i, j, k) / n`` with ``i + j + k = n``.

    Includes the three vertices, and the centroid (appended last when ``n`` is not a multiple of 3).
    ``G = (n + 1)(n + 2) / 2``, plus one when the centroid is appended.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1 (got {resolution})")
    n = resolution
    points = [(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)]
    if n % 3:
        points.append((1 / 3, 1 / 3, 1 / 3))
    return torch.tensor(points, dtype=torch.float32)


def segment_points(num_vertices: int, steps: int) -> torch.Tensor:
    """alpha ``[K, steps, K]`` along each vertex-to-centroid segment: ``(1 - t) e_k + t / K`` for
    ``t = torch.linspace(0, 1, steps)``; ``t = 0`` is vertex k, ``t = 1`` the centroid."""
    if num_vertices < 1 or steps < 2:
        raise ValueError(f"need num_vertices >= 1 and steps >= 2 (got {num_vertices}, {steps})")
    t = torch.linspace(0, 1, steps)[None, :, None]  # [1, steps, 1]
    vertices = torch.eye(num_vertices)[:, None, :]  # [K, 1, K]
    return (1 - t) * vertices + t / num_vertices  # [K, steps, K]


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_triangle(
    points: torch.Tensor, values: torch.Tensor, path: str | Path, title: str = "", metric_name: str = "metric"
) -> Path:
    """A heatmap PNG of ``values`` ``[G]`` at barycentric ``points`` ``[G, 3]`` (e.g. :func:`triangle_grid`)
    on the equilateral triangle, vertices labelled v0/v1/v2 and the centroid marked. Returns ``path``."""
    from matplotlib.tri import Triangulation

    points, values = torch.as_tensor(points, dtype=torch.float32), torch.as_tensor(values, dtype=torch.float32)
    if points.dim() != 2 or points.shape[1] != 3 or values.shape != points.shape[:1]:
        raise ValueError(f"need points [G, 3] and values [G]; got {tuple(points.shape)} and {tuple(values.shape)}")
    xy = points @ _CORNERS  # [G, 2]
    fig = _figure()
    ax = fig.add_subplot()
    mesh = ax.tripcolor(Triangulation(xy[:, 0].numpy(), xy[:, 1].numpy()), values.numpy(), shading="gouraud")
    fig.colorbar(mesh, ax=ax, label=metric_name)
    ax.plot(*_CORNERS[[0, 1, 2, 0]].T.numpy(), color="black", linewidth=1)
    for k, (x, y) in enumerate(_CORNERS.tolist()):
        ax.annotate(f"v{k}", (x, y), xytext=(0, 10 if k == 2 else -14), textcoords="offset points", ha="center")
    centroid = _CORNERS.mean(dim=0).tolist()
    ax.plot(*centroid, marker="*", markersize=12, color="white", markeredgecolor="black", label="centroid")
    best = int(values.argmax())  # highest value (metrics here are higher-is-better)
    ax.plot(*xy[best].tolist(), marker="o", color="red", markeredgecolor="black", label=f"max {values[best]:.4g}")
    ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)  # over the whole figure: clear of the v2 label and the colour bar
    ax.set_aspect("equal")
    ax.set_axis_off()
    return _save(fig, path)


def plot_segments(
    ts: torch.Tensor, values: torch.Tensor, path: str | Path, title: str = "", metric_name: str = "metric"
) -> Path:
    """One line per vertex: ``values`` ``[K, steps]`` against ``ts`` ``[steps]`` (0 = the vertex, 1 = the
    centroid), e.g. evaluated at :func:`segment_points`. Returns ``path``."""
    ts, values = torch.as_tensor(ts, dtype=torch.float32), torch.as_tensor(values, dtype=torch.float32)
    if values.dim() != 2 or ts.shape != values.shape[1:]:
        raise ValueError(f"need ts [steps] and values [K, steps]; got {tuple(ts.shape)} and {tuple(values.shape)}")
    fig = _figure()
    ax = fig.add_subplot()
    for k, row in enumerate(values):
        ax.plot(ts.numpy(), row.numpy(), marker=".", label=f"v{k}")
    ax.set_xlabel("t  (0 = vertex, 1 = centroid)")
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
