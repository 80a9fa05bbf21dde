"""The families beyond Llama: Gemma 2/3 (sliding windows, head_dim from the config, one key/value head), Phi-3
(fused qkv), GPT-NeoX (partial rotary), Mixtral and Qwen2-MoE (experts), and the refusals (DeBERTa-v2); MPNet's
2-process ZeRO-3 run rides in the same launch (its own checks: tests/test_mpnet.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, DebertaV2Config, DebertaV2Model, GPT2Config, GPT2LMHeadModel

from dist_subspace.core import simplex
from dist_subspace.core.arch import prefix_geometry, sliding_window
from dist_subspace.core.export import peft_prefix_config, peft_prefix_weight
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel, prefix_cache
from tests import zero3_checks
from tests.conftest import DECODER_CONFIGS, WINDOW, run_args, tiny_backbone

NEW_FAMILIES = ["gemma2", "gemma3_text", "phi3", "gpt_neox", "mixtral", "qwen2_moe"]
WINDOWED = [f for f in NEW_FAMILIES if sliding_window(DECODER_CONFIGS[f]()) is not None]
P = 4


def make(family: str, k: int = 1, seed: int = 0) -> PrefixSubspaceModel:
    model = PrefixSubspaceModel(tiny_backbone(family), k, P, label_token_ids=[5, 6, 7])
    model.simplex.vertices.data.copy_(initial_vertices(model, seed=seed))
    return model


def test_the_windowed_families_really_have_windows():
    assert WINDOWED == ["gemma2", "gemma3_text", "phi3"]


def test_gemma_geometry_reads_head_dim_and_one_kv_head_from_the_config():
    for family in ("gemma2", "gemma3_text"):
        g = prefix_geometry(DECODER_CONFIGS[family]())
        assert (g.num_layers, g.num_kv_heads, g.head_dim) == (2, 1, 16)  # hidden / heads would be 8


def reference_mask(config, prefix_length: int, seq: int, dtype: torch.dtype):
    """Hand-written masks over P prefix tokens + S input tokens written out: causal, the sliding layers
    limited to the window among positions *except* that every query sees the prefix. Float, [1, 1, P+S, P+S]."""
    n = prefix_length + seq
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    causal = kv <= q
    sliding = causal & ((kv < prefix_length) | (q - kv < config.sliding_window))

    def additive(allowed):
        return torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    if getattr(config, "layer_types", None) is None:
        return additive(sliding)
    return {"full_attention": additive(causal), "sliding_attention": additive(sliding)}


@pytest.mark.parametrize("family", WINDOWED)
def test_prefix_stays_visible_past_the_window(family):
    """S + P = 18 > window 8: the prefix (as P tokens' own keys/values) acts exactly like those tokens written
    before the input under masks that keep them visible to every query; transformers' own sliding mask would
    hide them from the later queries, and does change the answer."""
    model = make(family)
    prefix_tokens = torch.randint(3, 100, (1, P))
    model.simplex.vertices.data.copy_(model.kv_activations(prefix_tokens))
    seq = 14
    ids = torch.randint(3, 100, (2, seq))
    ours = model(ids, torch.ones_like(ids), simplex.centroid_alpha(1))
    joint = torch.cat([prefix_tokens.expand(2, -1), ids], dim=1)
    mask = reference_mask(model.config, P, seq, torch.float32)
    theirs = model.backbone(input_ids=joint, attention_mask=mask).logits[:, -1, model.label_token_ids]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    cut = model.backbone(
        input_ids=ids,
        attention_mask=torch.ones(2, P + seq, dtype=torch.long),
        cache=prefix_cache(model.prefix(simplex.centroid_alpha(1), 2)),
        position_ids=torch.arange(P, P + seq).expand(2, -1),
    ).logits[:, -1, model.label_token_ids]
    assert not torch.allclose(cut, theirs, atol=1e-4)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_k1_equals_peft_prefix_tuning_with_our_exported_config(family):
    """K = 1 is PEFT prefix tuning, with the adapter config our export writes (head_dim and key/value heads from
    the config). Inputs shorter than the window: PEFT lets the window cut the prefix beyond it, we do not."""
    from peft import PrefixTuningConfig, get_peft_model

    model = make(family, k=1)
    ids = torch.randint(3, 100, (2, 4))
    assert ids.shape[1] + P <= WINDOW
    mask = torch.ones_like(ids)
    mask[1, 0] = 0  # left padding
    ours = model(ids, mask, simplex.centroid_alpha(1))
    exported = peft_prefix_config(model.geometry, P, family)
    keys = ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim", "num_transformer_submodules")
    peft_model = get_peft_model(
        tiny_backbone(family), PrefixTuningConfig(task_type="CAUSAL_LM", **{k: exported[k] for k in keys})
    )
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(peft_prefix_weight(model.simplex.vertices[0]))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # PEFT shifts them by P itself
    theirs = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(ours, theirs[:, model.label_token_ids], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "mixtral"])
def test_gradient_checkpointing_gives_the_same_vertex_gradients(family, batch):
    ids, mask = batch
    ids = torch.cat([ids, ids], dim=1)  # 12 tokens + P: past the window
    mask = torch.cat([mask, torch.ones_like(mask)], dim=1)
    grads = []
    for checkpointing in (False, True):
        model = make(family, k=3)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        model(ids, mask, model.sample_alpha(torch.tensor(0), torch.arange(3))).square().sum().backward()
        grads.append(model.simplex.vertices.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_experts_stay_frozen(family, batch):
    ids, mask = batch
    model = make(family, k=3)
    experts = [n for n, _ in model.backbone.named_parameters() if "experts" in n]
    assert experts and not any(p.requires_grad for p in model.backbone.parameters())
    model(ids, mask, model.sample_alpha(torch.tensor(0), torch.arange(3))).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.simplex.vertices.grad.abs().sum() > 0


def test_flash_attention_with_a_window_is_refused_only_where_it_would_hide_the_prefix():
    model = make("phi3")
    model.config._attn_implementation = "flash_attention_2"  # checked before any kernel is called
    short = torch.randint(3, 100, (1, WINDOW - P))
    with pytest.raises(ValueError, match="hide the prefix"):
        model(torch.randint(3, 100, (1, WINDOW)), torch.ones(1, WINDOW, dtype=torch.long), simplex.centroid_alpha(1))
    model.config._attn_implementation = "sdpa"
    model(short, torch.ones_like(short), simplex.centroid_alpha(1))


def test_deberta_v2_is_refused_with_the_reason():
    config = DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"^model type 'deberta-v2' is not supported: .*no key/value cache"):
        PrefixSubspaceModel(DebertaV2Model(config), 2, P, num_outputs=2)


def test_unknown_family_names_its_model_type_and_what_is_missing():
    with pytest.raises(ValueError, match=r"'gpt2' is not supported: no row for it in .*ARCHITECTURES") as err:
        PrefixSubspaceModel(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), 2, P, label_token_ids=[1])
    assert "\n" not in str(err.value)


def test_every_new_family_loads_through_the_auto_class(tmp_path):
    """What the trainer does: save, then from_pretrained with the Auto class (the config's model_type picks it)."""
    for family in NEW_FAMILIES:
        tiny_backbone(family).save_pretrained(tmp_path / family)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / family)
        assert loaded.config.model_type == family


# ---- K = 3 under 2-process ZeRO-3, launched as 2 nodes x 1 process through the multi-node Accelerate YAML ----------
@pytest.fixture(scope="module")
def zero3_families(tmp_path_factory):
    """Every new family, and MPNet, trained by tests/zero3_checks.py under ZeRO-3 (engine.deepspeed=zero3_bf16: fp32 on
    CPU), with `accelerate launch --config_file launch/accelerate/multinode_zero3.yaml` run once per "node"."""
    from tests.two_nodes import accelerate_two_nodes

    root = tmp_path_factory.mktemp("zero3_families")
    for family in zero3_checks.FAMILIES:
        tiny_backbone(family).save_pretrained(root / "models" / family)
    accelerate_two_nodes("tests.zero3_checks", ["families", str(root / "models"), str(root / "out")])
    return root


@pytest.mark.slow
@pytest.mark.distributed
def test_two_accelerate_nodes_meet_at_the_rendezvous(zero3_families):
    launch = [json.loads((zero3_families / "out" / f"launch-rank{r}.json").read_text()) for r in (0, 1)]
    assert [(v["RANK"], v["WORLD_SIZE"], v["LOCAL_RANK"]) for v in launch] == [("0", "2", "0"), ("1", "2", "0")]
    assert {v["GROUP_RANK"] for v in launch} == {"0", "1"}  # two nodes, one process each


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("family", zero3_checks.FAMILIES)
def test_k3_under_zero3_equals_one_process(zero3_families, family):
    """Partitioned backbone (each rank half), the same simplex on both ranks, equal to the same steps in one
    process on the whole batch; every backbone parameter gathered after training equals a plain load (MoE experts:
    converted to fused tensors at load, and frozen)."""
    out = zero3_families / "out"
    facts = [json.loads((out / f"{family}-rank{r}.json").read_text()) for r in (0, 1)]
    for f in facts:
        assert f["world_size"] == 2 and f["partitioned"]
        assert 0.4 < f["frozen_local_bytes"] / (f["frozen_numel"] * 4) < 0.6, f
    zero3 = [load_file(str(out / f"{family}-rank{r}.safetensors"))["vertices"] for r in (0, 1)]
    assert torch.equal(zero3[0], zero3[1])

    folder = zero3_families / "models" / family
    if family in zero3_checks.ENCODERS:  # MPNet: the prefix through its self-attention, a simplex head
        backbone = AutoModel.from_pretrained(folder, add_pooling_layer=False).eval()
    else:
        backbone = AutoModelForCausalLM.from_pretrained(folder).eval()
    gathered = load_file(str(out / f"{family}-gathered.safetensors"))
    plain = dict(backbone.named_parameters())
    assert gathered.keys() == plain.keys()
    assert all(torch.equal(gathered[n], plain[n]) for n in plain)

    model = zero3_checks.make_model(backbone, family)
    with torch.no_grad():
        model.simplex.vertices.copy_(zero3_checks.start_vertices(model))
    losses = zero3_checks.train_steps(model, 0, 1, lambda params, loss: loss)
    assert losses == pytest.approx(facts[0]["losses"], abs=1e-5)
    torch.testing.assert_close(zero3[0], model.simplex.vertices.detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_the_trainer_and_generate_run_a_windowed_family(small_assets, tmp_path):
    """`python -m dist_subspace.train` end to end on a tiny random Gemma 2 (window 8, P = 8: every input runs past
    the window) with the real SmolLM2 tokenizer, then generation from its run folder."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from dist_subspace.generate import generate, load_run, parse_point
    from dist_subspace.train import main as train

    model_dir, data = small_assets
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=WINDOW,
        query_pre_attn_scalar=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma")
    tokenizer.save_pretrained(tmp_path / "gemma")
    extra = ("train.max_steps=4", "train.eval_every=4", "train.save_every=4", "eval.landscape=false")
    assert train(run_args(tmp_path / "gemma", data, tmp_path / "run", *extra)) == 0
    assert load_file(str(tmp_path / "run" / "final" / "simplex.safetensors"))["prefix.vertices"].shape == (
        3,
        2,
        2,
        1,
        8,
        16,
    )
    backbone, tokenizer, vertices = load_run(tmp_path / "run")
    out = generate(backbone, tokenizer, vertices, parse_point("vertex:2", 3), ["the film was"], max_new_tokens=12)
    assert len(out[0]["new_token_ids"]) >= 1
