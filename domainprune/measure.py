"""The benchmark figures of one model (BENCHMARK.md): perplexity per source on its test split, zero-shot accuracy,
parameters, checkpoint size, decode/prefill throughput. Used by `domainprune eval` and `bench/quality.py`."""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .data import load_corpus
from .errors import DomainpruneError
from .evaluate import checkpoint_bytes, nll, parameter_count, throughput
from .mbpp import CODE_TASKS, MAX_NEW_TOKENS, evaluate_mbpp
from .models import LoadedModel, check_seq_len

log = logging.getLogger(__name__)
BENCH_TASKS = ("piqa", "hellaswag", "arc_easy")


@dataclass
class Measurement:
    name: str
    params: int
    checkpoint_bytes: int | None = None
    perplexity: dict[str, float] = field(default_factory=dict)
    test_sequences: dict[str, int] = field(default_factory=dict)
    zero_shot: dict[str, float] = field(default_factory=dict)  # acc_norm per task
    pass_at_1: dict[str, float] = field(default_factory=dict)  # code tasks (mbpp): greedy pass@1
    problems: dict[str, int] = field(default_factory=dict)  # code tasks: problems pass@1 is over
    decode_tokens_per_s: float | None = None
    prefill_tokens_per_s: float | None = None

    @property
    def zero_shot_mean(self) -> float | None:
        return sum(self.zero_shot.values()) / len(self.zero_shot) if self.zero_shot else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "zero_shot_mean": self.zero_shot_mean}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Measurement":
        """Inverse of `to_dict` (derived and unknown keys are ignored)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise DomainpruneError(
            "--lm-eval needs lm-evaluation-harness, which is not installed; install it with `pip install lm-eval` or "
            "leave out --lm-eval"
        )


def heldout_sequences(source: str, tokenizer: Any, n: int, seq_len: int, text_field: str = "text"):
    """Up to `n` evenly spaced test sequences; fewer (with a warning) when the split is smaller."""
    corpus = load_corpus(source, text_field=text_field)
    available = len(corpus.token_stream(tokenizer, "test")) // seq_len
    if available == 0:  # let `sequences` say why (no test documents, or too little text) and what to do
        return corpus.sequences(tokenizer, "test", n, seq_len, samples_option="--samples")
    if available < n:
        log.warning(
            "%s test split holds %d sequences of %d tokens; evaluating on all of them (asked %d)",
            source,
            available,
            seq_len,
            n,
        )
    return corpus.sequences(tokenizer, "test", min(n, available), seq_len, samples_option="--samples")


def measure(
    loaded: LoadedModel,
    name: str,
    *,
    sources: list[str] = ("code", "general"),
    samples: int = 128,
    seq_len: int = 256,
    tasks: tuple[str, ...] = (),
    limit: int | None = None,
    speed: bool = True,
    speed_repeats: int = 3,
    batch_size: int = 8,
    text_field: str = "text",
    progress: bool = True,
    lm_eval: bool = False,
    code_tokens: int = MAX_NEW_TOKENS,
) -> Measurement:
    """With `lm_eval`, zero-shot accuracy comes from lm-evaluation-harness (its prompts and datasets) instead of
    `tasks.evaluate_task`; the figure kept per task is acc_norm, or acc where the harness reports no acc_norm.
    Code tasks (`mbpp`) among `tasks` give pass@1 on the first `limit` problems instead (`mbpp.evaluate_mbpp`, at
    most `code_tokens` new tokens per answer), whichever scorer runs the others."""
    model, tok = loaded.model, loaded.tokenizer
    check_seq_len(model, seq_len)
    code_tasks = tuple(t for t in tasks if t in CODE_TASKS)
    tasks = tuple(t for t in tasks if t not in CODE_TASKS)
    m = Measurement(name=name, params=parameter_count(model))
    if loaded.path is not None and any(Path(loaded.path).glob("*.safetensors")):
        m.checkpoint_bytes = checkpoint_bytes(loaded.path)
    for source in sources:
        seqs = heldout_sequences(source, tok, samples, seq_len, text_field)
        total, count = nll(model, seqs, batch_size=batch_size, progress=progress)
        m.perplexity[source] = math.exp(total / count)
        m.test_sequences[source] = len(seqs)
    if tasks and lm_eval:
        from .tasks import run_lm_eval

        require_lm_eval()
        results = run_lm_eval(model, tok, list(tasks), limit=limit)
        for task in tasks:
            if task not in results or not results[task]:
                raise DomainpruneError(f"lm-eval reported no acc/acc_norm for task {task!r}; give lm-eval task names")
            m.zero_shot[task] = results[task].get("acc_norm", results[task].get("acc"))
    elif tasks:
        from .tasks import evaluate_task

        for task in tasks:
            m.zero_shot[task] = evaluate_task(model, tok, task, limit=limit, progress=progress)["acc_norm"]
    for task in code_tasks:
        result = evaluate_mbpp(model, tok, limit=limit, max_new_tokens=code_tokens, progress=progress)
        m.pass_at_1[task], m.problems[task] = result["pass_at_1"], result["n"]
        log.info(
            "%s: %s pass@1 %.3f ± %.3f over %d problems (sandbox: %s)",
            name,
            task,
            result["pass_at_1"],
            result["stderr"],
            result["n"],
            result["isolation"],
        )
    if speed:
        t = throughput(model, repeats=speed_repeats)
        m.decode_tokens_per_s, m.prefill_tokens_per_s = t["decode_tokens_per_s"], t["prefill_tokens_per_s"]
    return m


def ratios(m: Measurement, dense: Measurement) -> dict[str, float]:
    """Ratios to the dense model: perplexity (pruned/dense), speed (pruned/dense), parameter bytes (dense/pruned);
    drops from it: mean zero-shot accuracy, pass@1 per code task."""
    out = {f"ppl_{s}": m.perplexity[s] / dense.perplexity[s] for s in m.perplexity if s in dense.perplexity}
    if m.decode_tokens_per_s and dense.decode_tokens_per_s:
        out["decode_speedup"] = m.decode_tokens_per_s / dense.decode_tokens_per_s
        out["prefill_speedup"] = m.prefill_tokens_per_s / dense.prefill_tokens_per_s
    out["param_ratio"] = dense.params / m.params
    if m.zero_shot_mean is not None and dense.zero_shot_mean is not None:
        out["zero_shot_drop"] = dense.zero_shot_mean - m.zero_shot_mean
    for task, p in m.pass_at_1.items():
        if task in dense.pass_at_1:
            out[f"pass_at_1_drop_{task}"] = dense.pass_at_1[task] - p
    return out
