"""The prefix-subspace math: counter-based Dirichlet(1) sampling, mixing, the regulariser.

Pure torch. Nothing here knows about transformers, accelerate or deepspeed; alpha is always passed in.

Shapes: K vertices, L layers, B examples. Vertices are ``[K, *rest]``; for prefixes
``rest = (L, 2, H_kv, P, D)``.

The sampler is *stateless*: the uniforms behind every draw are a hash of
(seed, optimizer step, global example index, layer, vertex) computed with int64 tensor ops. So the weights
an example gets do not depend on world size, micro-batch split, accumulation or order; resume needs no
RNG state; and the sampler is one static-shape graph (no host sync, no ``torch.distributions``) that
``torch.compile(fullgraph=True)`` and CUDA graphs accept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRANULARITIES: tuple[str, ...] = ("batch", "example", "example_layer")

_MASK32 = 0xFFFFFFFF
# One odd salt per hashed coordinate, so that (step=1, example=2) and (step=2, example=1) differ.
_SALT_STEP, _SALT_EXAMPLE, _SALT_LAYER, _SALT_VERTEX = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F


def pcg_hash(x: torch.Tensor) -> torch.Tensor:
    """PCG-RXS-M-XS 32-bit hash, elementwise, on int64 values in [0, 2**32); same shape out.

    Every product is (< 2**32) * (< 2**31), so int64 never overflows (no UB in compiled C++/CUDA).
    """
    state = (x * 747796405 + 2891336453) & _MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _MASK32
    return ((word >> 22) ^ word) & _MASK32


def _combine(h: torch.Tensor, value: torch.Tensor, salt: int) -> torch.Tensor:
    return pcg_hash(h ^ pcg_hash((value + salt) & _MASK32))


def hashed_uniform(
    seed: int, step: torch.Tensor, example_index: torch.Tensor, num_layers: int, num_vertices: int
) -> torch.Tensor:
    """Uniforms in (0, 1): ``[B, num_layers, num_vertices]`` float32, a pure function of the coordinates.

    ``step``: 0-d int64 tensor on the device (never read on the host).
    ``example_index``: ``[B]`` int64, each example's global index in its data set.
    """
    device = example_index.device
    h = pcg_hash(torch.full((), seed & _MASK32, dtype=torch.int64, device=device))  # a fill: no host-to-device copy
    h = _combine(h, step.to(torch.int64) & _MASK32, _SALT_STEP)  # []
    h = _combine(h, example_index.to(torch.int64) & _MASK32, _SALT_EXAMPLE)  # [B]
    layer = torch.arange(num_layers, dtype=torch.int64, device=device)
    vertex = torch.arange(num_vertices, dtype=torch.int64, device=device)
    h = _combine(h[:, None], layer[None, :], _SALT_LAYER)  # [B, L]
    h = _combine(h[:, :, None], vertex[None, None, :], _SALT_VERTEX)  # [B, L, K]
    # The top 24 bits are exact in float32; +0.5 keeps u strictly inside (0, 1) so log(u) is finite.
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample_alpha(
    seed: int,
    step: torch.Tensor,
    example_index: torch.Tensor,
    num_vertices: int,
    num_layers: int,
    granularity: str = "example_layer",
) -> torch.Tensor:
    """Dirichlet(1) weights on the simplex: exponential draws, renormalised.

    Returns ``[K]`` for ``batch`` (one point for the whole optimizer step, whatever the split),
    ``[B, K]`` for ``example`` and ``[B, L, K]`` for ``example_layer``.
    """
    if granularity == "batch":
        # A fixed pseudo-example: every rank and micro-batch of the step draws the same point.
        index = torch.full((1,), _MASK32, dtype=torch.int64, device=example_index.device)
        u = hashed_uniform(seed, step, index, 1, num_vertices)[0, 0]
    elif granularity == "example":
        u = hashed_uniform(seed, step, example_index, 1, num_vertices)[:, 0]
    elif granularity == "example_layer":
        u = hashed_uniform(seed, step, example_index, num_layers, num_vertices)
    else:
        raise ValueError(f"unknown sampling granularity {granularity!r}; use one of {GRANULARITIES}")
    e = -torch.log(u)  # Exp(1)
    return e / e.sum(-1, keepdim=True)


def centroid_alpha(num_vertices: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The centre of the simplex: ``[K]`` filled with 1/K."""
    return torch.full((num_vertices,), 1.0 / num_vertices, device=device)


def vertex_alpha(num_vertices: int, index: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A corner of the simplex: ``[K]`` one-hot at ``index``."""
    if not 0 <= index < num_vertices:
        raise ValueError(f"vertex index {index} out of range for K={num_vertices}; use 0..{num_vertices - 1}")
    return F.one_hot(torch.tensor(index, device=device), num_vertices).float()


def expand_alpha(alpha: torch.Tensor, batch: int, num_layers: int) -> torch.Tensor:
    """Broadcast ``[K]``, ``[B, K]`` or ``[B, L, K]`` to ``[B, L, K]`` (a view, no copy)."""
    if alpha.dim() == 1:
        return alpha.expand(batch, num_layers, -1)
    if alpha.dim() == 2:
        return alpha[:, None, :].expand(-1, num_layers, -1)
    if alpha.dim() == 3:
        return alpha
    raise ValueError(f"alpha must be [K], [B, K] or [B, L, K]; got shape {tuple(alpha.shape)}")


def mix_prefix(vertices: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per-example, per-layer convex combination of the vertices.

    vertices ``[K, L, *rest]``, alpha ``[B, L, K]`` -> prefix ``[B, L, *rest]``.
    """
    flat = vertices.flatten(2)  # [K, L, N]
    mixed = torch.einsum("blk,kln->bln", alpha.to(flat.dtype), flat)
    return mixed.view(alpha.shape[0], *vertices.shape[1:])


def mix(vertices: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Convex combination over the leading vertex axis: ``[K, *rest]`` with ``[B, K]`` -> ``[B, *rest]``."""
    return torch.einsum("bk,kn->bn", alpha.to(vertices.dtype), vertices.flatten(1)).view(
        alpha.shape[0], *vertices.shape[1:]
    )


def cosine_regulariser(vertices: torch.Tensor) -> torch.Tensor:
    """Mean over pairs i < j of cos^2(v_i, v_j), the vertices flattened; 0-d. Zero for K = 1."""
    k = vertices.shape[0]
    if k < 2:
        return vertices.sum() * 0.0
    unit = F.normalize(vertices.flatten(1).float(), dim=1)  # [K, N]
    cos = unit @ unit.T  # [K, K]
    i, j = torch.triu_indices(k, k, offset=1, device=vertices.device)
    return cos[i, j].square().mean()
