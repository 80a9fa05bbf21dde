"""The engine's loading path at scale, on small shapes: a checkpoint in several safetensors shards goes straight into
ZeRO-3 partitions (2 processes, launched as 2 nodes x 1 process through a DeepSpeed hostfile)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_subspace.training import memory
from tests.two_nodes import deepspeed_two_nodes

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
MiB = 2**20
SHAPE = LlamaConfig(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=16,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def sharded_load(tmp_path_factory):
    """A random Llama-shaped model (58.7M parameters, 224 MiB in fp32: 16 layers, a small vocabulary so that no single
    tensor rivals a shard) saved as 3 shards, loaded by tests/zero3_checks.py through ``Engine.load_backbone``."""
    root = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    LlamaForCausalLM(SHAPE).save_pretrained(root / "model", max_shard_size="85MB")
    # Large buffers always from mmap, returned to the system when freed: the sampled resident memory is live memory,
    # not what glibc's growing heap threshold would keep cached after a free.
    env = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    args = ["sharded-load", str(root / "model"), str(root / "out")]
    deepspeed_two_nodes("tests.zero3_checks", args, root / "hostfile", env)
    facts = [json.loads((root / "out" / f"sharded-load-rank{r}.json").read_text()) for r in (0, 1)]
    launch = [json.loads((root / "out" / f"launch-rank{r}.json").read_text()) for r in (0, 1)]
    return facts, launch


def test_two_deepspeed_hostfile_nodes_meet_at_the_rendezvous(sharded_load):
    _, launch = sharded_load
    assert [(v["RANK"], v["WORLD_SIZE"], v["LOCAL_RANK"]) for v in launch] == [("0", "2", "0"), ("1", "2", "0")]
    assert [v["CROSS_RANK"] for v in launch] == ["0", "1"]  # the node rank, as DeepSpeed's launcher names it


def test_three_shards_load_bit_for_bit_into_partitions(sharded_load):
    """Every parameter, gathered from its partitions, equals the saved tensor (a silent random init would not)."""
    facts, _ = sharded_load
    for f in facts:
        assert f["shards"] == 3 and f["partitioned"]
        assert f["compared"] == f["saved"] == 147 and f["mismatched"] == []
        assert f["local_bytes"] == pytest.approx(f["numel"] * 4 / 2, rel=0.01)  # each rank holds half


def test_load_memory_stays_near_the_share_plus_one_shard(sharded_load):
    """Private memory while loading grows by this rank's share plus about two copies of the largest tensor (gathered
    for loading, and DeepSpeed's flat all-gather buffer): below share + one shard, far below the whole model. Rank 0
    also maps the shards read-only (clean page cache, shared and reclaimable): transformers opens every shard before
    copying, so that mapping reaches the checkpoint's size; the other ranks read only shapes."""
    facts, _ = sharded_load
    for f in facts:
        grew = f["peak"]["RssAnon"] - f["before"]["RssAnon"]
        share = f["local_bytes"]
        print(
            f"rank private +{grew / MiB:.0f} MiB: share {share / MiB:.0f} MiB, largest tensor "
            f"{f['largest_param_bytes'] / MiB:.0f} MiB, largest shard {f['largest_shard_bytes'] / MiB:.0f} MiB, "
            f"checkpoint {f['checkpoint_bytes'] / MiB:.0f} MiB; mapped +"
            f"{(f['peak']['RssFile'] - f['before']['RssFile']) / MiB:.0f} MiB; {f['load_seconds']:.1f} s"
        )
        assert share <= grew <= share + f["largest_shard_bytes"]
    rank0_mapped = facts[0]["peak"]["RssFile"] - facts[0]["before"]["RssFile"]
    rank1_mapped = facts[1]["peak"]["RssFile"] - facts[1]["before"]["RssFile"]
    assert rank0_mapped <= facts[0]["checkpoint_bytes"] + 16 * MiB
    assert rank1_mapped < facts[1]["largest_shard_bytes"] / 4


def test_the_planner_predicts_the_measured_load_memory(sharded_load):
    """The planner's backbone shard + gathered parameters for this model, 2 GPUs and fp32 (the same formula it uses
    for 70B in bf16) is what each rank's private memory grew by while loading, within 10%."""
    facts, _ = sharded_load
    shape = memory.model_shape(SHAPE.to_dict())
    setup = memory.Setup(gpus_per_node=2, dtype="float32", max_live_parameters=0, prefetch_bucket=0)
    planned = memory.plan(shape, setup)["per_gpu_bytes"]
    for f in facts:
        assert memory.parameter_counts(shape)["total"] == f["numel"]
        grew = f["peak"]["RssAnon"] - f["before"]["RssAnon"]
        assert planned["backbone_shard"] + planned["gathered_parameters"] == pytest.approx(grew, rel=0.1)
