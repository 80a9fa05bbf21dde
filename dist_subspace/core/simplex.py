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


def _seed_hash(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """An int seed (a fill: no host-to-device copy) or per-example seeds ``[B]`` -> hashed, ``[]`` or ``[B]``."""
    if isinstance(seed, torch.Tensor):
        return pcg_hash(seed.to(torch.int64) & _MASK32)
    return pcg_hash(torch.full((), seed & _MASK32, dtype=torch.int64, device=device))


def hashed_uniform(
    seed: int | torch.Tensor, step: torch.Tensor, example_index: torch.Tensor, num_layers: int, num_vertices: int
) -> torch.Tensor:
    """Uniforms in (0, 1): ``[B, num_layers, num_vertices]`` float32, a pure function of the coordinates.

    ``seed``: an int, or ``[B]`` int64 (one seed per example: seed replicas share a batch).
    ``step``: 0-d int64 tensor on the device (never read on the host).
    ``example_index``: ``[B]`` int64, each example's global index in its data set.
    """
    device = example_index.device
    h = _seed_hash(seed, device)
    h = _combine(h, step.to(torch.int64) & _MASK32, _SALT_STEP)  # [] or [B]
    h = _combine(h, example_index.to(torch.int64) & _MASK32, _SALT_EXAMPLE)  # [B]
    layer = torch.arange(num_layers, dtype=torch.int64, device=device)
    vertex = torch.arange(num_vertices, dtype=torch.int64, device=device)
    h = _combine(h[:, None], layer[None, :], _SALT_LAYER)  # [B, L]
    h = _combine(h[:, :, None], vertex[None, None, :], _SALT_VERTEX)  # [B, L, K]
    # The top 24 bits are exact in float32; +0.5 keeps u strictly inside (0, 1) so log(u) is finite.
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample_alpha(
    seed: int | torch.Tensor,
    step: torch.Tensor,
    example_index: torch.Tensor,
    num_vertices: int,
    num_layers: int,
    granularity: str = "example_layer",
) -> torch.Tensor:
    """Dirichlet(1) weights on the simplex: exponential draws, renormalised.

    Returns ``[K]`` for ``batch`` (one point for the whole optimizer step, whatever the split; ``[B, K]``, each
    example its seed's point, when ``seed`` is a ``[B]`` tensor), ``[B, K]`` for ``example`` and ``[B, L, K]``
    for ``example_layer``.
    """
    if granularity == "batch":
        # A fixed pseudo-example: every rank and micro-batch of the step draws the same point (per seed).
        if isinstance(seed, torch.Tensor):
            index = torch.full_like(example_index, _MASK32, dtype=torch.int64)
            u = hashed_uniform(seed, step, index, 1, num_vertices)[:, 0]
        else:
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


def replica_alpha(alpha: torch.Tensor, replica: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """Seed replicas: ``[B, L, K]`` alpha and each example's replica ``[B]`` -> ``[B, L, R * K]``, zero outside
    the example's block, so one einsum over ``[R * K, ...]`` vertices mixes each example from its own replica
    (static shapes, no gather of vertex copies)."""
    block = F.one_hot(replica, num_replicas).to(alpha.dtype)  # [B, R]
    return (block[:, None, :, None] * alpha[:, :, None, :]).flatten(2)


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


REGULARISERS: tuple[str, ...] = ("cos2", "cos2_centred")


def centre(vertices: torch.Tensor, dim: int) -> torch.Tensor:
    """``vertices`` minus their mean over ``dim`` (for prefixes ``[K, L, 2, H_kv, P, D]``, dim=-2: the P
    positions), which removes the component every prefix token of a layer and head shares."""
    return vertices - vertices.mean(dim, keepdim=True)


def pairwise_cos(vertices: torch.Tensor) -> torch.Tensor:
    """cos(v_i, v_j) over pairs i < j of the flattened vertices ``[R, K, *rest]`` -> ``[R, K(K-1)/2]``."""
    k = vertices.shape[1]
    unit = F.normalize(vertices.flatten(2).float(), dim=2)  # [R, K, N]
    cos = unit @ unit.transpose(1, 2)  # [R, K, K]
    i, j = torch.triu_indices(k, k, offset=1, device=vertices.device)
    return cos[:, i, j]


def cosine_regulariser(vertices: torch.Tensor, num_replicas: int = 1, centre_dim: int | None = None) -> torch.Tensor:
    """Mean over pairs i < j of cos^2(v_i, v_j), the vertices flattened; 0-d. Zero for K = 1.

    ``vertices`` ``[R * K, *rest]``: each replica's mean, summed over replicas (replicas are independent runs).
    ``centre_dim``: first centre the vertices over that dim (see :func:`centre`).
    """
    k = vertices.shape[0] // num_replicas
    if k < 2:
        return vertices.sum() * 0.0
    v = centre(vertices, centre_dim) if centre_dim is not None else vertices
    return pairwise_cos(v.view(num_replicas, k, *v.shape[1:])).square().mean(1).sum()


@torch.no_grad()
def diversity(vertices: torch.Tensor, centre_dim: int) -> dict[str, float]:
    """How far apart one replica's vertices ``[K, *rest]`` are: mean pairwise cos^2 (raw and centred over
    ``centre_dim``), mean pairwise Euclidean distance, and the mean vertex norm (the scale of the distance)."""
    k = vertices.shape[0]
    if k < 2:
        return {}
    v = vertices.float()
    flat = v.flatten(1)
    i, j = torch.triu_indices(k, k, offset=1)
    return {
        "cos2": pairwise_cos(v[None]).square().mean().item(),
        "cos2_centred": pairwise_cos(centre(v, centre_dim)[None]).square().mean().item(),
        "distance": (flat[i] - flat[j]).norm(dim=1).mean().item(),
        "norm": flat.norm(dim=1).mean().item(),
    }


def hashed_normal(seed: int | torch.Tensor, step: torch.Tensor, example_index: torch.Tensor, size: int) -> torch.Tensor:
    """Standard normals ``[B, size]`` from the same counter-based hash (Box-Muller on two hashed uniforms per
    element): stateless noise, reproducible on resume and independent of world size, like the alphas."""
    u = hashed_uniform(seed, step, example_index, 2, size)  # [B, 2, size]
    return torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos(2.0 * torch.pi * u[:, 1])


def dirichlet_spread(vertices: torch.Tensor) -> torch.Tensor:
    """Per-layer standard deviation of a prefix element under Dirichlet(1) sampling of ``[K, L, *rest]``
    vertices: ``sqrt(E||mix - centroid||^2 / N)``, with ``E||.||^2 = sum_k ||v_k - mean||^2 / (K (K + 1))``
    (the Dirichlet(1) covariance). ``[L]``: the noise level that matches a K-simplex's spread."""
    k = vertices.shape[0]
    dev = (vertices - vertices.mean(0, keepdim=True)).flatten(2).float()  # [K, L, N]
    return (dev.square().sum((0, 2)) / (k * (k + 1) * dev.shape[2])).sqrt()


def clip_grad_norm_per_replica(params: list[torch.nn.Parameter], replicas: int, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for each replica on its own rows of every parameter (all leading dims
    are replica-major ``[R * K, ...]``); returns the norms before clipping ``[R]``."""
    grads = [p.grad.view(replicas, -1) for p in params if p.grad is not None]
    norms = torch.stack([g.float().square().sum(1) for g in grads]).sum(0).sqrt()  # [R]
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef[:, None].to(g.dtype))
    return norms
