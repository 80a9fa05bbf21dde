"""A frozen transformers model driven by a simplex of K prefixes.

Library face::

    model = PrefixSubspaceModel(backbone, num_vertices=3, prefix_length=16, label_token_ids=[2731, 3524])
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    alpha = model.sample_alpha(step, example_index)          # [B, L(+1), K], on the device
    logits = model(input_ids, attention_mask, alpha)          # [B, C]
    loss = F.cross_entropy(logits, labels) + beta * model.regulariser()

The prefix reaches every attention layer through a cache whose layers *return* prefix+input keys/values
without storing them: stateless, so a fresh one per forward costs nothing and gradient checkpointing
(which re-runs layers in backward) sees the same keys twice instead of a cache that grew. MPNet takes no cache:
its self-attention takes the prefix itself, for the duration of one forward (``ArchSpec.injection``, core/mpnet.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from dist_subspace.core import attention, mpnet, simplex
from dist_subspace.core.arch import arch_spec, input_position_ids, prefix_geometry, sliding_window


class _PrefixLayer(DynamicLayer):
    """One layer's prefix: ``update`` returns ``cat(prefix, new)`` and keeps nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values  # [B, H_kv, P, D]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def prefix_cache(prefix: torch.Tensor) -> Cache:
    """A transformers cache holding ``prefix`` ``[B, L, 2, H_kv, P, D]`` (key and value per layer). Unbound, not
    indexed: the backward of ``prefix[:, i, 0]`` writes a full-size zero gradient per layer, L^2 work (55 ms of a
    SmolLM2 step at batch 8 on CPU, against 3 ms for unbind's one stack)."""
    return Cache(layers=[_PrefixLayer(*layer.unbind(1)) for layer in prefix.unbind(1)])


def prefix_attention_mask(
    config,
    mask: torch.Tensor,
    cache: Cache,
    query_length: int,
    prefix_length: int,
    dtype: torch.dtype,
    forwards_prefix_length: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask for a forward over a cache whose first ``prefix_length`` positions are the prefix.

    ``mask`` ``[B, cached + S]`` (ones over the prefix), returned as is unless the model has sliding-window
    layers: their mask would hide the prefix from every query more than a window past it. Then transformers'
    own masks (in the format of the configured attention), with the P prefix keys visible to every query: one
    4D mask, or a dict by layer type for models with ``layer_types`` (Gemma 2/3, Qwen2 with a window).
    ``forwards_prefix_length``: the caller hands ``prefix_length`` to ``prefix_sdpa``, which keeps the prefix
    visible itself when it runs without a mask: then a batch with no pad before a real token keeps its 2D mask.
    """
    window = sliding_window(config)
    if window is None:
        return mask
    if forwards_prefix_length and config._attn_implementation == attention.PREFIX_ATTENTION:
        new = mask[:, prefix_length:]
        if bool((new[:, 1:] <= new[:, :-1]).all()):  # right-padded or unpadded: no mask needed (attention.py)
            return mask
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    if "flash" in config._attn_implementation and mask.shape[1] > window:
        raise ValueError(
            f"{config._attn_implementation} applies the sliding window ({window}) inside its kernel, which would hide "
            f"the prefix from queries more than {window} positions past it; load the model with sdpa or eager attention"
        )

    def prefix_visible(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < prefix_length

    kwargs = dict(
        config=config,
        inputs_embeds=mask.new_empty((mask.shape[0], query_length, 0), dtype=dtype),  # read for B, S, dtype only
        attention_mask=mask,
        cache=cache,
    )
    sliding = create_sliding_window_causal_mask(**kwargs, or_mask_function=prefix_visible)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return sliding
    return {kind: sliding if kind == "sliding_attention" else create_causal_mask(**kwargs) for kind in set(layer_types)}


class SimplexHead(nn.Module):
    """K linear heads mixed with the same alpha: features ``[B, H]``, alpha ``[B, K]`` -> ``[B, C]``."""

    def __init__(self, num_vertices: int, hidden_size: int, num_outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_vertices, num_outputs, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_vertices, num_outputs))
        bound = 1 / hidden_size**0.5
        for w, b in zip(self.weight, self.bias, strict=True):  # independent starting points, as for the prefixes
            nn.init.kaiming_uniform_(w, a=5**0.5)
            nn.init.uniform_(b, -bound, bound)  # nn.Linear's rule: K distinct biases, not K zeros

    def forward(self, features: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        weight = simplex.mix(self.weight, alpha)  # [B, C, H]
        bias = simplex.mix(self.bias, alpha)  # [B, C]
        return torch.einsum("bh,bch->bc", features.to(weight.dtype), weight) + bias


class PrefixSimplex(nn.Module):
    """Everything that is trained: ``vertices`` ``[R * K, L, 2, H_kv, P, D]`` and, for encoders, ``head``.

    R seed replicas (default 1) are R independent simplices stored back to back: replica r owns vertices
    ``r * K .. r * K + K - 1`` (and the same rows of the head), so one einsum mixes a batch whose examples
    belong to different replicas.
    """

    def __init__(
        self,
        num_vertices: int,
        num_layers: int,
        num_kv_heads: int,
        prefix_length: int,
        head_dim: int,
        head: SimplexHead | None = None,
        num_replicas: int = 1,
    ) -> None:
        super().__init__()
        if num_vertices < 1 or prefix_length < 1 or num_replicas < 1:
            raise ValueError(f"need K, P, R >= 1 (got K={num_vertices}, P={prefix_length}, R={num_replicas})")
        shape = (num_replicas * num_vertices, num_layers, 2, num_kv_heads, prefix_length, head_dim)
        self.vertices = nn.Parameter(torch.zeros(shape))
        self.head = head
        self.num_vertices, self.num_replicas = num_vertices, num_replicas


class PrefixSubspaceModel(nn.Module):
    """Frozen backbone + trainable :class:`PrefixSimplex`; ``forward`` returns class logits ``[B, C]``.

    Decoders (``label_token_ids`` given) classify with the LM's next-token logits of each label word at
    each example's last real token (right padding, as the Collator gives, lets decoder attention run without a
    mask; left padding works too, through a mask). Encoders (``num_outputs`` given) mean-pool the last hidden
    states and apply a simplex head; its alpha is row L of an ``[B, L + 1, K]`` alpha.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_vertices: int,
        prefix_length: int,
        label_token_ids: Sequence[int] | None = None,
        num_outputs: int | None = None,
        replicas: int = 1,
    ) -> None:
        super().__init__()
        config = backbone.config
        self.spec, self.geometry = arch_spec(config), prefix_geometry(config)
        if self.spec.kind == "decoder" and label_token_ids is None:
            raise ValueError(
                "a decoder classifies with a verbalizer: pass label_token_ids (one token per label; [] for a model "
                "that only generates)"
            )
        if self.spec.kind == "encoder" and not num_outputs:
            raise ValueError("an encoder needs a head: pass num_outputs (number of classes, 1 for regression)")
        for p in backbone.parameters():
            p.requires_grad_(False)
        # Our cache is read-only, so a checkpointed layer may keep it: the backward replay reads the same
        # prefix. transformers drops any cache under checkpointing unless a layer says so.
        for module in backbone.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module._can_checkpoint_with_cache = True
        self.backbone = backbone
        attention.enable(backbone)  # prefix-aware SDPA: causal fast path, grouped key/value heads (attention.py)
        if self.spec.injection == "attention":
            mpnet.install(backbone)  # the prefix through MPNet's self-attention (mpnet.py)
        self.config = config
        self.prefix_length = prefix_length
        g = self.geometry
        rows = replicas * num_vertices
        head = SimplexHead(rows, config.hidden_size, num_outputs) if self.spec.kind == "encoder" else None
        self.simplex = PrefixSimplex(
            num_vertices, g.num_layers, g.num_kv_heads, prefix_length, g.head_dim, head, replicas
        )
        self.use_prefix = True  # False: a baseline that trains something else (LoRA) over the same head
        self.adapter: dict[str, nn.Parameter] = {}  # trained backbone parameters of such a baseline, by name
        ids = torch.tensor(list(label_token_ids or []), dtype=torch.long)
        self.register_buffer("label_token_ids", ids, persistent=False)

    # ---- what is trained -------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer updates: the simplex (vertices and head; without the vertices when frozen) and any
        adapter parameters; the backbone is frozen."""
        yield from (p for p in self.simplex.parameters() if p.requires_grad)
        yield from self.adapter.values()

    @property
    def num_vertices(self) -> int:
        """K, per replica."""
        return self.simplex.num_vertices

    @property
    def num_replicas(self) -> int:
        return self.simplex.num_replicas

    def place(self, device: torch.device | str) -> PrefixSubspaceModel:
        """Move what is trained (and the label ids) to ``device``; the backbone is placed by whoever loads it."""
        self.simplex.to(device)
        self.label_token_ids = self.label_token_ids.to(device)
        return self

    def train(self, mode: bool = True) -> PrefixSubspaceModel:
        """Training mode for the simplex; the frozen backbone stays deterministic (no dropout), so a step is
        a pure function of (simplex, batch, alpha) and resume is exact. Only its checkpointable layers carry
        the training flag, which is what gradient checkpointing looks at."""
        super().train(mode)
        self.backbone.eval()
        if mode:
            for module in self.backbone.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    module.training = True
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute backbone activations in backward (non-reentrant, so no input needs grad)."""
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def alpha_rows(self) -> int:
        """Rows of an ``example_layer`` alpha: one per layer, plus one for the head of an encoder."""
        return self.geometry.num_layers + (self.simplex.head is not None)

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def sample_alpha(
        self,
        step: torch.Tensor,
        example_index: torch.Tensor,
        granularity: str = "example_layer",
        seed: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Dirichlet(1) alpha for a micro-batch (see :func:`simplex.sample_alpha`; ``seed`` ``[B]`` for replicas)."""
        return simplex.sample_alpha(seed, step, example_index, self.num_vertices, self.alpha_rows, granularity)

    def regulariser(self, kind: str = "cos2", head: bool = False) -> torch.Tensor:
        """Mean pairwise cos^2 of the flattened vertices of each replica, summed over replicas (0-d);
        ``cos2_centred``: of the vertices centred over their P positions (per layer, key/value and head).
        ``head``: plus the same for an encoder head's K weight matrices ``[R * K, C, H]``."""
        if kind not in simplex.REGULARISERS:
            raise ValueError(f"unknown regulariser {kind!r}; use one of {simplex.REGULARISERS}")
        centre_dim = -2 if kind == "cos2_centred" else None
        reg = simplex.cosine_regulariser(self.simplex.vertices, self.num_replicas, centre_dim)
        if head and self.simplex.head is not None:
            reg = reg + simplex.cosine_regulariser(self.simplex.head.weight, self.num_replicas)
        return reg

    # ---- forward ---------------------------------------------------------------------------------
    def block_alpha(self, alpha: torch.Tensor, batch: int, replica: torch.Tensor | None = None) -> torch.Tensor:
        """Per-replica alpha (``[K]``, ``[B, K]`` or ``[B, L(+1), K]``) and each example's replica ``[B]`` ->
        ``[B, L(+1), R * K]`` over all stored vertices (R = 1: just broadcast)."""
        rows = simplex.expand_alpha(alpha, batch, self.alpha_rows)  # [B, L(+1), K]
        if self.num_replicas == 1:
            return rows
        if replica is None:
            raise ValueError(f"this model holds {self.num_replicas} seed replicas: pass each example's replica [B]")
        return simplex.replica_alpha(rows, replica, self.num_replicas)

    def prefix(
        self, alpha: torch.Tensor, batch: int, replica: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mixed prefix ``[B, L, 2, H_kv, P, D]`` in the backbone's compute dtype; ``noise`` (same shape, fp32)
        is added before the cast (the noise-injection control)."""
        rows = self.block_alpha(alpha, batch, replica)
        mixed = simplex.mix_prefix(self.simplex.vertices, rows[:, : self.geometry.num_layers])
        if noise is not None:
            mixed = mixed + noise
        return mixed.to(self.compute_dtype)

    def backbone_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: torch.Tensor,
        replica: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[dict, AbstractContextManager]:
        """The backbone's keyword arguments for ``[B, S]`` inputs under the mixed prefix of ``alpha`` (positions, the
        prefix cache and the mask that shows it), and the context to run it in (MPNet's attention takes the prefix
        itself, for one forward)."""
        batch, p = input_ids.shape[0], self.prefix_length if self.use_prefix else 0
        position_ids = input_position_ids(self.spec, attention_mask, p, self.config)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        injected: AbstractContextManager = nullcontext()
        if self.use_prefix and self.spec.injection == "attention":  # MPNet: no cache; its attention takes the prefix
            injected = mpnet.prefixed(self.backbone, self.prefix(alpha, batch, replica, noise))
        elif self.use_prefix:
            full = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)  # [B, P + S]: prefix visible
            cache = prefix_cache(self.prefix(alpha, batch, replica, noise))
            mask = prefix_attention_mask(self.config, full, cache, input_ids.shape[1], p, self.compute_dtype, True)
            inputs.update(attention_mask=mask, cache=cache)
        if self.config._attn_implementation == attention.PREFIX_ATTENTION:
            inputs["prefix_length"] = p  # see prefix_attention_mask
        return inputs, injected

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        replica: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask (, token_type_ids) ``[B, S]``; alpha ``[K]``, ``[B, K]`` or ``[B, L(+1), K]``
        (per replica; ``replica`` ``[B]`` says whose, needed when R > 1) -> class logits ``[B, C]``."""
        inputs, injected = self.backbone_inputs(input_ids, attention_mask, alpha, replica, noise)
        if self.spec.kind == "decoder":
            with last_real_token_only(self.backbone.base_model, attention_mask):
                out = self.backbone(**inputs, logits_to_keep=1)
            return out.logits[:, -1, :].float().index_select(-1, self.label_token_ids)  # [B, C]
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        with injected:
            hidden = self.backbone(**inputs).last_hidden_state.float()  # [B, S, H], pooled in fp32
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # [B, H] mean over real tokens
        return self.simplex.head(pooled, self.block_alpha(alpha, input_ids.shape[0], replica)[:, -1])

    def response_nll(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        alpha: torch.Tensor,
        replica: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoder's teacher-forced response: prompt + response tokens ``[B, S]`` and ``labels`` ``[B, S]`` (the
        response's ids, -100 on the prompt and the padding) -> each example's summed negative log-likelihood of its
        response tokens ``[B]`` (fp32) and their count ``[B]``. Token t is predicted at position t - 1; the LM head
        runs on those positions only (:func:`only_positions`), not on the whole ``[B, S, V]``."""
        inputs, _ = self.backbone_inputs(input_ids, attention_mask, alpha, replica, noise)
        target = labels[:, 1:]  # [B, S - 1]
        rows, cols = (target != -100).nonzero(as_tuple=True)  # [N] each
        with only_positions(self.backbone.base_model, rows, cols):
            logits = self.backbone(**inputs, logits_to_keep=1).logits[:, -1].float()  # [N, V]
        nll = torch.nn.functional.cross_entropy(logits, target[rows, cols], reduction="none")  # [N]
        batch = input_ids.shape[0]
        total = torch.zeros(batch, device=nll.device).index_add(0, rows, nll)
        count = torch.zeros(batch, device=nll.device).index_add(0, rows, torch.ones_like(nll))
        return total, count

    # ---- initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def kv_activations(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The frozen model's own keys/values for ``token_ids`` ``[N, P]`` -> ``[N, L, 2, H_kv, P, D]``."""
        if self.spec.injection == "attention":
            return mpnet.kv_activations(self.backbone, token_ids)
        cache = DynamicCache()
        mask = torch.ones_like(token_ids)
        self.backbone(input_ids=token_ids, attention_mask=mask, cache=cache, use_cache=True)
        layers = [torch.stack([layer.keys, layer.values], dim=1) for layer in cache.layers]  # L x [N, 2, H, P, D]
        return torch.stack(layers, dim=1).float()


@contextmanager
def only_positions(decoder: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """While open, ``decoder``'s last hidden states ``[B, S, H]`` are cut to ``[N, 1, H]``: the positions
    ``(rows[n], cols[n])``, each a row of its own. The LM head (and any final logit transform of the family) then
    runs on N rows, inside the backbone's own forward, hooks included (ZeRO-3 gathers there). The rows are
    gathered, hence contiguous: the strided ``[:, -1:]`` slice of ``logits_to_keep=1`` sends the head through a
    batched matmul over a broadcast weight, 4x slower on CPU (SmolLM2, batch 8: 158 ms forward+backward, not 36)."""

    def cut(module: nn.Module, args, output):
        output.last_hidden_state = output.last_hidden_state[rows, cols].unsqueeze(1)  # [N, 1, H]
        return output

    handle = decoder.register_forward_hook(cut)
    try:
        yield
    finally:
        handle.remove()


def last_real_token_only(decoder: nn.Module, attention_mask: torch.Tensor) -> AbstractContextManager:
    """:func:`only_positions` at each example's last real token (``attention_mask`` ``[B, S]``, left or right
    padded): the hidden states become ``[B, 1, H]``."""
    positions = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)  # [B] last 1 of each row
    return only_positions(decoder, torch.arange(len(positions), device=positions.device), positions)
