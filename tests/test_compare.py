"""`domainprune compare` (several pruned runs beside the dense model, measured in one process), the generation
check, figures read back from compare.json and from the benchmark's JSONL, and `eval --lm-eval`."""

from __future__ import annotations

import importlib.util
import json

import pytest
from tiny_runs import cli, compared

from domainprune.compare import from_bench_rows, load_figures, select
from domainprune.errors import DomainpruneError
from domainprune.generation import domain_prompts, fence


def fails(capsys, *args) -> str:
    code, _, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_compare_writes_a_table_with_every_model(capsys, root, runs):
    out = compared(capsys, root)
    domain = str(runs["corpus"])
    data = json.loads((out / "compare.json").read_text())
    assert data["domain"] == domain
    assert [m["name"] for m in data["models"]] == ["dense", "flap35", "wanda50"]
    dense, flap, wanda = data["models"]
    assert dense["role"] == "dense" and "ratios" not in dense
    for run in (flap, wanda):
        m = run["measurement"]
        assert m["params"] < dense["measurement"]["params"] and m["checkpoint_bytes"] > 0
        assert m["test_sequences"] == {domain: 2} and set(m["zero_shot"]) == {str(runs["task"])}
        assert m["decode_tokens_per_s"] is None  # --no-speed
        assert run["ratios"][f"ppl_{domain}"] == pytest.approx(
            m["perplexity"][domain] / dense["measurement"]["perplexity"][domain]
        )
        assert run["recipe"]["method"] in ("flap", "wanda-sp") and 0.3 < run["prune"]["sparsity_achieved"] < 0.55
    gen = data["generation"]
    assert gen["data"] == domain and gen["new_tokens"] == 6 and len(gen["prompts"]) == 2
    assert set(gen["continuations"]) == {"dense", "flap35", "wanda50"} and all(
        len(v) == 2 for v in gen["continuations"].values()
    )
    md = (out / "compare.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith(f"| model | method | sparsity | params | MB | {domain} ppl (×dense) |")
    assert [row.split(" | ")[0] for row in table[1:]] == ["| dense", "| flap35", "| wanda50"]
    assert "| flap35 | flap/global | " in md and "| wanda50 | wanda-sp/uniform | 50.0% |" in md
    assert f"({flap['ratios'][f'ppl_{domain}']:.2f}×)" in md
    assert "## Generation samples" in md and fence(gen["continuations"]["wanda50"][1]) in md


def test_compare_json_reads_back_and_selects_runs(capsys, root, runs):
    c = load_figures(compared(capsys, root) / "compare.json")
    assert [e.name for e in c.entries] == ["dense", "flap35", "wanda50"] and c.domain == str(runs["corpus"])
    assert [e.name for e in select(c, [runs["wanda50"]]).entries] == ["dense", "wanda50"]
    with pytest.raises(DomainpruneError, match="has no figures"):
        select(c, [runs["dense"]])


def test_benchmark_rows_are_the_same_figures(capsys, root, runs):
    data = json.loads((compared(capsys, root) / "compare.json").read_text())
    dense, *pruned = data["models"]
    rows = [{"key": "dense", "measurement": dense["measurement"]}] + [
        {
            "key": f"{r['recipe']['method']}|{r['recipe']['allocation']}|0.35",
            "method": r["recipe"]["method"],
            "allocation": r["recipe"]["allocation"],
            "level": 0.35,
            "achieved": r["prune"]["sparsity_achieved"],
            "prune_seconds": 1.0,
            "peak_rss_bytes": 2**30,
            "recipe": r["recipe"],
            "uniform": False,
            "checkpoint": r["path"],
            "measurement": r["measurement"],
        }
        for r in pruned
    ]
    c = from_bench_rows(rows)
    assert [e.name for e in c.entries] == ["dense", "flap|global|0.35", "wanda-sp|uniform|0.35"]
    assert c.ratios(c.runs[0]) == pytest.approx(pruned[0]["ratios"])
    header, table = c.table()
    assert header[5] == f"{runs['corpus']} ppl (×dense)" and len(table) == 3


def test_domain_prompts_are_deterministic_and_short():
    first = domain_prompts("code", 3)
    assert first == domain_prompts("code", 3) and len(first) == 3 and len(set(first)) == 3
    assert all(100 <= len(p) <= 200 for p in first)


def test_compare_errors_are_one_line(capsys, runs, tmp_path):
    assert "not a model folder" in fails(capsys, "compare", tmp_path, "--baseline", runs["dense"], "--quiet")
    assert "give them with --tasks" in fails(
        capsys, "compare", runs["flap35"], "--baseline", runs["dense"], "--lm-eval", "--quiet"
    )


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_missing_is_one_line(capsys, runs):
    msg = fails(capsys, "eval", runs["dense"], "--data", "code", "--tasks", "piqa", "--lm-eval", "--quiet")
    assert "pip install lm-eval" in msg
