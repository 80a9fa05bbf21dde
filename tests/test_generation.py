"""Text generation, the core (issue 25): the collator's response labels, K = 1 against PEFT prefix tuning on the
same token-level loss (value and gradient), and decoding (greedy, an ensemble's mixture, beam search, mixed groups)
against generate_ids, PEFT's forward and transformers' own generate over the prefix written out as tokens.

Runs of the trainer on generation tasks and the bad inputs it refuses: tests/training/test_generation_runs.py.
"""

from types import SimpleNamespace

import pytest
import torch

from dist_subspace.core import simplex
from dist_subspace.core.config import load_config
from dist_subspace.core.embedded import resolve_model
from dist_subspace.core.export import peft_prefix_weight, save_peft_prefix
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.data.batching import Collator, check_chat, check_generation_tokenizer, generation_ids
from dist_subspace.data.sources import load_splits
from dist_subspace.data.tasks import TASKS
from dist_subspace.evaluation.decoding import DecodeQuery, Decoding, beam_rows, decode_rows, decode_texts
from dist_subspace.evaluation.points import mode_points
from dist_subspace.generate import generate_ids
from dist_subspace.training.engine import Engine
from tests.conftest import tiny_backbone

HEADLINES = TASKS["bbc_headlines"]
ARTICLES = [  # (article lead, headline): three prompt lengths
    (
        "Shares in the carmaker fell sharply on Monday after it warned that profits would be lower than expected "
        "this year because of weak demand in Europe.",
        " Carmaker shares fall on profit warning",
    ),
    ("The central bank raised interest rates again.", " Bank raises rates"),
    ("A film about a dog won the top prize at the festival in Cannes on Sunday night.", " Dog film wins top prize"),
]
PREFIX_TEXT = " Breaking news from the newsroom:"  # decoding's prefix: these tokens' own keys and values


def _examples() -> list[dict]:
    return [{"text": t, "text_pair": None, "label": y, "id": i} for i, (t, y) in enumerate(ARTICLES)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def _parts(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """An example's prompt ids and response ids (the end-of-sequence id appended), tokenised apart."""
    prompt = tokenizer(HEADLINES.template.format(text=example["text"]))["input_ids"]
    response = tokenizer(example["label"], add_special_tokens=False)["input_ids"]
    return prompt, [*response, tokenizer.eos_token_id]


# ---- the collator ------------------------------------------------------------------------------------------------
def test_generation_ids_cut_the_prompt_from_its_start_and_refuse_a_response_that_cannot_fit():
    prompt, response = [11, 12, 13, 14], [7, 8, 2]
    assert generation_ids(prompt, response, 10, {"id": 0}) == (prompt + response, [-100] * 4 + response)
    assert generation_ids(prompt, response, 5, {"id": 0}) == ([13, 14, 7, 8, 2], [-100, -100, 7, 8, 2])
    assert generation_ids(prompt, response, 4, {"id": 0}) == ([14, 7, 8, 2], [-100, 7, 8, 2])  # one prompt token
    with pytest.raises(ValueError) as refused:
        generation_ids(prompt, response, 3, {"id": 5})
    assert str(refused.value) == (
        "example 5: its response is 3 tokens (with the end-of-sequence token), model.max_length is 3; raise "
        "model.max_length or shorten the response"
    )


def test_the_generation_checks_want_a_decoder_an_eos_token_and_a_chat_template_for_chat_records():
    with_eos = SimpleNamespace(eos_token_id=2, chat_template=None)
    check_generation_tokenizer(with_eos, HEADLINES, decoder=True)
    with pytest.raises(ValueError, match=r"^task bbc_headlines generates text: use a decoder"):
        check_generation_tokenizer(with_eos, HEADLINES, decoder=False)
    with pytest.raises(ValueError, match="the tokenizer has no end-of-sequence token, which ends each response"):
        check_generation_tokenizer(SimpleNamespace(eos_token_id=None), HEADLINES, decoder=True)
    check_chat(with_eos, _examples())  # prompt/response records need no template
    chat = [{"text": "", "messages": [{"role": "user", "content": "hi"}], "label": "hello", "id": 0}]
    with pytest.raises(ValueError, match=r"^chat records \(data.messages_field\) need a tokenizer with a chat"):
        check_chat(with_eos, chat)
    check_chat(SimpleNamespace(eos_token_id=2, chat_template="{{ messages }}"), chat)


@pytest.mark.slow
def test_labels_are_the_response_and_eos_after_the_prompt_and_minus_100_on_prompt_and_padding(tokenizer):
    examples = _examples()
    batch = Collator(tokenizer, HEADLINES, decoder=True)(list(enumerate(examples)))
    width = batch["input_ids"].shape[1]
    lengths = []
    for row, example in enumerate(examples):
        prompt, response = _parts(tokenizer, example)
        n = len(prompt) + len(response)
        lengths.append(n)
        pads = width - n
        assert batch["input_ids"][row].tolist() == prompt + response + [tokenizer.pad_token_id] * pads  # right padded
        assert batch["labels"][row].tolist() == [-100] * len(prompt) + response + [-100] * pads
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * pads
        # the ids are those of the whole text tokenised at once: the response is what follows the prompt
        text = HEADLINES.template.format(text=example["text"]) + example["label"]
        assert tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] == prompt + response
    assert len(set(lengths)) == 3 and width == max(lengths) and batch["index"].tolist() == [0, 1, 2]


@pytest.mark.slow
def test_a_too_long_example_keeps_its_whole_response_and_loses_the_prompts_first_tokens(tokenizer):
    long, short = _examples()[0], _examples()[1]
    prompt, response = _parts(tokenizer, long)
    collator = Collator(tokenizer, HEADLINES, decoder=True, max_length=len(response) + 5)
    assert collator.encode(long) == {"input_ids": prompt[-5:] + response, "labels": [-100] * 5 + response}
    assert collator.count_truncated([long]) == 1
    assert Collator(tokenizer, HEADLINES, True, 256).count_truncated([long, short]) == 0
    fits = Collator(tokenizer, HEADLINES, decoder=True, max_length=len(response) + 1)  # room for one prompt token
    assert fits.encode(long)["input_ids"] == prompt[-1:] + response
    with pytest.raises(ValueError) as refused:
        Collator(tokenizer, HEADLINES, decoder=True, max_length=len(response)).count_truncated([short, long])
    assert str(refused.value).count("\n") == 0 and str(refused.value) == (
        f"example 0: its response is {len(response)} tokens (with the end-of-sequence token), model.max_length is "
        f"{len(response)}; raise model.max_length or shorten the response"
    )


@pytest.mark.slow
def test_chat_records_render_through_the_chat_template_with_the_answer_as_the_response(tokenizer, tmp_path):
    import json

    records = [
        [
            {"role": "system", "content": "You write headlines."},
            {"role": "user", "content": "The central bank raised interest rates again."},
            {"role": "assistant", "content": "Bank raises rates"},
        ],
        [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}],
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in records))
    splits = load_splits(str(path), "first_n", first_n=2, dev_size=0, test_size=0, messages_field="messages")
    assert "<|im_start|>" in tokenizer.chat_template  # SmolLM2 ships ChatML; its eos <|im_end|> ends a turn
    collator = Collator(tokenizer, splits.task, decoder=True)
    for example in splits.train:
        record = records[example["id"]]
        assert example["messages"] == record[:-1] and example["label"] == record[-1]["content"]
        rendered = tokenizer.apply_chat_template(record[:-1], tokenize=False, add_generation_prompt=True)
        assert collator.prompt(example) == rendered
        encoded = collator.encode(example)
        whole = tokenizer.apply_chat_template(record, tokenize=False)  # the conversation, answer included
        assert whole.endswith("<|im_end|>\n")  # the template's turn ends with the eos token, then a newline
        assert encoded["input_ids"] == tokenizer(whole.removesuffix("\n"), add_special_tokens=False)["input_ids"]
        answer = [t for t, y in zip(encoded["input_ids"], encoded["labels"], strict=True) if y != -100]
        assert tokenizer.decode(answer) == record[-1]["content"] + tokenizer.eos_token


@pytest.mark.slow
def test_prompts_are_left_padded_and_equal_the_labelled_parts_prompts(tokenizer):
    examples = _examples()
    _, response = _parts(tokenizer, examples[0])
    collator = Collator(tokenizer, HEADLINES, decoder=True, max_length=len(response) + 12)  # cuts the first prompt
    items = list(enumerate(examples))
    batch, prompts = collator(items), collator.prompts(items)
    width = prompts["input_ids"].shape[1]
    pads, cut = [], 0
    for row, example in enumerate(examples):
        real = batch["attention_mask"][row].bool()
        labelled = batch["input_ids"][row][real & (batch["labels"][row] == -100)].tolist()
        n = len(labelled)
        pads.append(width - n)
        assert prompts["input_ids"][row].tolist() == [tokenizer.pad_token_id] * (width - n) + labelled
        assert prompts["attention_mask"][row].tolist() == [0] * (width - n) + [1] * n
        cut += n < len(_parts(tokenizer, example)[0])
    assert width - pads[0] == 12 and max(pads) > 0 and prompts["index"].tolist() == [0, 1, 2]  # the cut prompt
    assert collator.count_truncated(examples) == cut > 0


# ---- K = 1 is PEFT prefix tuning on the same loss ----------------------------------------------------------------
@pytest.mark.slow
def test_k1_token_level_loss_and_its_prefix_gradient_equal_peft_prefix_tuning(tokenizer, tmp_path):
    """The real SmolLM2-135M, P = 8, on a right-padded batch of three prompt + response examples: the loss recipe's
    train_step takes (summed response NLL / response tokens) and its gradient w.r.t. the prefix equal PEFT's
    ``PeftModel(input_ids, attention_mask, labels=labels).loss`` and the gradient w.r.t. its prefix embedding
    ``[P, L * 2 * H_kv * D]``, with the prefix exported by save_peft_prefix (as final/peft_centroid/ is)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = resolve_model("smollm2-135m")
    model = PrefixSubspaceModel(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), 1, 8, [])
    with torch.no_grad():
        model.simplex.vertices.copy_(initial_vertices(model, "activations", 0))
    batch = Collator(tokenizer, HEADLINES, decoder=True)(list(enumerate(_examples())))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert (mask == 0).any() and (labels[:, 0] == -100).all()
    model.train()
    nll, count = model.response_nll(ids, mask, labels, simplex.centroid_alpha(1))  # [B] each
    assert count.tolist() == (labels != -100).sum(1).tolist()  # every response token and the eos, once
    loss = nll.sum() / count.sum()  # recipe.train_step's token-level loss (one replica, one micro-batch)
    loss.backward()

    save_peft_prefix(model.simplex.vertices[0].detach(), model.geometry, path, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter")
    embedding = peft.prompt_encoder["default"].embedding.weight  # [P, L * 2 * H_kv * D]
    torch.testing.assert_close(embedding, peft_prefix_weight(model.simplex.vertices[0].detach()), rtol=0, atol=0)
    embedding.requires_grad_(True)
    theirs = peft(input_ids=ids, attention_mask=mask, labels=labels).loss
    theirs.backward()
    torch.testing.assert_close(loss, theirs)
    torch.testing.assert_close(peft_prefix_weight(model.simplex.vertices.grad[0]), embedding.grad)
    with torch.no_grad():  # and each example alone, unpadded, is its row of the batch: padding changes nothing
        for row in range(len(ids)):
            n = int(mask[row].sum())
            alone = peft(input_ids=ids[row : row + 1, :n], labels=labels[row : row + 1, :n]).loss
            torch.testing.assert_close(nll[row] / count[row], alone)


# ---- decoding ----------------------------------------------------------------------------------------------------
def test_beam_rows_carry_the_prefix_through_generate_and_its_beams_on_tiny_models():
    """transformers' generate, handed the prefix cache: the cache is grown to R * num_beams rows (generate expands
    only tensors), and a windowed family keeps the prefix visible past its window (8) as decode_rows does."""
    for family in ("llama", "gemma2", "phi3"):
        model = PrefixSubspaceModel(tiny_backbone(family), 1, 4, label_token_ids=[])
        words = torch.randint(3, 100, (1, 4), generator=torch.Generator().manual_seed(0))
        model.simplex.vertices.data.copy_(model.kv_activations(words))
        ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padded
        alpha, replica = simplex.expand_alpha(simplex.centroid_alpha(1), 2, model.alpha_rows), torch.zeros(2).long()
        greedy = generate_ids(model.backbone, model.prefix(alpha, 2), ids, mask, 12)  # past the window
        assert beam_rows(model, ids, mask, alpha, replica, Decoding(12), 999, 0, False).tolist() == greedy.tolist()
        beams = beam_rows(model, ids, mask, alpha, replica, Decoding(12, num_beams=2), 999, 0, False)
        if family == "llama":  # no window: the prefix is exactly its tokens, written out before each prompt
            for row in range(2):
                text = torch.cat([words[0], ids[row][mask[row].bool()]])[None]
                ones = torch.ones_like(text)
                out = model.backbone.generate(
                    text, attention_mask=ones, max_new_tokens=12, num_beams=2, eos_token_id=999, pad_token_id=0
                )
                assert beams[row].tolist() == out[0, text.shape[1] :].tolist()


def test_a_group_of_identical_rows_decodes_as_one_row_and_beams_refuse_a_mixture():
    """A group's next-token distribution is the mean of its rows': three rows at one point are that point, tokens and
    entropy (a point's own entropy, not 0)."""
    model = PrefixSubspaceModel(tiny_backbone("llama"), 2, 4, label_token_ids=[])
    model.simplex.vertices.data.copy_(initial_vertices(model, seed=0))
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    point = simplex.expand_alpha(torch.tensor([0.3, 0.7]), 1, model.alpha_rows)  # [1, L, K]

    def decode(rows: int):
        ones, zeros = torch.ones(rows, 6).long(), torch.zeros(rows).long()
        alpha = point.expand(rows, -1, -1)
        return decode_rows(model, ids.expand(rows, -1), ones, alpha, zeros, zeros, Decoding(8), 999)

    (one, h1), (three, h3) = decode(1), decode(3)
    assert one.tolist() == three.tolist() and h1.item() > 0
    torch.testing.assert_close(h1, h3)
    with pytest.raises(ValueError, match=r"^num_beams=2: beam search decodes one point at a time"):
        decode_texts(model, None, [DecodeQuery(_examples(), [point[0], point[0]])], None, Decoding(num_beams=2))


def _cut(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


@pytest.fixture(scope="module")
def decoder(tokenizer, tmp_path_factory):
    """The real SmolLM2-135M under a K = 3 simplex whose centroid is the backbone's own keys and values of
    PREFIX_TEXT's tokens (vertices: those plus a spread that sums to zero), that centroid exported as PEFT exports
    final/peft_centroid/, and three prompts of different lengths."""
    from transformers import AutoModelForCausalLM

    path = resolve_model("smollm2-135m")
    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    words = tokenizer(PREFIX_TEXT, add_special_tokens=False)["input_ids"]
    model = PrefixSubspaceModel(backbone, 3, len(words), label_token_ids=[])
    own = model.kv_activations(torch.tensor([words]))  # [1, L, 2, H_kv, P, D]
    spread = initial_vertices(model, "activations", 0)
    with torch.no_grad():
        model.simplex.vertices.copy_(own + spread - spread.mean(0))
    centroid = model.prefix(simplex.centroid_alpha(3), 1)[0]  # [L, 2, H_kv, P, D]
    torch.testing.assert_close(centroid, own[0], atol=1e-5, rtol=1e-5)
    adapter = tmp_path_factory.mktemp("peft") / "peft_centroid"
    save_peft_prefix(centroid, model.geometry, path, adapter)
    collator = Collator(tokenizer, HEADLINES, decoder=True)
    examples = _examples()
    prompts = [collator.prompts([(i, e)])["input_ids"][0].tolist() for i, e in enumerate(examples)]
    assert len({len(p) for p in prompts}) == 3
    engine = Engine(load_config(None, []))
    return SimpleNamespace(
        model=model,
        words=words,
        own=own,
        adapter=adapter,
        collator=collator,
        examples=examples,
        prompts=prompts,
        engine=engine,
        eos=tokenizer.eos_token_id,
        path=path,
    )


def _written_out(d, prompt: list[int], n: int, beams: int = 1, prefix: bool = True) -> list[int]:
    """transformers' own generate on the bare backbone over the prefix's tokens then the prompt, no cache handed in:
    the centroid is exactly those tokens' keys and values (positions 0..P-1), so this is decoding with the prefix
    written out as text, prompt alone (``prefix=False``: the prompt without it)."""
    ids = torch.tensor([[*d.words, *prompt] if prefix else prompt])
    out = d.model.backbone.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        num_beams=beams,
        do_sample=False,
        eos_token_id=d.eos,
        pad_token_id=d.eos,
    )
    return _cut(out[0, ids.shape[1] :].tolist(), d.eos)


@pytest.fixture(scope="module")
def peft(decoder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(decoder.path, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, decoder.adapter).eval()


@torch.no_grad()
def _peft_greedy(peft, prompt: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding by PEFT's own forward over the whole sequence at every step (no cache carried over)."""
    ids, new = torch.tensor([prompt]), []
    while len(new) < n and eos not in new:
        token = peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax().item()
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return _cut(new, eos)


N = 6  # new tokens


def _centroid(d, beams: int = 1):
    query = DecodeQuery(d.examples, [simplex.centroid_alpha(3)])
    return decode_texts(d.model, d.engine, [query], d.collator, Decoding(max_new_tokens=N, num_beams=beams))[0]


@pytest.mark.slow
def test_greedy_at_the_centroid_equals_generate_ids_and_the_prefix_written_out(decoder):
    d = decoder
    ours = _centroid(d)
    batch = d.collator.prompts(list(enumerate(d.examples)))  # one left-padded batch
    assert (batch["attention_mask"] == 0).any()
    prefix = d.model.prefix(simplex.centroid_alpha(3), 3)
    new = generate_ids(d.model.backbone, prefix, batch["input_ids"], batch["attention_mask"], N, d.eos)
    assert ours.token_ids == [_cut(row, d.eos) for row in new.tolist()]
    assert ours.token_ids == [_written_out(d, p, N) for p in d.prompts]  # each prompt alone, unpadded
    assert ours.texts == [d.collator.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ours.token_ids]
    assert ours.token_ids != [_written_out(d, p, N, prefix=False) for p in d.prompts]  # the prefix does something


@pytest.mark.slow
def test_greedy_at_the_centroid_equals_peft_with_the_exported_centroid(decoder, peft):
    d = decoder
    assert _centroid(d).token_ids == [_peft_greedy(peft, p, N, d.eos) for p in d.prompts]


@pytest.mark.slow
def test_beam_search_carries_the_prefix_through_generate_and_equals_the_prefix_written_out(decoder):
    d = decoder
    ours = _centroid(d, beams=2)
    assert ours.token_ids == [_written_out(d, p, N, beams=2) for p in d.prompts]
    assert ours.entropy == [0.0] * 3  # no distribution is drawn from under beam search


@pytest.mark.slow
@pytest.mark.parametrize("beams", [1, 2])
def test_peft_generate_with_the_exported_centroid_agrees(decoder, peft, beams):
    """PEFT's own generate() with final/peft_centroid, greedy and beam, writes what we write at the centroid (PEFT
    >= 0.22, the floor: 0.21 handed its prefix to transformers 5.x under an argument generate no longer forwards)."""
    d = decoder
    ours = _centroid(d, beams)
    for prompt, tokens in zip(d.prompts, ours.token_ids, strict=True):
        ids = torch.tensor([prompt])
        out = peft.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N,
            num_beams=beams,
            do_sample=False,
            eos_token_id=d.eos,
            pad_token_id=d.eos,
        )
        assert _cut(out[0, len(prompt) :].tolist(), d.eos) == tokens


@pytest.mark.slow
def test_an_ensemble_of_three_identical_vertices_is_the_centroid_entropy_included(decoder):
    d = decoder
    same = PrefixSubspaceModel(d.model.backbone, 3, len(d.words), label_token_ids=[])
    with torch.no_grad():
        same.simplex.vertices.copy_(d.own.expand(3, *d.own.shape[1:]))
    queries = [
        DecodeQuery(d.examples, mode_points(same, "ensemble", 3, "example_layer")),
        DecodeQuery(d.examples, [simplex.centroid_alpha(3)]),
    ]
    ensemble, centroid = decode_texts(same, d.engine, queries, d.collator, Decoding(max_new_tokens=N))
    assert ensemble.texts == centroid.texts and ensemble.token_ids == centroid.token_ids
    assert min(centroid.entropy) > 0  # a point's own distribution, per generated token
    torch.testing.assert_close(torch.tensor(ensemble.entropy), torch.tensor(centroid.entropy), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_mixed_batch_decodes_each_group_as_it_would_alone(decoder):
    """One ensemble:3 group (three sampled points per example, mixed) beside one-row groups (the centroid, vertex 1)
    in the same batches: each query's tokens, texts and entropies are those it gets decoded alone."""
    d = decoder
    queries = [
        DecodeQuery(d.examples, mode_points(d.model, "ensemble", 3, "example_layer")),
        DecodeQuery(d.examples, [simplex.centroid_alpha(3)]),
        DecodeQuery(d.examples, [simplex.vertex_alpha(3, 1)]),
    ]
    together = decode_texts(d.model, d.engine, queries, d.collator, Decoding(max_new_tokens=N), batch_size=32)
    for query, mixed in zip(queries, together, strict=True):
        (alone,) = decode_texts(d.model, d.engine, [query], d.collator, Decoding(max_new_tokens=N))
        assert mixed.token_ids == alone.token_ids and mixed.texts == alone.texts
        torch.testing.assert_close(torch.tensor(mixed.entropy), torch.tensor(alone.entropy), atol=1e-4, rtol=1e-4)
    assert together[0].token_ids != together[2].token_ids  # the groups really differ
