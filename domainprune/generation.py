"""Domain generation check: greedy continuations of a few held-out domain prompts, dense and pruned side by side.

Perplexity says how well a model predicts held-out text; reading what it writes says whether that is still
usable. The prompts are the first ~`chars` characters of the first K documents (in stream order, see
`Corpus.ordered`) of the domain's test split that are long enough, so every model and every run sees the same ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .data import load_corpus
from .errors import DomainpruneError
from .evaluate import model_device
from .models import LoadedModel

PROMPT_CHARS = 200
NEW_TOKENS = 48
PROMPTS = 3


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
    from transformers import GenerationConfig

    if new_tokens < 1:
        raise DomainpruneError(f"new tokens must be at least 1, got {new_tokens}")
    model, tokenizer = loaded.model, loaded.tokenizer
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    device = model_device(model)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        out.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
    return out


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
        return cls(d["data"], int(d["new_tokens"]), list(d["prompts"]), {k: list(v) for k, v in d["continuations"].items()})

    def markdown(self) -> str:
        """Each prompt, then every model's continuation, in fenced blocks."""
        lines = [f"Greedy continuations ({self.new_tokens} new tokens at most) of the first {len(self.prompts)} held-out "
                 f"`{self.data}` test documents' opening characters.", ""]
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
