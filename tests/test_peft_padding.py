"""When the exported centroid reproduces the trainer in PEFT: right padding (the trainer's own), the logits read
at each example's last real token. Left padding shifts PEFT's positions by the pads; the trainer's do not move."""

import torch

from dist_subspace.core import simplex
from dist_subspace.core.export import peft_prefix_weight
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel
from tests.conftest import tiny_backbone

P = 4


def _pair():
    from peft import PrefixTuningConfig, get_peft_model

    ours = PrefixSubspaceModel(tiny_backbone("llama"), 1, P, label_token_ids=[5, 6, 7])
    ours.simplex.vertices.data.copy_(initial_vertices(ours, seed=3))
    peft_model = get_peft_model(tiny_backbone("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(peft_prefix_weight(ours.simplex.vertices[0]))
    return ours, peft_model.eval()


def _padded(lengths: list[int], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols], mask[row, cols] = torch.randint(3, 100, (n,)), 1
    return ids, mask


def _peft_last_real(peft_model, ids, mask, words) -> torch.Tensor:
    """The documented usage: right padding, logits at ``attention_mask.sum(-1) - 1``."""
    logits = peft_model(input_ids=ids, attention_mask=mask).logits  # [B, S, V]
    last = mask.sum(-1) - 1
    return logits[torch.arange(len(ids)), last][:, words]


@torch.no_grad()
def test_right_padded_peft_at_the_last_real_token_gives_the_trainers_numbers():
    ours, peft_model = _pair()
    ids, mask = _padded([6, 3, 5], "right")
    want = ours(ids, mask, simplex.centroid_alpha(1))
    got = _peft_last_real(peft_model, ids, mask, ours.label_token_ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    left_ids, left_mask = _padded([6, 3, 5], "left")  # the same rows padded on the left: the trainer is unmoved
    torch.testing.assert_close(ours(left_ids, left_mask, simplex.centroid_alpha(1)), want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padded_peft_counts_the_pads_in_its_positions():
    ours, peft_model = _pair()
    ids, mask = _padded([6, 3, 5], "left")
    want = ours(ids, mask, simplex.centroid_alpha(1))
    got = peft_model(input_ids=ids, attention_mask=mask).logits[:, -1][:, ours.label_token_ids]
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)  # the unpadded row agrees
    assert not torch.allclose(got[1], want[1], atol=1e-4)  # 3 pads: PEFT's positions start 3 later
    # PEFT's prompt-learning forward drops position_ids, so no argument fixes this: pad on the right.
