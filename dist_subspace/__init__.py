"""Prefix subspaces: a simplex of K prefixes over a frozen transformers model (see README.md)."""

from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSimplex, PrefixSubspaceModel, SimplexHead, prefix_cache
from dist_subspace.core.simplex import (
    centroid_alpha,
    cosine_regulariser,
    expand_alpha,
    mix,
    mix_prefix,
    sample_alpha,
    vertex_alpha,
)

__all__ = [
    "PrefixSimplex",
    "PrefixSubspaceModel",
    "SimplexHead",
    "centroid_alpha",
    "cosine_regulariser",
    "expand_alpha",
    "initial_vertices",
    "mix",
    "mix_prefix",
    "prefix_cache",
    "sample_alpha",
    "vertex_alpha",
]
