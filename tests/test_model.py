"""The prefix simplex injected into tiny models of every supported family."""

import pytest
import torch
import torch.nn.functional as F

from dist_subspace.core import mpnet, simplex
from dist_subspace.core.arch import ArchSpec, arch_spec, input_position_ids
from dist_subspace.core.export import peft_prefix_weight
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel, prefix_cache
from tests.conftest import DECODER_CONFIGS, ENCODER_CONFIGS, WINDOW, tiny_backbone

FAMILIES = [*DECODER_CONFIGS, *ENCODER_CONFIGS]
P = 4


def make(family: str, k: int = 3, init: str = "activations", seed: int = 0) -> PrefixSubspaceModel:
    backbone = tiny_backbone(family)
    if family in DECODER_CONFIGS:
        model = PrefixSubspaceModel(backbone, k, P, label_token_ids=[5, 6, 7])
    else:
        model = PrefixSubspaceModel(backbone, k, P, num_outputs=3)
    model.simplex.vertices.data.copy_(initial_vertices(model, init, seed=seed))
    return model


def random_alpha(model, batch: int, step: int = 0):
    return model.sample_alpha(torch.tensor(step), torch.arange(batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_every_family(family, batch):
    ids, mask = batch
    model = make(family)
    logits = model(ids, mask, random_alpha(model, len(ids)))
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert model.simplex.vertices.grad.abs().sum() > 0


def test_k1_equals_peft_prefix_tuning():
    from peft import PrefixTuningConfig, get_peft_model

    model = make("llama", k=1)
    ids = torch.randint(3, 100, (2, 5))
    mask = torch.ones_like(ids)
    ours = model(ids, mask, simplex.centroid_alpha(1))
    peft_model = get_peft_model(tiny_backbone("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(peft_prefix_weight(model.simplex.vertices[0]))
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits[:, -1, model.label_token_ids]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_vertices_equal_a_single_prefix_whatever_alpha(family, batch):
    ids, mask = batch
    single = make(family, k=1)
    triple = make(family, k=3)
    triple.simplex.vertices.data.copy_(single.simplex.vertices.data.expand(3, *single.simplex.vertices.shape[1:]))
    if triple.simplex.head is not None:
        for name in ("weight", "bias"):
            one = getattr(single.simplex.head, name).data
            getattr(triple.simplex.head, name).data.copy_(one.expand(3, *one.shape[1:]))
    want = single(ids, mask, simplex.centroid_alpha(1))
    for step in range(3):
        torch.testing.assert_close(triple(ids, mask, random_alpha(triple, 3, step)), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_vertex_i_equals_k1_with_that_vertex(family, batch):
    ids, mask = batch
    triple = make(family, k=3)
    single = make(family, k=1)
    single.simplex.vertices.data.copy_(triple.simplex.vertices.data[2:3])
    if triple.simplex.head is not None:
        single.simplex.head.weight.data.copy_(triple.simplex.head.weight.data[2:3])
        single.simplex.head.bias.data.copy_(triple.simplex.head.bias.data[2:3])
    torch.testing.assert_close(
        triple(ids, mask, simplex.vertex_alpha(3, 2)),
        single(ids, mask, simplex.centroid_alpha(1)),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("family", list(DECODER_CONFIGS))
def test_decoder_prefix_cache_equals_prepending_its_tokens(family):
    """A vertex initialised from P tokens' activations acts exactly like those tokens written before the input
    (within a sliding window: past it, see tests/test_families.py)."""
    model = make(family, k=1)
    prefix_tokens = torch.randint(3, 100, (1, P))
    model.simplex.vertices.data.copy_(model.kv_activations(prefix_tokens))
    ids = torch.randint(3, 100, (2, WINDOW - P))
    ours = model(ids, torch.ones_like(ids), simplex.centroid_alpha(1))
    joint = torch.cat([prefix_tokens.expand(2, -1), ids], dim=1)
    theirs = model.backbone(input_ids=joint).logits[:, -1, model.label_token_ids]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(ENCODER_CONFIGS))
def test_masked_out_prefix_leaves_encoder_unchanged(family, batch):
    ids, mask = batch
    model = make(family, k=1, init="normal", seed=3)
    spec = arch_spec(model.config)
    pos = input_position_ids(spec, mask, P, model.config)
    prefix = model.prefix(simplex.centroid_alpha(1), len(ids)) * 10

    def with_prefix(visible: int):
        prefix_mask = torch.full((3, P), visible, dtype=mask.dtype)
        if spec.injection == "attention":  # MPNet: no cache; the prefix mask goes to its attention (core/mpnet.py)
            with mpnet.prefixed(model.backbone, prefix, prefix_mask.bool()):
                return model.backbone(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        return model.backbone(
            input_ids=ids,
            attention_mask=torch.cat([prefix_mask, mask], 1),
            position_ids=pos,
            cache=prefix_cache(prefix),
        ).last_hidden_state

    plain = model.backbone(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    torch.testing.assert_close(with_prefix(0), plain, atol=1e-5, rtol=1e-4)
    shown = with_prefix(1)
    assert not torch.allclose(shown, plain, atol=1e-3)


def test_roberta_positions_follow_padding_offset():
    mask = torch.tensor([[1, 1, 1, 0]])
    config = ENCODER_CONFIGS["roberta"]()
    pos = input_position_ids(ArchSpec("encoder", "padding_offset"), mask, P, config)
    assert pos.tolist() == [[2, 3, 4, 1]]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_only_the_simplex_trains_and_the_backbone_stays_bit_identical(family, batch):
    ids, mask = batch
    model = make(family)
    model.train()
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"simplex.{n}" for n, _ in model.simplex.named_parameters()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    vertices0 = model.simplex.vertices.detach().clone()
    for step in range(3):
        loss = F.cross_entropy(model(ids, mask, random_alpha(model, 3, step)), torch.tensor([0, 1, 2]))
        (loss + model.regulariser()).backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        opt.step()
        opt.zero_grad()
    for n, p in model.backbone.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not torch.equal(model.simplex.vertices, vertices0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "bert"])
def test_gradient_checkpointing_gives_the_same_vertex_gradients(family, batch):
    ids, mask = batch
    grads = []
    for checkpointing in (False, True):
        model = make(family)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        calls: list[int] = []
        inner = (
            model.backbone.base_model.layers[0].mlp
            if family != "bert"
            else model.backbone.encoder.layer[0].intermediate
        )
        hook = inner.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))  # pre: recompute stops early
        model(ids, mask, random_alpha(model, 3)).square().sum().backward()
        hook.remove()
        assert len(calls) == (2 if checkpointing else 1)  # really recomputed in backward
        grads.append(model.simplex.vertices.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_prefix_follows_bf16_compute_dtype(batch):
    """bf16 backbone, fp32 master vertices: logits and vertex gradients stay within bf16's precision of fp32
    (8 mantissa bits; measured here 0.3 % on logits and 0.7 % on the gradient; bounded at 5 %)."""
    ids, mask = batch
    model = make("llama")
    alpha = random_alpha(model, 3)
    want = model(ids, mask, alpha)
    want.square().sum().backward()
    want_grad = model.simplex.vertices.grad.clone()
    model.simplex.vertices.grad = None
    model.backbone.to(torch.bfloat16)
    assert model.simplex.vertices.dtype == torch.float32  # fp32 master weights
    assert model.prefix(alpha, 3).dtype == torch.bfloat16
    logits = model(ids, mask, alpha)
    logits.square().sum().backward()
    assert model.simplex.vertices.grad.dtype == torch.float32
    scale = want.abs().max()
    assert (logits - want).abs().max() < 0.05 * scale
    grad = model.simplex.vertices.grad
    assert (grad - want_grad).norm() < 0.05 * want_grad.norm()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vertices_start_independent(seed):
    """Activations of different random tokens: pairwise cos^2 0.003-0.03 on the tiny Llama (seeds 0-2), far
    from the 1.0 of a shared start (the regulariser's value for copies of one vertex)."""
    model = make("llama", k=3, seed=seed)
    assert model.regulariser().item() < 0.1
    v = model.simplex.vertices.data
    assert simplex.cosine_regulariser(v[:1].expand(3, *v.shape[1:])).item() == pytest.approx(1.0)


def test_unsupported_family_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match=r"not supported.*arch\.py"):
        PrefixSubspaceModel(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), 2, 4, label_token_ids=[1])


def test_encoder_uses_segment_ids_for_pairs(batch):
    ids, mask = batch
    model = make("bert")
    alpha = simplex.centroid_alpha(3)
    first = model(ids, mask, alpha, torch.zeros_like(ids))
    pair = model(ids, mask, alpha, (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids))
    torch.testing.assert_close(model(ids, mask, alpha), first)  # no segment ids = all first segment
    assert not torch.allclose(first, pair, atol=1e-4)
