"""What ``python -m benchmarks.bench`` runs: the workload (one frozen model, one fixed batch) and the sides.

Two workloads: classification (the verbalizer's cross-entropy at the last position of review rows) and, with
``task="generation"`` (``--generation train``), prompt + response rows (BBC articles and their headlines,
:func:`headline_rows`) under the language-model loss on the response tokens; every side
computes the workload's loss.

A *side* is one way of training over the same frozen backbone and the same batch; :data:`SIDES` maps its name
to a builder ``Workload -> Side``. A variant (say another attention implementation) is one more entry::

    SIDES["k3_beta0"] = lambda w: subspace_side(w, 3, beta=0.0)

Imports stay light on purpose: no Accelerate, DeepSpeed or ``datasets`` (a GPU image without them runs this),
PEFT only when its side is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dist_subspace.core.arch import prefix_geometry
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel, only_positions
from dist_subspace.core.paths import CHECKOUT

if TYPE_CHECKING:
    from transformers import PretrainedConfig

T = TypeVar("T")
ROOT = CHECKOUT  # benchmarks run from a checkout: its root goes on the PYTHONPATH of the processes they start

# Llama-shaped decoders built from a config, no download: a tiny one for tests and dry runs, and one shaped like
# Llama-3.2-1B (1.24B parameters, 16 layers, GQA 32/8 heads) for a GPU.
MODEL_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(
        model_type="llama",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "llama-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
}


@dataclass(frozen=True)
class BenchSpec:
    """What one measurement runs: the same model, batch, length, P and dtype on every side."""

    model: str = "smollm2-135m"
    batch: int = 8
    seq_len: int = 64
    prefix_length: int = 16
    dtype: str = "auto"  # auto: bfloat16 on a GPU that has it, else float32
    device: str = "auto"  # auto: cuda when there is one
    sides: tuple[str, ...] = ("limit", "peft", "k1", "k3", "k6")
    rounds: int = 10
    warmup: int = 2
    compile: str = "inductor"  # backend that proves sampler + mixer compile with fullgraph=True; "off" skips
    memory: bool = True  # peak memory of each side, each in a fresh process
    clock: str = "auto"  # auto: process CPU time on a CPU with one thread (a shared machine's load), else wall
    task: str = "classification"  # or "generation": prompt + response rows, the LM loss on the response tokens

    def resolved_clock(self) -> str:
        if self.clock != "auto":
            return self.clock
        return "cpu" if self.torch_device().type == "cpu" and torch.get_num_threads() == 1 else "wall"

    def flags(self) -> list[str]:
        """The bench flags that rebuild this workload (for a fresh process and for the README)."""
        return [
            f"--model={self.model}",
            f"--batch={self.batch}",
            f"--seq-len={self.seq_len}",
            f"--prefix-length={self.prefix_length}",
            f"--dtype={self.dtype}",
            f"--device={self.device}",
            *(["--generation=train"] if self.task == "generation" else []),
        ]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            cuda = self.torch_device().type == "cuda"
            return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        return getattr(torch, self.dtype)


# ---- the workload ----------------------------------------------------------------------------------
@dataclass
class Workload:
    """One frozen backbone and one fixed batch that every side trains on."""

    backbone: nn.Module
    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S], all ones: fixed-length rows, no padding
    labels: torch.Tensor  # [B] class index into label_token_ids; generation: [B, S] response ids, -100 elsewhere
    index: torch.Tensor  # [B] example indices (with the step they seed each example's alpha)
    label_token_ids: list[int]
    prefix_length: int
    tokens: str  # where the token ids come from
    special_token_ids: list[int] = field(default_factory=list)
    vocab_size: int | None = None  # of the tokenizer, when there is one

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def generation(self) -> bool:
        """Prompt + response rows: the loss is the language model's on the response tokens."""
        return self.labels.dim() == 2

    def response_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation: ``(rows, cols)`` ``[N]`` each, the positions whose next token is a response token."""
        return (self.labels[:, 1:] != -100).nonzero(as_tuple=True)


def model_config(name: str) -> PretrainedConfig | None:
    """A transformers config when ``name`` names one (a key of :data:`MODEL_CONFIGS`, ``config:{...json...}`` or
    ``config:path.json``), else None (``name`` is then a model to load)."""
    if name in MODEL_CONFIGS:
        fields = dict(MODEL_CONFIGS[name])
    elif name.startswith("config:"):
        text = name[len("config:") :]
        fields = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
    else:
        return None
    from transformers import AutoConfig

    model_type = fields.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **fields)


def load_backbone(name: str, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, object | None]:
    """(frozen causal LM in eval mode on ``device``, its tokenizer, or None for a model built from a config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = model_config(name)
    if config is not None:
        torch.manual_seed(0)
        with torch.device(device):  # built in place: a 1B model never goes through host memory
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval().requires_grad_(False), None
    from dist_subspace.core.embedded import resolve_model

    path = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
    return model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(path)


def review_tokens(tokenizer, batch: int, seq_len: int) -> torch.Tensor:
    """``[B, S]`` token ids: Rotten Tomatoes reviews tokenised back to back (EOS between them), cut into rows."""
    from dist_subspace.data.offline import OFFLINE

    reviews = [e["text"] for e in OFFLINE["rotten_tomatoes"]()["all"]]
    need, stream = batch * seq_len, []
    for start in range(0, len(reviews), 512):
        for ids in tokenizer(reviews[start : start + 512], add_special_tokens=False)["input_ids"]:
            stream.extend([*ids, tokenizer.eos_token_id])
        if len(stream) >= need:
            return torch.tensor(stream[:need]).view(batch, seq_len)
    raise ValueError(f"--batch {batch} x --seq-len {seq_len} needs {need} tokens; the reviews give {len(stream)}")


def build_workload(spec: BenchSpec, backbone: nn.Module | None = None, tokenizer=None) -> Workload:
    """The backbone (loaded unless given) and a fixed batch of ``spec.batch`` rows of ``spec.seq_len`` tokens."""
    device = spec.torch_device()
    if backbone is None:
        backbone, tokenizer = load_backbone(spec.model, spec.torch_dtype(), device)
    if spec.task == "generation":
        ids, labels, tokens = headline_rows(tokenizer, spec.batch, spec.seq_len, backbone.config.vocab_size)
        return Workload(
            backbone=backbone,
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            labels=labels.to(device),
            index=torch.arange(spec.batch).to(device),
            label_token_ids=[],
            prefix_length=spec.prefix_length,
            tokens=tokens,
            special_token_ids=tokenizer.all_special_ids if tokenizer is not None else [],
            vocab_size=len(tokenizer) if tokenizer is not None else None,
        )
    if tokenizer is not None:
        from dist_subspace.data.batching import label_token_ids
        from dist_subspace.data.tasks import TASKS

        ids = review_tokens(tokenizer, spec.batch, spec.seq_len)
        words = label_token_ids(tokenizer, TASKS["rotten_tomatoes"].label_words)
        tokens, special, vocab = "rotten_tomatoes reviews", tokenizer.all_special_ids, len(tokenizer)
    else:  # no tokenizer: uniform ids (attention and matmul costs do not depend on which tokens)
        vocab_size = backbone.config.vocab_size
        ids = torch.randint(0, vocab_size, (spec.batch, spec.seq_len), generator=torch.Generator().manual_seed(0))
        words, tokens, special, vocab = [1, 2], "uniform random ids", [], None
    index = torch.arange(spec.batch)
    return Workload(
        backbone=backbone,
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        labels=(index % len(words)).to(device),
        index=index.to(device),
        label_token_ids=words,
        prefix_length=spec.prefix_length,
        tokens=tokens,
        special_token_ids=special,
        vocab_size=vocab,
    )


def headline_rows(tokenizer, batch: int, seq_len: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``batch`` rows of exactly ``seq_len`` tokens ``[B, S]`` and their labels ``[B, S]``: BBC articles (the whole
    article, not the task's 120-word lead) in ``bbc_headlines``' template with their headline as the response,
    through the task's collator at ``max_length=seq_len``, which keeps the response and the prompt's end; the first
    articles in file order long enough to be cut. No tokenizer (a model built from a config): uniform ids, the last
    quarter (at most 8) of each row the response."""
    if tokenizer is None:
        ids = torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
        labels = torch.full_like(ids, -100)
        labels[:, -min(8, max(1, seq_len // 4)) :] = ids[:, -min(8, max(1, seq_len // 4)) :]
        return ids, labels, "uniform random ids, the response the last quarter (at most 8)"
    from dist_subspace.data.batching import Collator
    from dist_subspace.data.offline import OFFLINE
    from dist_subspace.data.tasks import TASKS

    collator = Collator(tokenizer, TASKS["bbc_headlines"], decoder=True, max_length=seq_len)
    rows = []
    for example in OFFLINE["bbc_news"]()["all"]:  # each file: the headline, a blank line, the article
        headline, _, article = example["text"].partition("\n")
        encoded = collator.encode({"text": article.strip(), "label": " " + headline.strip(), "id": example["id"]})
        if len(encoded["input_ids"]) == seq_len:  # cut at its start: long enough
            rows.append(encoded)
            if len(rows) == batch:
                ids = torch.tensor([r["input_ids"] for r in rows])
                labels = torch.tensor([r["labels"] for r in rows])
                return ids, labels, "bbc articles (cut at their start) and their headlines, the LM loss on the headline"
    raise ValueError(f"--seq-len {seq_len}: only {len(rows)} BBC articles are that long; lower --batch or --seq-len")


# ---- the sides -------------------------------------------------------------------------------------
@dataclass
class Side:
    """A built side: ``step()`` runs one training step (forward, backward, optimizer step if it has one);
    ``loss()`` the forward alone, its loss (the sides' losses are compared with it); ``model`` what it trains."""

    step: Callable[[], None]
    trainable_params: int
    prefix_length: int  # tokens the attention sees before the input (0: no prefix)
    head_rows: int | None = None  # rows the LM head runs on (None: one per example, the last position)
    loss: Callable[[], torch.Tensor] | None = None
    model: nn.Module | None = None


def _verbalizer_loss(logits: torch.Tensor, workload: Workload, label_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the label words' logits at the last position; ``logits`` ``[B, 1, V]``."""
    return F.cross_entropy(logits[:, -1].float().index_select(-1, label_ids), workload.labels)


def _response_loss(backbone: nn.Module, w: Workload, **inputs) -> torch.Tensor:
    """The LM loss on the response tokens (the mean over them, as transformers' ``labels=`` loss and the trainer's
    token-level loss take it), the head run on those positions only, as ``response_nll`` runs it."""
    rows, cols = w.response_positions()
    with only_positions(backbone.base_model, rows, cols):
        logits = backbone(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1].float()  # [N, V]
    return F.cross_entropy(logits, w.labels[:, 1:][rows, cols])


def _optimizer_step(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # as the trainer does (and HF Trainer by default)
    opt.step()
    opt.zero_grad(set_to_none=True)


def limit_side(w: Workload) -> Side:
    """The least work any prefix method does: the frozen forward and a backward that carries the gradient down
    to the input embeddings (no weight gradients, no prefix, nothing to optimise)."""
    embed = w.backbone.get_input_embeddings()
    label_ids = torch.tensor(w.label_token_ids, device=w.device)

    def loss() -> torch.Tensor:
        embeds = embed(w.input_ids).detach().requires_grad_()  # [B, S, H]: the gradient stops here
        if w.generation:
            return _response_loss(w.backbone, w, inputs_embeds=embeds, attention_mask=w.attention_mask)
        out = w.backbone(inputs_embeds=embeds, attention_mask=w.attention_mask, logits_to_keep=1, use_cache=False)
        return _verbalizer_loss(out.logits, w, label_ids)

    def step() -> None:
        loss().backward()

    head = len(w.response_positions()[0]) if w.generation else None
    return Side(_with_attention(False, step, w.backbone), 0, 0, head, _with_attention(False, loss, w.backbone))


def peft_side(w: Workload) -> Side:
    """PEFT ``PrefixTuning`` (CAUSAL_LM, no projection) with the same P, AdamW on its prefix. Generation: the loss
    through ``labels=``, as PEFT's users train (transformers computes the logits of every position and shifts)."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=w.prefix_length)
    model = get_peft_model(w.backbone, config).to(w.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    label_ids = torch.tensor(w.label_token_ids, device=w.device)

    def loss() -> torch.Tensor:
        if w.generation:
            return model(input_ids=w.input_ids, attention_mask=w.attention_mask, labels=w.labels).loss
        out = model(input_ids=w.input_ids, attention_mask=w.attention_mask, logits_to_keep=1)
        return _verbalizer_loss(out.logits, w, label_ids)

    def step() -> None:
        loss().backward()
        _optimizer_step(params, opt)

    trainable, head = sum(p.numel() for p in params), w.input_ids.numel() if w.generation else None
    run, forward = _with_attention(False, step, w.backbone), _with_attention(False, loss, w.backbone)
    return Side(run, trainable, w.prefix_length, head, forward, model)


def _with_attention(prefix_path: bool, step: Callable[[], T], backbone: nn.Module) -> Callable[[], T]:
    """Run ``step`` with this project's prefix attention path on or off (the sides share one backbone; the
    switch is a config field, well under a millisecond)."""
    from dist_subspace.core import attention

    def run() -> T:
        attention.enable(backbone) if prefix_path else attention.disable(backbone)
        return step()

    return run


def subspace_side(w: Workload, num_vertices: int, beta: float = 1.0, prefix_path: bool = True) -> Side:
    """This project's training step (as ``Recipe.train_step``): ``example_layer`` alphas, verbalizer loss (generation:
    ``response_nll``, its summed NLL over the response tokens' count), regulariser, clipping, AdamW; the sampler's
    step counter advances on the device. ``prefix_path=False``: transformers' SDPA behind the prefix instead (an
    explicit mask, repeated key/value heads)."""
    model = PrefixSubspaceModel(w.backbone, num_vertices, w.prefix_length, label_token_ids=w.label_token_ids)
    model.place(w.device)
    init = initial_vertices(model, exclude_token_ids=w.special_token_ids, vocab_size=w.vocab_size)
    model.simplex.vertices.data.copy_(init)
    model.train()
    params = list(model.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    step_tensor = torch.zeros((), dtype=torch.long, device=w.device)

    def loss() -> torch.Tensor:
        alpha = model.sample_alpha(step_tensor, w.index)  # [B, L, K]
        if w.generation:
            nll, count = model.response_nll(w.input_ids, w.attention_mask, w.labels, alpha)  # [B] each
            return nll.sum() / count.sum().clamp(min=1)  # Recipe.train_step's token-level loss, one replica
        return F.cross_entropy(model(w.input_ids, w.attention_mask, alpha), w.labels)

    def step() -> None:
        loss().backward()
        reg = beta * model.regulariser()
        if reg.requires_grad:
            reg.backward()
        _optimizer_step(params, opt)
        step_tensor.add_(1)

    trainable, head = sum(p.numel() for p in params), len(w.response_positions()[0]) if w.generation else None
    run, forward = _with_attention(prefix_path, step, w.backbone), _with_attention(prefix_path, loss, w.backbone)
    return Side(run, trainable, w.prefix_length, head, forward, model)


SIDES: dict[str, Callable[[Workload], Side]] = {
    "limit": limit_side,
    "peft": peft_side,
    "k1": lambda w: subspace_side(w, 1),
    "k3": lambda w: subspace_side(w, 3),
    "k6": lambda w: subspace_side(w, 6),
    "k3_sdpa": lambda w: subspace_side(w, 3, prefix_path=False),  # K = 3 through transformers' default attention
}


def step_flops(
    config: PretrainedConfig, batch: int, seq_len: int, prefix_length: int, head_rows: int | None = None
) -> int:
    """Model FLOPs of one step over a frozen decoder: forward, plus a backward that computes input gradients
    only (no weight gradients: 1x the forward for the linear layers, 2x for attention's two products).
    Attention counts the full ``S x (P + S)`` score matrix (no causal halving, as PaLM's MFU does); the LM head
    runs on ``head_rows`` rows (default: the last position of each example)."""
    g = prefix_geometry(config)
    h, heads, inter = config.hidden_size, config.num_attention_heads, config.intermediate_size
    q_dim, kv_dim = heads * g.head_dim, g.num_kv_heads * g.head_dim
    per_token = 2 * g.num_layers * (h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * inter)  # q k v o, gate up down
    linear = per_token * batch * seq_len
    attention = 4 * g.num_layers * batch * q_dim * seq_len * (seq_len + prefix_length)  # QK^T and AV
    head = 2 * (batch if head_rows is None else head_rows) * h * config.vocab_size  # logits of head_rows rows
    return 2 * (linear + head) + 3 * attention
