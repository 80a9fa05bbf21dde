"""The real embedded models (SmolLM2-135M, MiniLM-L6) with K = 3 on real labelled snippets."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from dist_subspace.core.embedded import resolve_model
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.data.batching import Collator, label_token_ids
from dist_subspace.data.sources import load_splits

pytestmark = pytest.mark.slow


def _steps(model, batch, steps=6, lr=3e-2):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        alpha = model.sample_alpha(torch.tensor(step), batch["index"])
        loss = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"], alpha), batch["labels"])
        (loss + model.regulariser()).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def snippets():
    return load_splits("rotten_tomatoes", shots_per_class=4, seed=0, test_size=0)


def test_smollm2_k3_trains_on_real_snippets(snippets):
    path = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = AutoModelForCausalLM.from_pretrained(path)
    assert backbone.config.num_attention_heads == 9 and backbone.config.num_key_value_heads == 3  # GQA
    ids = label_token_ids(tokenizer, snippets.task.label_words)
    model = PrefixSubspaceModel(backbone, 3, 8, label_token_ids=ids)
    model.simplex.vertices.data.copy_(initial_vertices(model, exclude_token_ids=tokenizer.all_special_ids))
    assert model.simplex.vertices.shape == (3, 30, 2, 3, 8, 64)
    batch = Collator(tokenizer, snippets.task, decoder=True)(list(enumerate(snippets.train)))
    losses = _steps(model, batch)
    assert losses[-1] < losses[0] - 0.05, losses


def test_minilm_k3_trains_on_real_snippets(snippets):
    path = resolve_model("minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = PrefixSubspaceModel(AutoModel.from_pretrained(path), 3, 8, num_outputs=2)
    model.simplex.vertices.data.copy_(initial_vertices(model, exclude_token_ids=tokenizer.all_special_ids))
    batch = Collator(tokenizer, snippets.task, decoder=False)(list(enumerate(snippets.train)))
    losses = _steps(model, batch)
    assert losses[-1] < losses[0] - 0.05, losses
