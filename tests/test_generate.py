"""Generation at a point of a trained simplex: PEFT's generation with the exported adapter, token for token; from
the mixture of an ensemble's points (``--point ensemble:S``) and with beam search, through the decoding that
evaluation and predict use."""

import json

import pytest
import torch

from dist_subspace.core import simplex
from dist_subspace.core.export import save_peft_prefix
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.generate import generate, generate_decoded, generate_ids, load_run, main, parse_point, subspace_model
from tests.conftest import run_args, tiny_backbone
from tests.test_families import reference_mask

PROMPTS = ["the film was really", "a movie with a plot and an ending that"]


@pytest.fixture(scope="module")
def short_run(small_assets, tmp_path_factory):
    """A real K = 3 run (2 steps) on the small SmolLM2: a run folder with final/ and final/peft_centroid/."""
    from dist_subspace.train import main as train

    model_dir, data = small_assets
    out = tmp_path_factory.mktemp("gen") / "run"
    extra = ("train.max_steps=2", "train.eval_every=2", "train.save_every=2", "eval.landscape=false")
    assert train(run_args(model_dir, data, out, *extra)) == 0
    return out


@pytest.fixture(scope="module")
def loaded(short_run):
    return load_run(short_run)


def peft_model(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), adapter_dir)


@torch.no_grad()
def greedy_by_forward(model, tokenizer, prompt: str, n: int) -> list[int]:
    """Greedy decoding by PEFT's own forward over the whole sequence at every step (no cache carried over)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    for _ in range(n):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, -n:].tolist()


@pytest.mark.slow
def test_greedy_equals_peft_with_the_exported_centroid(short_run, loaded, small_assets):
    backbone, tokenizer, vertices = loaded
    assert vertices.shape[0] == 3
    ours = generate(backbone, tokenizer, vertices, parse_point("centroid", 3), [PROMPTS[1]], max_new_tokens=12)
    peft = peft_model(small_assets[0], short_run / "final" / "peft_centroid")
    assert ours[0]["new_token_ids"] == greedy_by_forward(peft, tokenizer, PROMPTS[1], 12)


@pytest.fixture(scope="module")
def vertex1(loaded, small_assets, tmp_path_factory):
    """Vertex 1 exported as a PEFT adapter, loaded in PEFT, and our greedy tokens at that vertex."""
    from dist_subspace.core.arch import prefix_geometry

    backbone, tokenizer, vertices = loaded
    folder = tmp_path_factory.mktemp("vertex1")
    save_peft_prefix(vertices[1], prefix_geometry(backbone.config), "small", folder)
    ours = generate(backbone, tokenizer, vertices, parse_point("vertex:1", 3), [PROMPTS[0]], max_new_tokens=8)
    return peft_model(small_assets[0], folder), ours[0]["new_token_ids"]


@pytest.mark.slow
def test_a_vertex_equals_peft_with_that_vertex_exported_and_the_prefix_matters(loaded, vertex1):
    _, tokenizer, _ = loaded
    peft, ours = vertex1
    assert ours == greedy_by_forward(peft, tokenizer, PROMPTS[0], 8)
    with peft.disable_adapter():  # the bare backbone continues differently: the prefix is doing something
        assert ours != greedy_by_forward(peft, tokenizer, PROMPTS[0], 8)


@pytest.mark.slow
def test_peft_generate_agrees(loaded, vertex1):
    """PEFT's own generate() (>= 0.22: 0.21 dropped the prefix under transformers 5.x) decodes our tokens."""
    _, tokenizer, _ = loaded
    peft, ours = vertex1
    ids = tokenizer(PROMPTS[0], return_tensors="pt")
    out = peft.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out[0, ids["input_ids"].shape[1] :].tolist() == ours


@pytest.mark.slow
def test_a_left_padded_batch_equals_each_prompt_alone(loaded):
    backbone, tokenizer, vertices = loaded
    alpha = parse_point("alpha=0.5,0.3,0.2", 3)
    batch = generate(backbone, tokenizer, vertices, alpha, PROMPTS, max_new_tokens=6)
    alone = [generate(backbone, tokenizer, vertices, alpha, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert [b["new_token_ids"] for b in batch] == [a["new_token_ids"] for a in alone]


@pytest.mark.slow
def test_command_prints_one_json_and_refuses_a_bad_point(short_run, capsys):
    assert main([str(short_run), "--prompt", PROMPTS[0], "--max-new-tokens", "3", "--point", "vertex:2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["alpha"] == [0.0, 0.0, 1.0] and len(out["results"][0]["new_token_ids"]) == 3
    assert main([str(short_run), "--prompt", "x", "--point", "alpha=0.5,0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --point 'alpha=0.5,0.5'") and err.count("\n") == 1
    assert main([str(short_run / "final"), "--prompt", "x"]) == 2
    assert "pass the folder of a finished run" in capsys.readouterr().err


@pytest.mark.slow
def test_decoding_at_a_point_through_decode_texts_equals_generate(short_run, loaded):
    """The path of --num-beams and ensembles (evaluation's decode_texts, on a PrefixSubspaceModel) decodes greedily
    what generate() does, token for token (generate() equals PEFT's forward: above)."""
    from dist_subspace.evaluation.decoding import Decoding

    backbone, tokenizer, vertices = loaded
    alpha = parse_point("alpha=0.5,0.3,0.2", 3)
    want = generate(backbone, tokenizer, vertices, alpha, PROMPTS, max_new_tokens=6)
    fresh, _, _ = load_run(short_run)  # a backbone of its own: the model wrapper changes its attention path
    got = generate_decoded(subspace_model(fresh, vertices), tokenizer, alpha, PROMPTS, Decoding(6))
    assert [g["new_token_ids"] for g in got] == [w["new_token_ids"] for w in want]
    assert [g["completion"] for g in got] == [w["completion"] for w in want]


@pytest.mark.slow
def test_an_ensemble_point_decodes_from_the_mixture_of_evaluations_points(short_run, capsys):
    """--point ensemble:3: alpha null, each prompt's entropy and disagreement, and the responses decode_texts gives
    for the run's own model at the 3 points evaluation draws (the same prompt, the same point)."""
    from dist_subspace.data.batching import Collator
    from dist_subspace.evaluation.decoding import Decoding
    from dist_subspace.evaluation.points import mode_points
    from dist_subspace.evaluation.responses import PLAIN_PROMPTS, decode_responses
    from dist_subspace.training.reload import finished_run_config, load_finished_run

    capsys.readouterr()
    argv = [str(short_run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "5"]
    assert main([*argv, "--point", "ensemble:3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["point"] == "ensemble:3" and out["alpha"] is None
    for result in out["results"]:
        assert len(result["new_token_ids"]) <= 5 and result["entropy"] > 0
        assert result["disagreement"] * 3 == pytest.approx(round(result["disagreement"] * 3))
    run = load_finished_run(short_run, finished_run_config(short_run))
    try:
        points = mode_points(run.model, "ensemble", 3, run.cfg.simplex.sampling)
        collator = Collator(run.collator.tokenizer, PLAIN_PROMPTS, True)
        examples = [{"text": p, "text_pair": None, "label": "", "id": i} for i, p in enumerate(PROMPTS)]
        want = decode_responses(run.model, run.engine, examples, collator, points, True, Decoding(5))
    finally:
        run.end()
    assert [r["completion"].strip() for r in out["results"]] == want.decoded.texts
    assert [r["disagreement"] for r in out["results"]] == want.disagreement
    assert main([*argv, "--point", "ensemble:1"]) == 0  # one point: its mixture is itself, so nothing disagrees
    assert [r["disagreement"] for r in json.loads(capsys.readouterr().out)["results"]] == [0.0, 0.0]


@pytest.mark.slow
def test_beam_search_at_a_point_through_generates_command(short_run, capsys):
    """--num-beams at a point: transformers' beam search with the prefix in its cache (evaluation's beam_rows,
    tested against the prefix written out in tests/test_generation.py), each prompt's own beams, the point's alpha."""
    capsys.readouterr()
    argv = [str(short_run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "4"]
    assert main([*argv, "--num-beams", "3", "--point", "vertex:1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["alpha"] == [0.0, 1.0, 0.0] and [r["prompt"] for r in out["results"]] == PROMPTS
    assert all(1 <= len(r["new_token_ids"]) <= 4 and "entropy" not in r for r in out["results"])


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--point", "ensemble:3", "--num-beams", "2"], "--num-beams 2: an ensemble decodes from the mixture"),
        (["--num-beams", "2", "--temperature", "0.5"], "--num-beams 2 searches, it does not sample"),
        (["--point", "ensemble:0"], "--point 'ensemble:0': ensemble:S mixes S >= 1 points"),
        (["--num-beams", "0"], "--max-new-tokens and --num-beams must be >= 1"),
    ],
)
def test_a_decoding_it_cannot_do_is_one_line_before_anything_loads(tmp_path, capsys, args, expect):
    """Refused before the run folder is even read (tmp_path is no run)."""
    assert main([str(tmp_path), "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expect}") and err.count("\n") == 1


def test_points_parse():
    torch.testing.assert_close(parse_point("centroid", 4), torch.full((4,), 0.25))
    assert parse_point("vertex:0", 2).tolist() == [1.0, 0.0]
    assert parse_point("alpha=0.2,0.8", 2).tolist() == pytest.approx([0.2, 0.8])
    for bad in ("vertex:2", "vertex:x", "alpha=0.5,0.6", "alpha=-1,2", "middle"):
        with pytest.raises(ValueError, match="--point"):
            parse_point(bad, 2)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_incremental_decoding_equals_recomputing_everything_past_the_window(family):
    """Greedy decoding on the cache (prefix as the first P positions) equals recomputing prefix tokens + prompt +
    generated tokens from scratch at every step under the reference masks, past the sliding window (8)."""
    p = 4
    model = PrefixSubspaceModel(tiny_backbone(family), 1, p, label_token_ids=[5])
    prefix_tokens = torch.randint(3, 100, (1, p))
    model.simplex.vertices.data.copy_(model.kv_activations(prefix_tokens))
    prompt = torch.randint(3, 100, (1, 5))
    ours = generate_ids(model.backbone, model.prefix(simplex.centroid_alpha(1), 1), prompt, torch.ones_like(prompt), 9)
    sequence = torch.cat([prefix_tokens, prompt], dim=1)
    for _ in range(9):
        mask = reference_mask(model.config, p, sequence.shape[1] - p, torch.float32) if family != "llama" else None
        logits = model.backbone(input_ids=sequence, attention_mask=mask).logits[:, -1]
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert ours[0].tolist() == sequence[0, p + 5 :].tolist()
    assert sequence.shape[1] > 8  # the last steps ran past the window
