"""Per-GPU memory of a prefix-subspace run under ZeRO-3, from a model's config.json: plain arithmetic, no framework.

What a rank holds during a training step (bytes; c = bytes of the compute dtype, N = B x S tokens, T = P + S keys):

- backbone shard: the frozen parameters / number of GPUs (the small ones DeepSpeed keeps whole on every GPU,
  under ``stage3_param_persistence_threshold``, counted whole);
- gathered parameters: the largest module twice (gathered whole, plus DeepSpeed's flat all-gather buffer; measured
  so on CPU), or the live-parameter budget of the DeepSpeed config (``stage3_max_live_parameters``, which is
  what ZeRO-3 may keep gathered) plus its prefetch bucket, whichever is larger;
- activations kept for backward (the gradient reaches every layer's prefix, so backward runs through the whole
  frozen model). The saved tensors of a layer, found with ``torch.autograd.graph.saved_tensors_hooks`` and
  checked exactly on small shapes: each norm's fp32 input, q, k and v with their H_kv heads over T keys (the
  prefix attention path never repeats them, see attention.py), the attention output and log-sum-exp, one [S, T]
  mask shared by the batch (none on CUDA flash, which this then overestimates; beyond 512 keys, CPU or no flash:
  no mask, q, output and log-sum-exp over T rows), the MLP's gate, activation and up (3 x I), or for a
  mixture of experts the same per routed (token, expert) pair. The frozen linear layers keep nothing (their
  weight is not trained). With gradient checkpointing: each layer's input, plus one layer recomputed;
- the mixed prefix ``[B, L, 2, H_kv, P, D]`` (fp32, its compute-dtype copy, their gradients);
- the simplex ``[K, L, 2, H_kv, P, D]`` in fp32 with its gradient, AdamW's two moments and the flat all-reduce
  buffer (20 bytes a parameter);
- a fixed runtime overhead (CUDA context, communication buffers, allocator slack: an assumption, ``overhead``).

The DeepSpeed estimator (``estimate_zero3_model_states_mem_needs``) assumes every parameter trains (18 bytes a
parameter); with the optimizer offloaded its GPU figure is 2 bytes a parameter sharded plus 4 x the largest
layer: exactly the backbone shard plus the gathered largest module here. :func:`deepspeed_estimates` gives both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

CPU_KEY_BLOCK = 512  # = attention.CPU_KEY_BLOCK (this module imports no framework; tests/test_attention.py checks)
# ZeRO-3 counts whose "auto" nothing fills (Accelerate fills only the bucket sizes and the persistence threshold,
# from the hidden size): DeepSpeed would get the text "auto" where it needs a number.
UNFILLED_AUTO = ("stage3_max_live_parameters", "stage3_max_reuse_distance")


def unfilled_auto(zero: dict, source: str) -> str | None:
    """A one-line complaint (naming ``source``) when a DeepSpeed ``zero_optimization`` section sets a count that
    nobody fills to ``"auto"``; None when there is none."""
    keys = [k for k in UNFILLED_AUTO if zero.get(k) == "auto"]
    if not keys:
        return None
    return (
        f'{source} sets zero_optimization.{keys[0]}="auto", which nothing fills (Accelerate fills only the bucket '
        "sizes and stage3_param_persistence_threshold); give a number, e.g. 1e9 (DeepSpeed's default)"
    )


GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a transformers config.json (decoders)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    gated_mlp: bool = True  # gate, up, down (SwiGLU/GeGLU); False: up, down (GPT-NeoX)
    norms_per_layer: int = 2
    norm_bias: bool = False  # LayerNorm (GPT-NeoX) rather than RMSNorm
    qk_norm: bool = False  # Qwen3, Gemma 3
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    sparse_layers: tuple[int, ...] = ()  # the mixture-of-experts layers (the others are dense)
    parallel_residual: bool = False  # GPT-NeoX: attention and MLP both read the layer input
    eager_attention: bool = False  # Gemma 2 (logit soft-capping): scores and probabilities are materialised
    softcap: bool = False  # attention logits soft-capped (a tanh kept per layer)
    final_softcap: bool = False  # output logits soft-capped (a tanh kept)
    unit_offset_norm: bool = False  # Gemma: RMSNorm scales by (1 + weight), a tensor kept per norm
    rotary_dims: int = 0  # rotated part of a head (GPT-NeoX: a fraction of head_dim)
    sliding_window: int = 0  # tokens a sliding-window layer's query sees among the input (0: none)
    sliding_layers: tuple[int, ...] = ()  # the layers with a sliding window


def _get(config: dict, *keys: str, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def _sliding(config: dict, layers: int) -> dict:
    """Which layers slide, as transformers builds them: those ``layer_types`` names ``sliding_attention``, or
    every layer where a config without ``layer_types`` sets ``sliding_window`` (Mistral, Phi-3, Mixtral)."""
    window = config.get("sliding_window") or 0
    types = config.get("layer_types")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"] if types else range(layers if window else 0)
    return {"sliding_window": window, "sliding_layers": tuple(sliding) if window else ()}


def model_shape(config: dict) -> ModelShape:
    """A :class:`ModelShape` from a config.json dict; ValueError for a family it does not know."""
    kind = config.get("model_type")
    families = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox", "mixtral")
    if kind not in (*families, "qwen2_moe"):
        raise ValueError(f"the planner does not know model_type {kind!r}; it knows {[*families, 'qwen2_moe']}")
    h, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = _get(config, "head_dim", default=h // heads)
    rope = config.get("rope_parameters") or {}
    partial = _get(config, "partial_rotary_factor", "rotary_pct", default=rope.get("partial_rotary_factor", 1.0))
    common = dict(
        model_type=kind,
        vocab_size=config["vocab_size"],
        hidden_size=h,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_get(config, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        intermediate_size=config["intermediate_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", kind in ("gemma2", "gemma3_text"))),
        rotary_dims=int(head_dim * partial),
        **_sliding(config, layers),
    )
    bias = bool(config.get("attention_bias", False))
    if kind == "gpt_neox":
        common["tied_embeddings"] = bool(config.get("tie_word_embeddings", False))
        parallel = bool(config.get("use_parallel_residual", True))
        return ModelShape(
            **common,
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            gated_mlp=False,
            norm_bias=True,
            parallel_residual=parallel,
        )
    extra: dict = dict(
        qkv_bias=bias or kind in ("qwen2", "qwen2_moe"), out_bias=bias, mlp_bias=config.get("mlp_bias", False)
    )
    if kind in ("gemma2", "gemma3_text"):
        extra.update(norms_per_layer=4, unit_offset_norm=True)
    if kind == "gemma2":  # transformers runs Gemma 2 with eager attention (SDPA cannot soft-cap)
        extra.update(eager_attention=True, softcap=config.get("attn_logit_softcapping") is not None)
    if kind in ("gemma2", "gemma3_text"):
        extra["final_softcap"] = config.get("final_logit_softcapping") is not None
    extra["qk_norm"] = kind in ("qwen3", "gemma3_text")
    if kind == "mixtral":
        extra.update(
            num_experts=config.get("num_local_experts", 8),
            experts_per_token=config.get("num_experts_per_tok", 2),
            expert_intermediate_size=config["intermediate_size"],
            sparse_layers=tuple(range(layers)),
        )
    if kind == "qwen2_moe":
        step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
        extra.update(
            num_experts=config.get("num_experts", 60),
            experts_per_token=config.get("num_experts_per_tok", 4),
            expert_intermediate_size=config["moe_intermediate_size"],
            shared_expert_intermediate_size=config.get("shared_expert_intermediate_size", 0),
            sparse_layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
        )
    return ModelShape(**common, **extra)


# ---- parameters ------------------------------------------------------------------------------------------------------
def layer_modules(m: ModelShape, index: int) -> list[list[int]]:
    """The parameter sizes of decoder layer ``index``, grouped by module (DeepSpeed gathers module by module)."""
    h, d, q, kv = m.hidden_size, m.head_dim, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    norm = [h, h] if m.norm_bias else [h]
    modules = [norm] * m.norms_per_layer
    if m.model_type in ("phi3", "gpt_neox"):  # one fused projection for q, k and v
        modules.append([h * (q + 2 * kv)] + ([q + 2 * kv] if m.qkv_bias else []))
    else:
        for width in (q, kv, kv):
            modules.append([h * width] + ([width] if m.qkv_bias else []))
    modules.append([q * h] + ([h] if m.out_bias else []))
    if m.qk_norm:
        modules += [[d], [d]]
    if index in m.sparse_layers:
        e, i = m.num_experts, m.expert_intermediate_size
        modules += [[e * h], [e * 2 * i * h, e * h * i]]  # router; experts as fused [E, ...] tensors (one module)
        if m.shared_expert_intermediate_size:
            s = m.shared_expert_intermediate_size
            modules += [[h * s], [h * s], [s * h], [h]]  # shared expert's gate, up, down; its sigmoid gate
        return modules
    i, bias = m.intermediate_size, m.mlp_bias
    if m.model_type == "phi3":  # gate and up fused
        return [*modules, [h * 2 * i], [i * h]]
    ups = 2 if m.gated_mlp else 1
    modules += [[h * i] + ([i] if bias else []) for _ in range(ups)]
    return [*modules, [i * h] + ([h] if bias else [])]


def modules(m: ModelShape) -> list[list[int]]:
    """Every module's parameter sizes: embeddings, layers, final norm, untied LM head."""
    embedding = [[m.vocab_size * m.hidden_size]]
    final_norm = [[m.hidden_size, m.hidden_size] if m.norm_bias else [m.hidden_size]]
    head = [] if m.tied_embeddings else [[m.vocab_size * m.hidden_size]]
    layers = [module for i in range(m.num_layers) for module in layer_modules(m, i)]
    return embedding + layers + final_norm + head


def parameter_counts(m: ModelShape, persistence_threshold: int = 0) -> dict[str, int]:
    """``total``, ``largest_module`` (DeepSpeed's "largest layer") and ``persistent`` (parameters smaller than the
    threshold, which ZeRO-3 keeps whole on every GPU)."""
    groups = modules(m)
    return {
        "total": sum(sum(g) for g in groups),
        "largest_module": max(sum(g) for g in groups),
        "persistent": sum(n for g in groups for n in g if n < persistence_threshold),
    }


# ---- activations -----------------------------------------------------------------------------------------------------
def layer_activation_bytes(m: ModelShape, index: int, batch: int, seq: int, prefix: int, c: int) -> int:
    """Bytes decoder layer ``index`` keeps for backward (see the module docstring). In layer 0 whatever reads only the
    embeddings (which need no gradient) keeps nothing: its first norm, q/k norms, and with a parallel residual its
    MLP; a query that needs no gradient needs no key kept in eager attention."""
    n, keys, h, heads, d = batch * seq, prefix + seq, m.hidden_size, m.num_heads, m.head_dim
    first = index == 0
    if m.norm_bias:  # LayerNorm: input (shared by a parallel residual's two norms), mean and rstd (compute dtype)
        norms = m.norms_per_layer - first * (2 if m.parallel_residual else 1)
        total = n * ((c * h if norms else 0) * (1 if m.parallel_residual else norms) + 2 * c * norms)
    else:  # RMSNorm: fp32 input and rsqrt
        norms = m.norms_per_layer - first
        total = norms * n * (4 * h + 4) + (norms * 4 * h if m.unit_offset_norm else 0)
    if m.eager_attention:  # q, k and v repeated to every head, scores after soft-capping and probabilities
        total += n * heads * d * c + (2 - first) * batch * keys * heads * d * c
        upcast = 0 if c == 4 else 4  # the softmax runs in fp32 and keeps its output before the cast back
        total += batch * heads * seq * keys * ((1 + m.softcap) * c + upcast)
    else:  # prefix_sdpa: q, output, log-sum-exp (fp32) over S rows and one shared [S, T] mask, or over T rows
        rows, mask = (keys, 0) if keys > CPU_KEY_BLOCK else (seq, seq * keys * c)  # (query padded to a square)
        if index in m.sliding_layers and seq > m.sliding_window:  # a window past the prefix: one [S, T] band
            rows, mask = seq, seq * keys * c
        total += batch * rows * heads * (2 * d * c + 4) + 2 * batch * keys * m.num_kv_heads * d * c + mask
    if m.qk_norm and not first:
        total += n * (heads + m.num_kv_heads) * (4 * d + 4)
    if first and m.parallel_residual:
        return total
    if index in m.sparse_layers:
        k, i = m.experts_per_token, m.expert_intermediate_size
        total += n * (k * (3 * i + h) * c + 4 * m.num_experts + 40 * k)  # per routed pair; router and indices
        if m.shared_expert_intermediate_size:
            total += n * ((3 * m.shared_expert_intermediate_size + h) * c + c)
    else:
        total += (3 if m.gated_mlp else 1) * n * m.intermediate_size * c
    return total


def saved_activation_bytes(m: ModelShape, batch: int, seq: int, prefix: int, c: int, checkpointing: bool) -> int:
    """What autograd holds after the forward: every layer's saved tensors, or with gradient checkpointing only each
    layer's input; then the final norm and the rotary tables."""
    n = batch * seq
    if checkpointing:
        kept = m.num_layers * n * m.hidden_size * c
    else:
        kept = sum(layer_activation_bytes(m, i, batch, seq, prefix, c) for i in range(m.num_layers))
        kept += 2 * batch * seq * m.rotary_dims * c if m.num_layers > 1 else 0  # cos and sin, shared by the layers
    final_norm = n * (c * (m.hidden_size + 2) if m.norm_bias else 4 * m.hidden_size + 4)
    softcap = batch * m.vocab_size * c if m.final_softcap else 0  # of the last position's logits
    gather = 2 * batch * 8  # the rows and positions of each example's last real token (int64)
    return kept + final_norm + (4 * m.hidden_size if m.unit_offset_norm else 0) + softcap + gather


def activation_bytes(m: ModelShape, batch: int, seq: int, prefix: int, c: int, checkpointing: bool) -> int:
    """Peak activations: what the forward keeps, plus one layer's worth in backward (its gradients; with
    checkpointing, its recomputed activations and their gradients)."""
    one_layer = max(layer_activation_bytes(m, i, batch, seq, prefix, c) for i in range(m.num_layers))
    kept = saved_activation_bytes(m, batch, seq, prefix, c, checkpointing)
    return kept + one_layer * (2 if checkpointing else 1)


# ---- one rank's plan -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """The run: GPUs, batch, prefix, DeepSpeed settings that matter for memory."""

    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory: int = 80 * GiB
    micro_batch: int = 4
    seq_len: int = 256
    prefix_length: int = 16
    vertices: int = 3
    checkpointing: bool = False
    dtype: str = "bfloat16"
    partitioned: bool = True  # ZeRO-3; False: the backbone is replicated (ZeRO-1/2, plain data parallel)
    offload_params: bool = False  # ZeRO-3 offload_param to CPU
    max_live_parameters: int = 1_000_000_000
    prefetch_bucket: int | None = None  # None: DeepSpeed's "auto" as Accelerate fills it (0.9 h^2)
    persistence_threshold: int | None = None  # None: "auto" (10 h)
    overhead: int = 2 * GiB

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


def plan(m: ModelShape, s: Setup) -> dict:
    """Bytes per GPU by item, their total, and whether it fits ``s.gpu_memory``."""
    c = DTYPE_BYTES[s.dtype]
    h = m.hidden_size
    threshold = 10 * h if s.persistence_threshold is None else s.persistence_threshold
    prefetch = int(0.9 * h * h) if s.prefetch_bucket is None else s.prefetch_bucket
    counts = parameter_counts(m, threshold if s.partitioned else 0)
    partitioned = counts["total"] - counts["persistent"]
    shard = 0 if s.offload_params else -(-partitioned // (s.world if s.partitioned else 1)) * c
    live = min(s.max_live_parameters, counts["total"]) + prefetch if s.partitioned else 0
    prefix_numel = m.num_layers * 2 * m.num_kv_heads * s.prefix_length * m.head_dim
    items = {
        "backbone_shard": shard + counts["persistent"] * c,
        "gathered_parameters": max(2 * counts["largest_module"], live) * c if s.partitioned else 0,
        "activations": activation_bytes(m, s.micro_batch, s.seq_len, s.prefix_length, c, s.checkpointing),
        "mixed_prefix": s.micro_batch * prefix_numel * 2 * (4 + c),
        "simplex_and_adamw": s.vertices * prefix_numel * 20,
        "logits": s.micro_batch * m.vocab_size * (c + 4),
        "runtime_overhead": s.overhead,
    }
    total = sum(items.values())
    other = {
        "activations_without_checkpointing": activation_bytes(m, s.micro_batch, s.seq_len, s.prefix_length, c, False),
        "activations_with_checkpointing": activation_bytes(m, s.micro_batch, s.seq_len, s.prefix_length, c, True),
        "largest_module_bytes": counts["largest_module"] * c,
        "cpu_offloaded_params_per_node": -(-partitioned // s.world) * c * s.gpus_per_node if s.offload_params else 0,
    }
    return {
        "parameters": counts,
        "simplex_parameters": s.vertices * prefix_numel,
        "per_gpu_bytes": items,
        "total_bytes": total,
        "gpu_memory_bytes": s.gpu_memory,
        "fits": total <= s.gpu_memory,
        **other,
    }


def _candidates(s: Setup, max_nodes: int):
    """Setups in order of how much they change: checkpointing (recompute, ~30% slower), then smaller micro-batches
    (more accumulation: the same global batch), then ZeRO-3 for a replicated backbone, then parameters offloaded to
    CPU memory, then more nodes."""
    base = replace(s, checkpointing=True)
    batches = []
    batch = s.micro_batch
    while batch >= 1:
        batches.append(batch)
        batch //= 2
    for batch in batches:
        yield replace(base, micro_batch=batch)
    zero3 = replace(base, partitioned=True)
    if not s.partitioned:  # a replicated backbone: partition it first
        for batch in batches:
            yield replace(zero3, micro_batch=batch)
    for batch in batches:
        yield replace(zero3, offload_params=True, micro_batch=batch)
    for nodes in range(s.nodes + 1, max_nodes + 1):
        for batch in batches:
            yield replace(zero3, nodes=nodes, micro_batch=batch)


def describe_change(s: Setup, new: Setup) -> list[str]:
    """The run-config edits (and launch change) that turn ``s`` into ``new``."""
    changes = []
    if new.checkpointing and not s.checkpointing:
        changes.append("model.gradient_checkpointing=true")
    if new.micro_batch != s.micro_batch:
        changes.append(
            f"train.micro_batch_size={new.micro_batch} with train.grad_accum x{s.micro_batch // new.micro_batch}"
        )
    if new.offload_params and not s.offload_params:
        changes.append("engine.deepspeed=zero3_offload")
    elif new.partitioned and not s.partitioned:
        changes.append("engine.deepspeed=zero3_bf16")
    if new.nodes != s.nodes:
        changes.append(f"{new.nodes} nodes")
    return changes


def smallest_fix(m: ModelShape, s: Setup, max_nodes: int = 64) -> dict | None:
    """The first of :func:`_candidates` that fits: its changes and total. None if the plan fits already or nothing
    up to ``max_nodes`` nodes does."""
    if plan(m, s)["fits"]:
        return None
    for setup in _candidates(s, max_nodes):
        result = plan(m, setup)
        if result["fits"]:
            return {"changes": describe_change(s, setup), "total_bytes": result["total_bytes"], "setup": asdict(setup)}
    return None


# ---- DeepSpeed's estimator, for comparison ---------------------------------------------------------------------------
def deepspeed_estimates(m: ModelShape, s: Setup) -> dict[str, int]:
    """DeepSpeed's ZeRO-3 model-state formulas (``estimate_zero3_model_states_mem_needs``, GPU side) for this
    model: every parameter trained (18 bytes a parameter: bf16 weight and gradient, fp32 master and Adam moments),
    and with the optimizer offloaded (2 bytes a parameter), which is what a frozen bf16 backbone costs."""
    counts = parameter_counts(m)
    largest = 4 * counts["largest_module"]
    return {
        "all_trained": largest + int(18 * counts["total"] / s.world),
        "optimizer_offloaded": largest + int(2 * counts["total"] / s.world),
    }
