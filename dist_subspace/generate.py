"""Generate text with any point of a trained simplex: ``python -m dist_subspace.generate RUN_DIR --prompt TEXT``.

    python -m dist_subspace.generate runs/default --prompt "The film was" --max-new-tokens 20
    python -m dist_subspace.generate runs/default --prompt "The film was" --point vertex:1
    python -m dist_subspace.generate runs/default --prompt "A" --prompt "B" --point alpha=0.5,0.3,0.2
    python -m dist_subspace.generate runs/default --prompt "The film was" --point ensemble:8

The mixed prefix fills the first P positions of a plain ``DynamicCache``; the prompt then runs at positions P, P+1,
... (as in training) and decoding continues one token at a time on that cache. Greedy by default; ``--temperature``
samples (``--seed``). Prints one JSON object: the point, its alpha, and each prompt's completion and new token ids.

``--point ensemble:S`` decodes from the mixture of S points, drawn per prompt (and per layer) as evaluation draws
them (:func:`~dist_subspace.evaluation.decoding.decode_texts`): its alpha is null, and each result adds ``entropy``
(the mixture's mean entropy per generated token) and ``disagreement`` (the share of the S points whose own response
differs). ``--num-beams N`` runs beam search at one point (not with an ensemble, nor with ``--temperature``).

From Python::

    backbone, tokenizer, vertices = load_run("runs/default")
    texts = generate(backbone, tokenizer, vertices, parse_point("centroid", len(vertices)), ["The film was"])
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dist_subspace.core import simplex
from dist_subspace.core.cli import USER_ERRORS, exit_now, user_error
from dist_subspace.core.config import ConfigError, check_eval_mode


def parse_point(point: str, num_vertices: int) -> torch.Tensor:
    """``centroid``, ``vertex:I`` or ``alpha=a,b,...`` (K non-negative weights summing to 1) -> alpha ``[K]``."""
    if point == "centroid":
        return simplex.centroid_alpha(num_vertices)
    kind, _, value = point.partition(":") if point.startswith("vertex:") else point.partition("=")
    try:
        if kind == "vertex":
            return simplex.vertex_alpha(num_vertices, int(value))
        if kind == "alpha":
            alpha = torch.tensor([float(a) for a in value.split(",")])
            if len(alpha) == num_vertices and (alpha >= 0).all() and abs(alpha.sum().item() - 1) < 1e-4:
                return alpha
    except ValueError as err:
        raise ConfigError(f"--point {point!r}: {err}") from None
    raise ConfigError(
        f"--point {point!r}: use centroid, vertex:I (0 <= I < {num_vertices}) or alpha=a,b,... "
        f"({num_vertices} non-negative weights that sum to 1)"
    )


@torch.no_grad()
def generate_ids(
    backbone: nn.Module,
    prefix: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode after a prefix: prefix ``[B, L, 2, H_kv, P, D]``, left-padded input_ids/attention_mask ``[B, S]``
    -> new token ids ``[B, N]`` (N <= max_new_tokens; rows that ended are filled with ``eos_token_id``)."""
    from transformers import DynamicCache

    from dist_subspace.core.arch import arch_spec, input_position_ids
    from dist_subspace.core.model import prefix_attention_mask

    config = backbone.config
    batch, p = input_ids.shape[0], prefix.shape[4]
    cache = DynamicCache()  # full layers: a sliding-window layer's cache would drop the prefix; masks keep the window
    for layer in range(prefix.shape[1]):
        cache.update(prefix[:, layer, 0], prefix[:, layer, 1], layer)
    mask = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)  # [B, P + S]
    positions = input_position_ids(arch_spec(config), attention_mask, p, config)  # [B, S], from P on
    tokens, new = input_ids, []
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        masks = prefix_attention_mask(config, mask, cache, tokens.shape[1], p, prefix.dtype)
        logits = (
            backbone(
                input_ids=tokens,
                attention_mask=masks,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
        )  # [B, V]
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(-1)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        new.append(token)
        if done.all():
            break
        tokens, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
    return torch.stack(new, dim=1)


def read_vertices(run_dir: str | Path) -> torch.Tensor:
    """A finished run's vertices ``[K, L, 2, H_kv, P, D]`` (float32); a cut-short or corrupt file is one line."""
    from dist_subspace.training.checkpoint import CheckpointError, read_tensors, verify_folder

    weights = Path(run_dir) / "final" / "simplex.safetensors"
    if not weights.is_file():
        replicas = (Path(run_dir) / "replica-0").is_dir()
        hint = " (this run holds seed replicas: pass RUN_DIR/replica-R)" if replicas else ""
        raise ConfigError(f"{weights} not found; pass the folder of a finished run (it has final/){hint}")
    try:
        verify_folder(weights.parent, ("simplex.safetensors",), "rewrite final/ with train.resume=auto on the run")
        return read_tensors(weights)["prefix.vertices"]
    except CheckpointError as err:
        raise ConfigError(str(err)) from None


def load_run(run_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, torch.Tensor]:
    """A finished decoder run's backbone (loaded as in training), tokenizer and vertices ``[K, L, 2, H_kv, P, D]``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_subspace.core.arch import arch_spec
    from dist_subspace.core.config import load_config
    from dist_subspace.core.embedded import resolve_model

    run_dir = Path(run_dir)
    vertices = read_vertices(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.adapter != "prefix":
        raise ConfigError(f"{run_dir} trained model.adapter={cfg.model.adapter}, not a prefix simplex")
    path = resolve_model(cfg.model.name_or_path)
    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).eval()
    if arch_spec(backbone.config).kind != "decoder":
        raise ConfigError(f"{run_dir} is an encoder run ({backbone.config.model_type}): only decoders generate")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return backbone, tokenizer, vertices


def generate(
    backbone: nn.Module,
    tokenizer,
    vertices: torch.Tensor,
    alpha: torch.Tensor,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[dict]:
    """Complete each prompt at the simplex point ``alpha`` ``[K]`` (vertices ``[K, L, 2, H_kv, P, D]``); returns one
    ``{"prompt", "completion", "new_token_ids"}`` per prompt."""
    device = next(backbone.parameters()).device
    dtype = next(backbone.parameters()).dtype
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    rows = simplex.expand_alpha(alpha.to(device), len(prompts), vertices.shape[1])  # [B, L, K]
    prefix = simplex.mix_prefix(vertices.to(device, torch.float32), rows).to(dtype)  # [B, L, 2, H_kv, P, D]
    generator = torch.Generator(device=device).manual_seed(seed)
    new = generate_ids(
        backbone,
        prefix,
        encoded["input_ids"],
        encoded["attention_mask"],
        max_new_tokens,
        tokenizer.eos_token_id,
        temperature,
        generator,
    )
    results = []
    for prompt, ids in zip(prompts, new.tolist(), strict=True):
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
        completion = tokenizer.decode(ids, skip_special_tokens=True)
        results.append({"prompt": prompt, "completion": completion, "new_token_ids": ids})
    return results


class _OneProcess:
    """What decoding asks of an engine, for this one process."""

    rank, world_size, is_main = 0, 1, True

    def any_rank(self, flag: bool) -> bool:
        return flag

    def gather_objects(self, obj) -> list:
        return [obj]


def subspace_model(backbone: nn.Module, vertices: torch.Tensor):
    """A prefix subspace over ``backbone`` holding a run's ``vertices`` ``[K, L, 2, H_kv, P, D]`` (generation only: no
    verbalizer), on the backbone's device."""
    from dist_subspace.core.model import PrefixSubspaceModel

    model = PrefixSubspaceModel(backbone, vertices.shape[0], vertices.shape[4], label_token_ids=[])
    model.simplex.vertices.data.copy_(vertices)
    return model.place(next(backbone.parameters()).device).eval()


def generate_decoded(
    model, tokenizer, point: str | torch.Tensor, prompts: Sequence[str], decoding, sampling: str = "example_layer"
) -> list[dict]:
    """Complete each prompt through :func:`~dist_subspace.evaluation.decoding.decode_texts` with ``model``
    (:func:`subspace_model`): at the point alpha ``[K]``, or for ``ensemble:S`` from the mixture of S points drawn
    (granularity ``sampling``) as evaluation draws them, with each prompt's ``entropy`` and ``disagreement``
    (:func:`~dist_subspace.evaluation.responses.decode_responses`). Returns :func:`generate`'s dicts."""
    from dist_subspace.data.batching import Collator
    from dist_subspace.evaluation.points import mode_points
    from dist_subspace.evaluation.responses import PLAIN_PROMPTS, decode_responses

    ensemble = isinstance(point, str)
    points = mode_points(model, *check_eval_mode(point), sampling) if ensemble else [point]
    collator = Collator(tokenizer, PLAIN_PROMPTS, True, max_length=1 << 30)  # a prompt is never cut
    examples = [{"text": prompt, "text_pair": None, "label": "", "id": i} for i, prompt in enumerate(prompts)]
    responses = decode_responses(model, _OneProcess(), examples, collator, points, ensemble, decoding)
    results, eos = [], tokenizer.eos_token_id
    for n, (prompt, ids) in enumerate(zip(prompts, responses.decoded.token_ids, strict=True)):
        ids = [*ids, eos] if len(ids) < decoding.max_new_tokens else ids  # it ended: with its end-of-sequence token
        completion = tokenizer.decode(ids, skip_special_tokens=True)
        results.append({"prompt": prompt, "completion": completion, "new_token_ids": ids})
        if ensemble:
            results[-1].update(entropy=responses.decoded.entropy[n], disagreement=responses.disagreement[n])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_subspace.generate", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    parser.add_argument(
        "--point", default="centroid", help="centroid | vertex:I | alpha=a,b,... | ensemble:S (default centroid)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0 samples")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search at one point (default 1: none)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    try:
        from dist_subspace.core.config import load_config
        from dist_subspace.evaluation.responses import decoding_options

        if args.max_new_tokens < 1 or args.temperature < 0:
            raise ConfigError("--max-new-tokens must be >= 1 and --temperature >= 0")
        ensemble, alpha = args.point.startswith("ensemble:"), None
        if ensemble and not (args.point[9:].isdigit() and int(args.point[9:]) > 0):
            raise ConfigError(f"--point {args.point!r}: ensemble:S mixes S >= 1 points, e.g. ensemble:8")
        kind = "ensemble" if ensemble else "point"
        decoding = decoding_options(kind, args.max_new_tokens, args.num_beams, (32, 1), args.temperature, args.seed)
        if not ensemble:
            alpha = parse_point(args.point, read_vertices(args.run_dir).shape[0])  # before the slow part
        backbone, tokenizer, vertices = load_run(args.run_dir, getattr(torch, args.dtype))
        if ensemble or decoding.num_beams > 1:  # decode_texts: a mixture, or beam search
            sampling = load_config(args.run_dir / "config.yaml").simplex.sampling
            point = args.point if ensemble else alpha
            results = generate_decoded(
                subspace_model(backbone, vertices), tokenizer, point, args.prompt, decoding, sampling
            )
        else:
            results = generate(
                backbone, tokenizer, vertices, alpha, args.prompt, args.max_new_tokens, args.temperature, args.seed
            )
    except USER_ERRORS as err:
        return user_error(err)
    print(
        json.dumps({"point": args.point, "alpha": None if alpha is None else alpha.tolist(), "results": results}),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    exit_now(main())
