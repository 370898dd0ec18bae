"""Training data in the domain's task format, for recovery (`recover --train-format sdd|chat`, docs/recovery.md).

Self-data distillation (SDD) trains the pruned model on what the dense model answers to the domain's own kind of
request, so recovery restores the skill the pruned model lost rather than raw-text prediction alone:

- `code_prompts(corpus)`: one request per documented function in the corpus's Python files (calibration split only,
  so held-out code stays unseen): the function's signature and docstring, asking for the implementation in a code
  block, which is the shape of function-writing tasks such as MBPP;
- `read_jsonl(path)`: a user's own requests, `{"prompt": ...}` per line (the dense model answers them), or
  instruction data, `{"prompt": ..., "response": ...}` per line (trained on as it is: `--train-format chat`);
- `training_example`: the request in the tokenizer's chat template plus the answer as the assistant's turn, with
  the loss on the answer only.

Python files are parsed (`ast`) to find functions; nothing in them is run.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Any

from .data import Corpus, jsonl_records
from .errors import DomainpruneError

MIN_DOCSTRING = 20  # characters: shorter docstrings rarely say what the function does
BODY_LINES = (3, 40)  # functions this long (docstring included) make answerable requests
IGNORE = -100  # label of tokens that carry no loss

PROMPT = (
    "Write the Python function below. Reply with the complete function, implemented, in a ```python code block."
    "\n\n```python\n{stub}\n```"
)


def _stub(node: ast.FunctionDef | ast.AsyncFunctionDef, docstring: str) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    doc = "\n".join(("    " + line).rstrip() for line in docstring.splitlines())
    return f'{prefix} {node.name}({ast.unparse(node.args)}){returns}:\n    """\n{doc}\n    """'


def code_prompts(corpus: Corpus, split: str = "calibration") -> list[str]:
    """One request per public, documented top-level function of the split's Python documents, deduplicated, in
    document-key order (deterministic). Documents that do not parse as Python are skipped."""
    prompts: dict[str, None] = {}
    for doc in sorted(corpus.split(split), key=lambda d: d.key):
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            docstring = ast.get_docstring(node, clean=True)
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if not docstring or len(docstring) < MIN_DOCSTRING or not BODY_LINES[0] <= lines <= BODY_LINES[1]:
                continue
            prompts[PROMPT.format(stub=_stub(node, docstring))] = None
    return list(prompts)


def read_jsonl(path: str | Path, *, response: bool) -> list[dict[str, str]]:
    """The rows of a JSONL file: each an object with a non-empty string "prompt" (and "response" when asked)."""
    path = Path(path)
    if not path.is_file():
        raise DomainpruneError(f'--train-file {path} not found; give a JSONL file with one {{"prompt": ...}} per line')
    fields = ("prompt", "response") if response else ("prompt",)
    rows = []
    for lineno, row in jsonl_records(path, "give one JSON object per line"):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip() for k in fields):
            raise DomainpruneError(f"{path} line {lineno} needs non-empty string field(s) {', '.join(fields)}")
        rows.append({k: row[k] for k in fields})
    if not rows:
        raise DomainpruneError(f"{path} holds no rows; give one JSON object per line")
    return rows


def sample(items: list[Any], n: int, seed: int) -> list[Any]:
    """`n` items drawn without replacement with `seed` (all of them, in order, when there are no more than n)."""
    return list(items) if len(items) <= n else random.Random(seed).sample(items, n)


def is_chat(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The request as the model sees it: the user's turn in its chat template, or the bare text and a newline."""
    if is_chat(tokenizer):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def training_example(tokenizer: Any, prompt: str, answer: str, seq_len: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) of the request followed by the answer, cut at `seq_len` tokens; labels are `IGNORE` on the
    request. None when the request alone fills `seq_len` (nothing would be learned)."""
    head = chat_prompt(tokenizer, prompt)
    tail = answer + (tokenizer.eos_token or "")
    if is_chat(tokenizer):  # the assistant's turn as the template closes it (end-of-turn token included)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(head):
            tail = full[len(head) :]
    head_ids = tokenizer(head, add_special_tokens=not is_chat(tokenizer)).input_ids
    tail_ids = tokenizer(tail, add_special_tokens=False).input_ids
    if len(head_ids) >= seq_len or not tail_ids:
        return None
    ids = (head_ids + tail_ids)[:seq_len]
    labels = ([IGNORE] * len(head_ids) + tail_ids)[:seq_len]
    return ids, labels
