"""Domain generation check: greedy continuations of a few held-out domain prompts, dense and pruned side by side.

Perplexity says how well a model predicts held-out text; reading what it writes says whether that is still
usable. The prompts are the first ~`chars` characters of the first K documents (in stream order, see
`Corpus.ordered`) of the domain's test split that are long enough, so every model and every run sees the same ones.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from .data import load_corpus
from .errors import DomainpruneError
from .evaluate import model_device
from .models import LoadedModel

PROMPT_CHARS = 200
NEW_TOKENS = 48
PROMPTS = 3
GPU_BATCH = 64  # prompts decoded together on a GPU (one at a time on a CPU)


def domain_prompts(source: str, k: int = PROMPTS, chars: int = PROMPT_CHARS, text_field: str = "text") -> list[str]:
    """The first ~`chars` characters of the first `k` test documents holding at least `chars` characters.

    A prompt ends at the last line break in its second half when there is one (so it does not stop mid-line),
    else after exactly `chars` characters. Deterministic: same corpus, same prompts.
    """
    if k < 1 or chars < 10:
        raise DomainpruneError(f"need at least 1 prompt of at least 10 characters (got {k} of {chars})")
    corpus = load_corpus(source, text_field=text_field)
    prompts = []
    for doc in corpus.ordered("test"):
        text = doc.text.lstrip("\n")
        if len(text.strip()) < chars:
            continue
        cut = text[:chars]
        newline = cut.rfind("\n")
        prompts.append(cut[: newline + 1] if newline >= chars // 2 else cut)
        if len(prompts) == k:
            break
    if not prompts:
        raise DomainpruneError(f"corpus {source!r} has no test document of {chars}+ characters to prompt with")
    return prompts


@torch.inference_mode()
def continuations(loaded: LoadedModel, prompts: list[str], new_tokens: int = NEW_TOKENS) -> list[str]:
    """Greedy continuation (up to `new_tokens` tokens, stopping at EOS) of each prompt, batch 1, as text."""
    if new_tokens < 1:
        raise DomainpruneError(f"new tokens must be at least 1, got {new_tokens}")
    answers = greedy_answers(
        loaded.model,
        loaded.tokenizer,
        [(p, "") for p in prompts],
        new_tokens,
        batch_size=1,
        add_special_tokens=True,
        progress=False,
    )
    return [text for text, _ in answers]


_CLOSED_BLOCK = re.compile(r"```[^\n]*\n.*?```", re.S)


class CodeBlockClosed:
    """Stops each row once its answer (after its forced start) holds a closed code block; finished rows stay so."""

    def __init__(self, tokenizer: Any, prompt_len: int, starts: list[str]):
        self.tokenizer, self.prompt_len, self.starts = tokenizer, prompt_len, starts
        self.done = [False] * len(starts)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        rows = [i for i, d in enumerate(self.done) if not d]
        texts = self.tokenizer.batch_decode(input_ids[rows, self.prompt_len :], skip_special_tokens=True)
        for i, text in zip(rows, texts):
            self.done[i] = bool(_CLOSED_BLOCK.search(self.starts[i] + text))
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def default_batch(model: torch.nn.Module) -> int:
    return GPU_BATCH if model_device(model).type == "cuda" else 1


@torch.inference_mode()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[tuple[str, str]],
    max_new_tokens: int,
    *,
    batch_size: int | None = None,
    add_special_tokens: bool = True,
    stop_after_code_block: bool = False,
    progress: bool = True,
    desc: str = "generate",
) -> list[tuple[str, float]]:
    """Each prompt's greedy answer, with its forced start, and the seconds spent on it (its batch's time shared out).

    `prompts` are (model input text, the answer's forced start: text already at the end of the input that belongs
    to the answer, e.g. an opened code block). Stops at EOS, after `max_new_tokens`, and with
    `stop_after_code_block` once the answer holds a closed code block. Batches (default: `GPU_BATCH` prompts on a
    GPU, one at a time on a CPU, where answers are then exactly those of unpadded decoding) hold prompts of similar
    length, left-padded.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    batch_size = batch_size or default_batch(model)
    encoded = [tokenizer(text, add_special_tokens=add_special_tokens).input_ids for text, _ in prompts]
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    answers: list[tuple[str, float]] = [("", 0.0)] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr, disable=not progress)
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - len(encoded[i]) :] = 1
        starts = [prompts[i][1] for i in batch]
        stop = StoppingCriteriaList([CodeBlockClosed(tokenizer, width, starts)] if stop_after_code_block else [])
        started = time.perf_counter()
        out = model.generate(
            ids.to(device), attention_mask=mask.to(device), generation_config=config, stopping_criteria=stop
        )
        seconds = (time.perf_counter() - started) / len(batch)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for row, i in enumerate(batch):
            answers[i] = (starts[row] + texts[row], seconds)
        bar.update(len(batch))
    bar.close()
    return answers


@dataclass
class Samples:
    """The prompts and each model's continuations (model name -> one text per prompt), in model order."""

    data: str
    new_tokens: int
    prompts: list[str]
    continuations: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, loaded: LoadedModel) -> None:
        self.continuations[name] = continuations(loaded, self.prompts, self.new_tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Samples":
        return cls(
            d["data"], int(d["new_tokens"]), list(d["prompts"]), {k: list(v) for k, v in d["continuations"].items()}
        )

    def markdown(self) -> str:
        """Each prompt, then every model's continuation, in fenced blocks."""
        lines = [
            f"Greedy continuations ({self.new_tokens} new tokens at most) of the first {len(self.prompts)} held-out "
            f"`{self.data}` test documents' opening characters.",
            "",
        ]
        for i, prompt in enumerate(self.prompts):
            lines += [f"### Prompt {i + 1}", "", fence(prompt), ""]
            for name, texts in self.continuations.items():
                lines += [f"**{name}**", "", fence(texts[i]), ""]
        return "\n".join(lines)


def fence(text: str) -> str:
    """A Markdown code block holding `text` verbatim (the fence is longer than any backtick run inside)."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}\n{text}\n{ticks}"
