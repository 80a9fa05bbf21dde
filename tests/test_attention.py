"""The prefix-aware attention path (``prefix_sdpa``) against transformers' default SDPA path, every family."""

import logging

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from dist_subspace.core import attention, simplex
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel, prefix_cache
from tests.conftest import _COMMON, DECODER_CONFIGS, ENCODER_CONFIGS, WINDOW, tiny_backbone
from tests.test_model import P, make, random_alpha

# Every family whose backbone runs transformers' SDPA switches to prefix_sdpa (Gemma 2 runs eager: softcapping).
FAMILIES = [f for f in (*DECODER_CONFIGS, *ENCODER_CONFIGS) if tiny_backbone(f).config._attn_implementation == "sdpa"]
S = 7
# Rows of every padding kind; row 0 is never padded, so the batch is as long as its longest example.
PADDING = {
    "none": [[1] * S] * 3,
    "right": [[1] * S, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5],
    "left": [[1] * S, [0] * 2 + [1] * 5, [0] * 5 + [1] * 2],
}
LONG = WINDOW + 4  # past the window of the sliding-window families (Gemma 3, Phi-3)


def padded(kind: str, length: int) -> list[list[int]]:
    """Three rows of ``length``: full, two real tokens short, ``length - 2`` short, padded on ``kind``'s side."""
    rows = []
    for real in (length, length - 2, 2):
        pads = [0] * (length - real)
        rows.append({"none": [1] * length, "right": [1] * real + pads, "left": pads + [1] * real}[kind])
    return rows


# fp32: both paths reorder the same sums (one ulp of noise); bf16: the default path sums the grouped heads'
# key/value gradients in bf16 after repeat_kv, SDPA inside its kernel, so gradients differ at bf16's epsilon
# (2^-8 = 0.4 %): measured against the tensor's largest entry, not absolutely (the largest error seen, over every
# family, padding, logits and gradients, is 0.69 % of that entry).
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """``got`` equals ``want`` within ``TOLERANCE[dtype]``, its absolute part scaled by ``want``'s largest
    entry: a gradient of scale 0.05 is held to 5e-4, not to an absolute 2e-2."""
    scale = want.abs().max().item()
    assert scale > 0, msg
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, atol=tolerance["atol"] * scale, rtol=tolerance["rtol"], msg=msg)


def batch_with(padding: str, seed: int = 1, length: int = S) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    mask = torch.tensor(PADDING[padding] if length == S else padded(padding, length))
    return torch.randint(3, 128, mask.shape) * mask, mask  # pads are token 0


def run(model: PrefixSubspaceModel, ids, mask, alpha=None) -> dict[str, torch.Tensor]:
    """Logits and the gradients of every trained tensor for one forward and backward."""
    model.zero_grad(set_to_none=True)
    alpha = random_alpha(model, len(ids)) if alpha is None else alpha
    logits = model(ids, mask, alpha)
    (logits.square().sum() + logits.sum()).backward()
    return {"logits": logits.detach(), **{n: p.grad.clone() for n, p in model.simplex.named_parameters()}}


def paths_of(model, ids, mask) -> dict[str, int]:
    attention.attention_paths.clear()
    run(model, ids, mask)
    return dict(attention.attention_paths)


def default_twin(family: str, dtype=torch.float32, **kw) -> tuple[PrefixSubspaceModel, PrefixSubspaceModel]:
    """The same model twice: on the prefix path (the default now) and on transformers' SDPA."""
    ours, theirs = make(family, **kw), make(family, **kw)
    ours.backbone.to(dtype)
    theirs.backbone.to(dtype)
    attention.disable(theirs.backbone)
    assert ours.config._attn_implementation == attention.PREFIX_ATTENTION
    assert theirs.config._attn_implementation == "sdpa"
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padding", list(PADDING))
@pytest.mark.parametrize("family", FAMILIES)
def test_equals_the_default_path_forward_and_gradients(family, padding, dtype):
    ours, theirs = default_twin(family, dtype)
    windowed = getattr(ours.config, "sliding_window", None) and ours.spec.kind == "decoder"
    ids, mask = batch_with(padding, length=LONG if windowed else S)  # the window bites past the prefix
    got, want = run(ours, ids, mask), run(theirs, ids, mask)
    assert got.keys() == want.keys() and want["vertices"].abs().sum() > 0
    for name in want:
        assert_close_scaled(got[name], want[name], dtype, msg=name)


@pytest.mark.parametrize("padding", list(PADDING))
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_mask_only_where_padding_needs_one(family, padding):
    model = make(family)
    paths = paths_of(model, *batch_with(padding))
    decoder = family in DECODER_CONFIGS
    expected = {
        (True, "none"): "causal: one [S, P+S] mask for the batch",
        (True, "right"): "causal: one [S, P+S] mask for the batch",  # right pads are never seen: no padding mask
        (True, "left"): "causal: [B, 1, S, P+S] mask",
        (False, "none"): "bidirectional: no mask",
        (False, "right"): "bidirectional: [B, 1, 1, P+S] mask",
        (False, "left"): "bidirectional: [B, 1, 1, P+S] mask",
    }[(decoder, padding)]
    assert paths == {expected: model.geometry.num_layers}


def test_long_inputs_run_causal_attention_with_no_mask_at_all(monkeypatch):
    """Beyond one key block of the CPU kernel, the query is padded to a square and SDPA runs is_causal."""
    monkeypatch.setattr(attention, "CPU_KEY_BLOCK", 1)
    for family in [f for f in FAMILIES if f in DECODER_CONFIGS]:
        ours, theirs = default_twin(family)
        for padding in ("none", "right"):
            ids, mask = batch_with(padding)
            attention.attention_paths.clear()
            got = run(ours, ids, mask)
            assert dict(attention.attention_paths) == {"causal: query padded to a square, is_causal": 2}
            for name, value in run(theirs, ids, mask).items():
                torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=f"{family} {padding} {name}")


def test_the_lower_right_bias_branch_that_gpus_with_flash_take_equals_the_default_path(monkeypatch):
    """On CUDA with flash, causal attention behind a prefix is SDPA with torch's ``causal_lower_right`` bias; that
    bias runs on the CPU too, so the branch is forced here and checked, forward and gradients."""
    monkeypatch.setattr(attention, "_flash_takes", lambda *args: True)
    for family in [f for f in FAMILIES if f in DECODER_CONFIGS]:
        ours, theirs = default_twin(family)
        for padding in ("none", "right"):
            ids, mask = batch_with(padding)
            attention.attention_paths.clear()
            got = run(ours, ids, mask)
            assert dict(attention.attention_paths) == {"causal: lower-right bias (flash)": ours.geometry.num_layers}
            for name, value in run(theirs, ids, mask).items():
                torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=f"{family} {padding} {name}")


def test_static_cache_generation_equals_dynamic_on_the_prefix_path():
    """A backbone switched to prefix_sdpa, generating with transformers' static cache: its prefill has S queries
    before max_cache_len slots, most of them empty, which only an explicit mask keeps out (no mask reads as
    lower-right causal here). Same tokens and scores as the dynamic cache."""
    model = make("llama")
    assert model.config._attn_implementation == attention.PREFIX_ATTENTION
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (2, 6))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    kw.update(return_dict_in_generate=True, output_scores=True)
    dynamic = model.backbone.generate(ids, **kw)
    static = model.backbone.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def sdpa_key_heads(model, ids, mask) -> set[int]:
    """The key heads every SDPA call received, read from the profiler's recorded input shapes."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run(model, ids, mask)
    calls = [e for e in prof.events() if e.name == "aten::scaled_dot_product_attention"]
    assert calls
    return {e.input_shapes[1][1] for e in calls}


@pytest.mark.parametrize("padding", ["right", "left"])
def test_grouped_key_value_heads_are_never_repeated(padding):
    ours, theirs = default_twin("llama")  # 4 query heads, 2 key/value heads
    ids, mask = batch_with(padding)
    assert sdpa_key_heads(ours, ids, mask) == {2}
    assert sdpa_key_heads(theirs, ids, mask) == {4}  # the default path copies them out to every query head


def test_each_path_is_logged_once(caplog):
    model = make("llama")
    attention.attention_paths.clear()
    with caplog.at_level(logging.INFO, logger="dist_subspace.core.attention"):
        for padding in ("right", "right", "left", "left"):
            run(model, *batch_with(padding))
    assert [r.getMessage() for r in caplog.records] == [
        "prefix attention: causal: one [S, P+S] mask for the batch",
        "prefix attention: causal: [B, 1, S, P+S] mask",
    ]


# ---- the mask hook -------------------------------------------------------------------------------
def test_mask_hook_skips_the_mask_for_unpadded_and_right_padded_input():
    prefix = torch.ones(3, P, dtype=torch.bool)

    def causal(rows):
        padding = torch.cat([prefix, torch.tensor(rows, dtype=torch.bool)], 1)
        return attention.prefix_sdpa_mask(3, S, P + S, q_offset=P, attention_mask=padding)

    assert causal(PADDING["none"]) is None
    assert causal(PADDING["right"]) is None
    left = causal(PADDING["left"])
    assert left.shape == (3, 1, S, P + S) and left.dtype == torch.bool
    assert not left[1, 0, 0, P].item() and left[1, 0, -1, :P].all()  # a pad is hidden, the prefix seen
    hidden_prefix = torch.cat([torch.zeros(3, P, dtype=torch.bool), torch.ones(3, S, dtype=torch.bool)], 1)
    assert attention.prefix_sdpa_mask(3, S, P + S, q_offset=P, attention_mask=hidden_prefix) is not None

    from transformers.masking_utils import bidirectional_mask_function

    def bidirectional(rows):
        padding = torch.cat([prefix, torch.tensor(rows, dtype=torch.bool)], 1)
        return attention.prefix_sdpa_mask(
            3,
            S,
            P + S,
            mask_function=bidirectional_mask_function,
            attention_mask=padding,
            allow_is_causal_skip=False,
            allow_is_bidirectional_skip=True,
        )

    assert bidirectional(PADDING["none"]) is None
    assert bidirectional(PADDING["right"]).shape == (3, 1, 1, P + S)  # broadcast, never [B, 1, S, P+S]


# ---- sliding windows -----------------------------------------------------------------------------
def windowed(family: str, window: int, seed: int = 0) -> PrefixSubspaceModel:
    torch.manual_seed(seed)
    if family == "mistral":
        config = MistralConfig(**_COMMON, num_key_value_heads=2, pad_token_id=0, sliding_window=window)
    else:  # qwen2: layer 0 full attention, layer 1 sliding
        config = Qwen2Config(
            **_COMMON, num_key_value_heads=2, pad_token_id=0, use_sliding_window=True, sliding_window=window
        )
        config.layer_types = ["full_attention", "sliding_attention"]
    model = PrefixSubspaceModel(AutoModelForCausalLM.from_config(config).eval(), 3, P, label_token_ids=[5, 6, 7])
    model.simplex.vertices.data.copy_(initial_vertices(model, "normal", seed=3, std=1.0))
    return model


def reference_logits(
    model: PrefixSubspaceModel, ids, mask, alpha, window: int | None, prefix_visible: bool = True
) -> torch.Tensor:
    """transformers' SDPA given a hand-built 4D mask: the prefix visible to every query (or, ``prefix_visible``
    False, only within the window like any key), the input causal and, within the window, seen by index distance
    (transformers' rule), pads hidden."""
    attention.disable(model.backbone)
    b, s = ids.shape
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    keys = torch.cat([torch.ones(b, P, dtype=torch.bool), mask.bool()], 1)  # [B, P+S]

    def mask4d(window: int | None) -> torch.Tensor:  # [B, 1, S, P+S]
        seen = (j <= i) & ((i - j < window) if window else True)  # [S, S]
        prefix = torch.ones(s, P, dtype=torch.bool)
        if window and not prefix_visible:
            prefix = torch.arange(P)[None, :] > i + P - window  # key k of the prefix sits at position k
        return torch.cat([prefix, seen], 1)[None, None] & keys[:, None, None, :]

    masks = mask4d(window)
    if model.config.model_type == "qwen2":  # per layer type
        masks = {"full_attention": mask4d(None), "sliding_attention": masks}
    from dist_subspace.core.arch import input_position_ids

    out = model.backbone(
        input_ids=ids,
        attention_mask=masks,
        position_ids=input_position_ids(model.spec, mask, P, model.config),
        cache=prefix_cache(model.prefix(alpha, b)),
        use_cache=False,
    ).logits  # [B, S, V]
    last = s - 1 - mask.flip(-1).argmax(-1)
    attention.enable(model.backbone)
    return out[torch.arange(b), last][:, model.label_token_ids]


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_windows_never_hide_the_prefix(family, padding):
    window = 3  # < S: the window bites inside the input
    model = windowed(family, window)
    ids, mask = batch_with(padding)
    alpha = random_alpha(model, 3)
    attention.attention_paths.clear()
    got = model(ids, mask, alpha)
    # no pad before a real token: no mask but the window's band; else model.prefix_attention_mask's masks
    expected = "causal: [B, 1, S, P+S] mask" if padding == "left" else "causal, sliding window"
    assert any(p.startswith(expected) for p in attention.attention_paths), dict(attention.attention_paths)
    torch.testing.assert_close(got, reference_logits(model, ids, mask, alpha, window), atol=1e-5, rtol=1e-4)
    # transformers' own window (absolute indices) would hide the prefix from the later queries
    hiding = reference_logits(model, ids, mask, alpha, window, prefix_visible=False)
    assert not torch.allclose(hiding, got, atol=1e-3)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_a_window_wider_than_prefix_and_input_changes_nothing(family):
    model = windowed(family, window=64)
    ids, mask = batch_with("right")
    alpha = random_alpha(model, 3)
    attention.attention_paths.clear()
    got = model(ids, mask, alpha)
    assert not any("sliding" in p for p in attention.attention_paths)
    attention.disable(model.backbone)
    torch.testing.assert_close(got, model(ids, mask, alpha), atol=1e-5, rtol=1e-4)


# ---- the verbalizer reads the last real token --------------------------------------------------------
@pytest.mark.parametrize("family", list(DECODER_CONFIGS))
def test_right_and_left_padding_give_the_same_logits(family):
    model = make(family)
    right_ids, right = batch_with("right")
    left_ids, left = torch.zeros_like(right_ids), torch.zeros_like(right)
    for b, n in enumerate(right.sum(1).tolist()):  # the same examples, padded on the other side
        left_ids[b, S - n :], left[b, S - n :] = right_ids[b, :n], 1
    alpha = random_alpha(model, 3)
    torch.testing.assert_close(model(right_ids, right, alpha), model(left_ids, left, alpha), atol=1e-5, rtol=1e-4)


# ---- gradient checkpointing ----------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "bert"])
def test_gradient_checkpointing_on_the_prefix_path_equals_the_default_path(family, padding):
    ours, theirs = default_twin(family)
    ours.enable_gradient_checkpointing()
    ours.train()
    theirs.train()
    ids, mask = batch_with(padding)
    attention.attention_paths.clear()
    got = run(ours, ids, mask)
    # every layer's attention ran twice: forward, and the recompute in backward
    assert sum(attention.attention_paths.values()) == 2 * ours.geometry.num_layers
    for name, value in run(theirs, ids, mask).items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_the_planner_counts_the_same_cpu_key_block():
    from dist_subspace.training import memory

    assert memory.CPU_KEY_BLOCK == attention.CPU_KEY_BLOCK


# ---- which backbones switch ----------------------------------------------------------------------
def test_only_sdpa_backbones_switch_and_disable_switches_back():
    eager = AutoModelForCausalLM.from_config(LlamaConfig(**_COMMON, num_key_value_heads=2), attn_implementation="eager")
    assert not attention.enable(eager) and eager.config._attn_implementation == "eager"
    model = PrefixSubspaceModel(eager, 2, P, label_token_ids=[5])
    assert model.config._attn_implementation == "eager"  # the user's choice stands
    ids, mask = batch_with("left")
    assert torch.isfinite(model(ids, mask, simplex.centroid_alpha(2))).all()
    sdpa = AutoModelForCausalLM.from_config(LlamaConfig(**_COMMON, num_key_value_heads=2))
    assert attention.enable(sdpa) and sdpa.config._attn_implementation == attention.PREFIX_ATTENTION
    attention.disable(sdpa)
    assert sdpa.config._attn_implementation == "sdpa"


# ---- ZeRO-3 --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_with_checkpointing_runs_the_prefix_path_and_equals_the_default_path(small_assets, tmp_path):
    """2 processes, backbone partitioned, gradient checkpointing: each rank's right- and left-padded batch."""
    import json

    from tests.training.test_distributed import launch, torchrun

    model_dir, data = small_assets
    launch(torchrun("tests.zero3_attention_check", str(model_dir), str(data), str(tmp_path)))
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        print(f"rank {rank}:", result)  # the differences, for pytest -s
        assert result["world_size"] == 2 and result["partitioned"] and result["padded"], result
        calls = 2 * result["layers"]  # forward and the checkpointed recompute
        expected = {"right": "causal: one [S, P+S] mask for the batch", "left": "causal: [B, 1, S, P+S] mask"}
        for padding, path in expected.items():
            row = result[padding]
            assert row["paths"] == {path: calls} and row["default_paths"] == {}, row
            assert row["logits_max_abs"] < 1e-5 and row["grad_max_rel"] < 1e-4, row
