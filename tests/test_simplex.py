"""The simplex math: sampler statistics and invariances, mixing, regulariser."""

import pytest
import torch

from dist_subspace.core import simplex


def _alpha(step: int, index, k: int = 3, layers: int = 4, granularity: str = "example_layer", seed: int = 0):
    return simplex.sample_alpha(seed, torch.tensor(step), torch.as_tensor(index), k, layers, granularity)


@pytest.mark.parametrize(("granularity", "shape"), [("batch", (5,)), ("example", (6, 5)), ("example_layer", (6, 4, 5))])
def test_alpha_on_simplex_with_static_shape(granularity, shape):
    a = _alpha(7, torch.arange(6), k=5, granularity=granularity)
    assert a.shape == shape and a.dtype == torch.float32
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(shape[:-1]))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_dirichlet_one_moments(k):
    a = _alpha(1, torch.arange(25_000), k=k, layers=4).reshape(-1, k)  # 100k draws
    torch.testing.assert_close(a.mean(0), torch.full((k,), 1 / k), atol=4e-3, rtol=0)
    var = (k - 1) / (k**2 * (k + 1))
    torch.testing.assert_close(a.var(0), torch.full((k,), var), atol=0.05 * var, rtol=0)
    # Dirichlet(1) marginal is Beta(1, K-1): P(alpha_0 < x) = 1 - (1 - x)^(K-1)
    for x in (0.1, 0.3, 0.5):
        assert abs((a[:, 0] < x).float().mean().item() - (1 - (1 - x) ** (k - 1))) < 0.01


def test_independent_across_examples_layers_and_steps():
    a = _alpha(3, torch.arange(20_000), k=2, layers=3)[..., 0]  # [B, L]
    corr = torch.corrcoef(a.T)  # layers against each other
    assert (corr - torch.eye(3)).abs().max() < 0.03
    assert abs(torch.corrcoef(torch.stack([a[:-1, 0], a[1:, 0]]))[0, 1]) < 0.03  # neighbouring examples
    b = _alpha(4, torch.arange(20_000), k=2, layers=3)[..., 0]
    assert abs(torch.corrcoef(torch.stack([a[:, 0], b[:, 0]]))[0, 1]) < 0.03  # consecutive steps


def test_alpha_depends_only_on_seed_step_and_example_index():
    full = _alpha(11, torch.arange(16))
    perm = torch.randperm(16)
    torch.testing.assert_close(_alpha(11, perm), full[perm], rtol=0, atol=0)  # order / batch composition
    torch.testing.assert_close(_alpha(11, torch.arange(8, 16)), full[8:], rtol=0, atol=0)  # micro-batch split
    assert not torch.equal(_alpha(12, torch.arange(16)), full)
    assert not torch.equal(_alpha(11, torch.arange(16), seed=1), full)


def test_batch_granularity_is_one_point_per_step():
    torch.testing.assert_close(_alpha(5, [0, 1], granularity="batch"), _alpha(5, [9], granularity="batch"))


def test_sampler_compiles_fullgraph_without_graph_breaks():
    compiled = torch.compile(simplex.sample_alpha, fullgraph=True, dynamic=False)
    step = torch.tensor(2)
    got = compiled(0, step, torch.arange(4), 3, 5, "example_layer")
    torch.testing.assert_close(got, _alpha(2, torch.arange(4), k=3, layers=5), atol=1e-6, rtol=1e-5)
    step += 1  # the step is a device tensor: advancing it in place needs no recompile and changes alpha
    assert not torch.equal(compiled(0, step, torch.arange(4), 3, 5, "example_layer"), got)


def test_mix_prefix_is_convex_combination():
    v = torch.randn(3, 2, 2, 1, 4, 5)  # [K, L, 2, H, P, D]
    alpha = _alpha(0, torch.arange(6), k=3, layers=2)  # [B, L, K]
    mixed = simplex.mix_prefix(v, alpha)
    assert mixed.shape == (6, 2, 2, 1, 4, 5)
    expected = sum(alpha[1, 1, k] * v[k, 1] for k in range(3))
    torch.testing.assert_close(mixed[1, 1], expected)
    vertex = simplex.expand_alpha(simplex.vertex_alpha(3, 2), 6, 2)
    torch.testing.assert_close(simplex.mix_prefix(v, vertex), v[2].expand(6, *v.shape[1:]))
    centre = simplex.expand_alpha(simplex.centroid_alpha(3), 6, 2)
    torch.testing.assert_close(simplex.mix_prefix(v, centre)[0], v.mean(0))


def test_regulariser():
    e = torch.eye(4).reshape(4, 2, 2)
    assert simplex.cosine_regulariser(e).item() == 0.0  # orthogonal vertices
    same = torch.randn(1, 8).expand(3, 8)
    torch.testing.assert_close(simplex.cosine_regulariser(same), torch.tensor(1.0))
    assert simplex.cosine_regulariser(torch.randn(1, 8)).item() == 0.0  # K = 1: nothing to push apart
    v = torch.randn(3, 10)
    cos = torch.nn.functional.cosine_similarity
    want = (cos(v[0], v[1], 0) ** 2 + cos(v[0], v[2], 0) ** 2 + cos(v[1], v[2], 0) ** 2) / 3
    torch.testing.assert_close(simplex.cosine_regulariser(v), want)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="granularity"):
        _alpha(0, [0], granularity="token")
    with pytest.raises(ValueError, match="out of range"):
        simplex.vertex_alpha(3, 3)
