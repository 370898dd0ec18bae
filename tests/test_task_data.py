"""Task-format recovery data (domainprune.task_data, `recover --train-format sdd|chat`): requests built from code,
user JSONL files, loss on the answers only, teacher answers that resume, and a tiny end-to-end recovery of each."""

from __future__ import annotations

import json

import pytest
from tiny_pipeline import flap_run, loaded, smol_tokenizer, tiny_lm

from domainprune.data import Corpus, Document, split_of
from domainprune.errors import DomainpruneError
from domainprune.recover import ANSWERS_FILE, make_config, recover, task_format_data, teacher_answers
from domainprune.task_data import IGNORE, chat_prompt, code_prompts, read_jsonl, sample, training_example

SOURCE = '''
import os

def add_prefix(name: str, prefix="x") -> str:
    """Return name with the prefix put in front of it, joined by a dash."""
    joined = prefix + "-" + name
    return joined

def _private(a):
    """A private helper that users never ask for by name at all."""
    return a

def short_doc(a):
    """Too short."""
    return a

def undocumented(a):
    b = a + 1
    return b

class Box:
    def method(self):
        """Methods need their class around them, so they are left out."""
        return 1
'''


@pytest.fixture(scope="module")
def tokenizer():
    return smol_tokenizer()


def corpus_of(*texts: str) -> tuple[Corpus, str]:
    docs = [Document(f"m{i}.py", t) for i, t in enumerate(texts)]
    return Corpus("t", docs), split_of(docs[0].group)


def test_requests_are_documented_public_functions_with_signature_and_docstring():
    corpus, split = corpus_of(SOURCE)
    prompts = code_prompts(corpus, split)
    assert len(prompts) == 1
    assert 'def add_prefix(name: str, prefix=\'x\') -> str:\n    """\n    Return name with the prefix' in prompts[0]
    assert "joined = " not in prompts[0]  # the body is what the model must write
    assert prompts[0].startswith("Write the Python function below.") and prompts[0].endswith("```")
    assert code_prompts(corpus, split) == prompts  # deterministic


def test_code_that_does_not_parse_is_skipped_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    bad = f"open({str(marker)!r}, 'w')\ndef broken(:\n"
    corpus, _ = corpus_of(bad, SOURCE.replace("add_prefix", "other"))
    prompts = [p for s in {split_of(d.group) for d in corpus.documents} for p in code_prompts(corpus, s)]
    assert len(prompts) == 1 and "def other(" in prompts[0]
    assert not marker.exists()


def test_sampling_is_seeded():
    items = list(range(100))
    assert sample(items, 10, 0) == sample(items, 10, 0) != sample(items, 10, 1)
    assert sample(items[:5], 10, 0) == items[:5]


def test_jsonl_rows_and_their_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "Sort a list.", "response": "sorted(x)", "extra": 1}) + "\n\n")
    assert read_jsonl(good, response=True) == [{"prompt": "Sort a list.", "response": "sorted(x)"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(DomainpruneError, match=r"bad.jsonl line 2 is not JSON"):
        read_jsonl(bad, response=False)
    half = tmp_path / "q.jsonl"
    half.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DomainpruneError, match=r"q.jsonl line 1 needs non-empty string field\(s\) prompt, response"):
        read_jsonl(half, response=True)
    with pytest.raises(DomainpruneError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl", response=False)


def test_loss_falls_on_the_answer_and_its_end_of_turn_only(tokenizer):
    ids, labels = training_example(tokenizer, "Add one.", "```python\ndef f(x):\n    return x + 1\n```", 200)
    head = tokenizer(chat_prompt(tokenizer, "Add one."), add_special_tokens=False).input_ids
    assert ids[: len(head)] == head and labels[: len(head)] == [IGNORE] * len(head)
    assert labels[len(head) :] == ids[len(head) :]
    answer = tokenizer.decode(ids[len(head) :])
    assert answer.startswith("```python") and "<|im_end|>" in answer  # the model learns to end its turn
    assert training_example(tokenizer, "word " * 300, "x", 64) is None  # the request alone fills the length
    cut_ids, cut_labels = training_example(tokenizer, "Add one.", "y " * 100, len(head) + 5)
    assert len(cut_ids) == len(cut_labels) == len(head) + 5


def test_option_combinations_are_refused_in_one_line():
    with pytest.raises(DomainpruneError, match="--train-format chat needs --train-file"):
        make_config(train_format="chat")
    with pytest.raises(DomainpruneError, match="drop them with --train-format sdd"):
        make_config(train_format="sdd", self_distill=True)
    with pytest.raises(DomainpruneError, match="--train-file needs --train-format sdd"):
        make_config(train_file="x.jsonl")
    with pytest.raises(DomainpruneError, match="train_format"):
        make_config(train_format="instructions")
    assert make_config(train_format="sdd").sequence_length == 512 and make_config().sequence_length == 128
    assert make_config(train_format="sdd").needs_teacher
    assert not make_config(train_format="chat", train_file="x").needs_teacher


@pytest.fixture(scope="module")
def run_and_dense(tmp_path_factory, tokenizer):
    return flap_run(tmp_path_factory.mktemp("runs") / "pruned", tokenizer), loaded(tiny_lm("llama"), tokenizer)


# the chat template alone is 63 tokens of the tiny models' 512-token tokenizer
FAST = dict(batch_size=2, time_budget=None, warmup_steps=0, lr=5e-3, max_steps=2, seq_len=128, progress=False)


def test_sdd_recovery_trains_on_the_teachers_answers(run_and_dense, tokenizer, tmp_path):
    run, dense = run_and_dense
    prompts = tmp_path / "requests.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["Sort a list.", "Reverse a string.", "Sum two numbers."])
    )
    result = recover(
        run,
        out=tmp_path / "rec",
        teacher=dense,
        train_format="sdd",
        train_file=str(prompts),
        samples=3,
        answer_tokens=6,
        **FAST,
    )
    r = result.report
    assert r["format"] == "sdd" and r["sequences"] == 3 and r["steps"] == 2 and r["answer_tokens_trained"] > 0
    assert (tmp_path / "rec" / "config.json").is_file()


def test_teacher_answers_resume_from_what_was_written(run_and_dense, tokenizer, tmp_path):
    _, dense = run_and_dense
    config = make_config(train_format="sdd", answer_tokens=4, batch_size=2)
    first = teacher_answers(config, ["a", "b", "c"], tokenizer, dense.model, tmp_path, False, False)
    assert len(first) == 3 and (tmp_path / ANSWERS_FILE).is_file()
    # a rerun over the same requests reads them back: it never calls the teacher (None here would fail)
    assert teacher_answers(config, ["a", "b", "c"], tokenizer, None, tmp_path, False, False) == first


def test_chat_format_needs_no_teacher_and_masks_the_prompts(run_and_dense, tokenizer, tmp_path):
    run, _ = run_and_dense
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(4)))
    config = make_config(train_format="chat", train_file=str(data), samples=4, seq_len=128)
    ids, labels, report = task_format_data(config, tokenizer, None, None, False)
    assert report["sequences"] == 4 and ids.shape == labels.shape
    for row in range(4):
        head = len(tokenizer(chat_prompt(tokenizer, f"Q{row}?"), add_special_tokens=False).input_ids)
        assert (labels[row, :head] == IGNORE).all() and (labels[row, head:] != IGNORE).any()
    result = recover(run, out=tmp_path / "rec", train_format="chat", train_file=str(data), samples=4, **FAST)
    assert result.report["teacher"] is None and result.report["format"] == "chat"
