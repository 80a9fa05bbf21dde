"""The memory planner's arithmetic against what it describes: the real models' parameters, what autograd keeps for
backward (measured on small shapes, same formula), and DeepSpeed's own ZeRO-3 estimator."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.core.paths import CHECKOUT as ROOT
from dist_subspace.training import memory
from tests.conftest import DECODER_CONFIGS

MODELS = ROOT / "configs" / "models"
# Parameter counts as the model cards publish them (safetensors totals).
PUBLISHED = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "qwen2.5-7b": 7_615_616_512,
    "mistral-7b-v0.3": 7_248_023_552,
    "mixtral-8x7b": 46_702_792_704,
    "smollm2-135m": 134_515_008,
}


def shipped(name: str) -> memory.ModelShape:
    return memory.model_shape(json.loads((MODELS / f"{name}.json").read_text()))


@pytest.mark.parametrize("family", list(DECODER_CONFIGS))
def test_parameter_counts_match_deepspeed_counting_the_real_model(family):
    from deepspeed.runtime.zero.stage3 import model_to_params

    config = DECODER_CONFIGS[family]()
    total, largest = model_to_params(AutoModelForCausalLM.from_config(config))
    counts = memory.parameter_counts(memory.model_shape(config.to_dict()))
    assert (counts["total"], counts["largest_module"]) == (total, largest)


def test_shipped_configs_have_the_published_sizes():
    assert {p.stem for p in MODELS.glob("*.json")} == set(PUBLISHED)
    for name, size in PUBLISHED.items():
        assert memory.parameter_counts(shipped(name))["total"] == size, name


@pytest.mark.slow
def test_shipped_configs_count_as_transformers_builds_them():
    from transformers import CONFIG_MAPPING

    for name in ("llama-3.1-8b", "mixtral-8x7b", "qwen2.5-7b"):
        data = json.loads((MODELS / f"{name}.json").read_text())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[data["model_type"]].from_dict(data))
        params = {id(p): p for p in model.parameters()}  # meta tensors share data_ptr 0: deduplicate by object
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        counts = memory.parameter_counts(shipped(name))
        assert counts["total"] == sum(p.numel() for p in params.values()), name
        assert counts["largest_module"] == largest, name


def saved_by_autograd(backbone, batch: int, seq: int, prefix: int, checkpointing: bool) -> int:
    """Bytes of the distinct tensors autograd keeps for backward through our forward, parameters, alpha and the
    label ids excepted (the planner counts those elsewhere)."""
    model = PrefixSubspaceModel(backbone, 3, prefix, label_token_ids=[5, 6])
    model.simplex.vertices.data.normal_()
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = {p.data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params and t.numel():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 100, (batch, seq))
    alpha = model.sample_alpha(torch.tensor(0), torch.arange(batch))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, torch.ones_like(ids), alpha)
    return sum(storages.values()) - alpha.numel() * 4 - model.label_token_ids.numel() * 8


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(DECODER_CONFIGS))
def test_activation_formula_matches_what_autograd_keeps(family, dtype, checkpointing):
    """Exact for the Llama-like families; within 2% where small per-token terms (router indices, a LayerNorm's
    statistics, the q/k norms' saved views) are rounded."""
    torch.manual_seed(0)
    config = DECODER_CONFIGS[family]()
    backbone = AutoModelForCausalLM.from_config(config).eval().to(dtype)
    shape = memory.model_shape(config.to_dict())
    batch, seq, prefix = 2, 7, 5
    measured = saved_by_autograd(backbone, batch, seq, prefix, checkpointing)
    planned = memory.saved_activation_bytes(shape, batch, seq, prefix, dtype.itemsize, checkpointing)
    if family in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        assert planned == measured
    else:
        assert planned == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3_text"])
def test_activation_formula_holds_past_one_cpu_key_block(family, checkpointing):
    """S + P = 536 keys: past the CPU kernel's 512-key block the prefix path pads the query to a square and keeps
    what that kernel saves, and a sliding window (Phi-3, Gemma 3's first layer: 8 tokens) that bites past the
    prefix keeps its [S, P+S] band; the planner counts the same."""
    from dist_subspace.core.attention import CPU_KEY_BLOCK

    torch.manual_seed(0)
    config = DECODER_CONFIGS[family]()
    backbone = AutoModelForCausalLM.from_config(config).eval()
    shape = memory.model_shape(config.to_dict())
    batch, seq, prefix = 1, 520, 16
    assert seq + prefix > CPU_KEY_BLOCK
    measured = saved_by_autograd(backbone, batch, seq, prefix, checkpointing)
    planned = memory.saved_activation_bytes(shape, batch, seq, prefix, 4, checkpointing)
    assert planned == (measured if family != "gemma3_text" else pytest.approx(measured, rel=0.02))


def test_deepspeed_estimator_agrees():
    """DeepSpeed's ZeRO-3 estimator, called with our parameter counts, gives our figures; and with nothing but the
    largest module gathered, the backbone shard plus the gathered parameters is its optimizer-offloaded figure."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    for name in PUBLISHED:
        m = shipped(name)
        counts = memory.parameter_counts(m)
        for gpus, nodes in ((8, 1), (8, 4), (2, 1)):
            s = memory.Setup(gpus_per_node=gpus, nodes=nodes, max_live_parameters=0, prefetch_bucket=0)
            ours = memory.deepspeed_estimates(m, s)
            _, trained, _ = estimate_zero3_model_states_mem_needs(
                counts["total"], counts["largest_module"], gpus, nodes, cpu_offload=False
            )
            _, offloaded, _ = estimate_zero3_model_states_mem_needs(
                counts["total"], counts["largest_module"], gpus, nodes, cpu_offload=True, cpu_offload_params=False
            )
            assert (ours["all_trained"], ours["optimizer_offloaded"]) == (trained, offloaded)
            bytes_ = memory.plan(m, replace(s, persistence_threshold=0))["per_gpu_bytes"]
            frozen = bytes_["backbone_shard"] + bytes_["gathered_parameters"]
            assert frozen == pytest.approx(offloaded, abs=2 * s.world)  # rounding of the shard


def test_plan_items_move_the_right_way():
    m = shipped("llama-3.1-70b")
    base = memory.Setup(gpus_per_node=8, micro_batch=4, seq_len=256)
    plain = memory.plan(m, base)
    assert plain["per_gpu_bytes"]["backbone_shard"] == pytest.approx(70_553_706_496 * 2 / 8, rel=1e-3)
    checkpointed = memory.plan(m, replace(base, checkpointing=True))
    assert checkpointed["per_gpu_bytes"]["activations"] < plain["per_gpu_bytes"]["activations"] / 5
    twice = memory.plan(m, replace(base, nodes=2))
    assert twice["per_gpu_bytes"]["backbone_shard"] == pytest.approx(plain["per_gpu_bytes"]["backbone_shard"] / 2, 1e-3)
    offloaded = memory.plan(m, replace(base, offload_params=True))
    assert offloaded["per_gpu_bytes"]["backbone_shard"] < 2**22  # only the small persistent parameters stay
    assert offloaded["cpu_offloaded_params_per_node"] == pytest.approx(70_553_706_496 * 2, rel=1e-3)
    replicated = memory.plan(m, replace(base, partitioned=False))
    assert not replicated["fits"] and replicated["per_gpu_bytes"]["gathered_parameters"] == 0


def test_smallest_fix_takes_the_cheapest_change_that_fits():
    m = shipped("llama-3.1-70b")
    roomy = memory.Setup(gpus_per_node=8, gpu_memory=80 * memory.GiB)
    assert memory.plan(m, roomy)["fits"] and memory.smallest_fix(m, roomy) is None
    tight = replace(roomy, gpu_memory=30 * memory.GiB, seq_len=512)
    fix = memory.smallest_fix(m, tight)
    assert fix["changes"] == ["model.gradient_checkpointing=true"]
    assert fix["total_bytes"] <= tight.gpu_memory < memory.plan(m, tight)["total_bytes"]
    small = replace(roomy, gpu_memory=12 * memory.GiB)
    assert memory.smallest_fix(m, small)["changes"][-1] == "engine.deepspeed=zero3_offload"
    assert memory.smallest_fix(m, replace(roomy, gpu_memory=1 * memory.GiB)) is None  # nothing fits 1 GiB
