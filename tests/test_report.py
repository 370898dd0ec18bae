"""`domainprune report`: report.html (self-contained, three embedded PNG plots) and report.md with the figures, their
ratios to dense, the recipes and the generation samples; from compare.json, from the benchmark's JSONL, or measured
in place. One test renders the page in headless Chromium (skipped when no Chromium is installed)."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from tiny_runs import cli, compared

from domainprune.compare import Comparison, Entry, load_figures
from domainprune.measure import Measurement
from domainprune.report import dense_shapes, kept_fractions, pareto_front

PNG = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def figures(capsys_module, root, tmp_path_factory) -> Path:
    """The compare run's compare.json, with throughput figures added (the compare test runs with --no-speed)."""
    data = json.loads((compared(capsys_module, root) / "compare.json").read_text())
    for model, (decode, prefill) in zip(data["models"], [(50.0, 4000.0), (60.0, 5000.0), (75.0, 7000.0)]):
        model["measurement"].update(decode_tokens_per_s=decode, prefill_tokens_per_s=prefill)
    path = tmp_path_factory.mktemp("figures") / "compare.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def capsys_module():
    """`compared` runs the CLI in-process; module fixtures cannot use capsys, so give it a stand-in."""

    class Capture:
        def readouterr(self):
            return "", ""

    return Capture()


@pytest.fixture(scope="module")
def report(capsys_module, runs, figures, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    import sys

    from domainprune.cli import main

    argv = sys.argv
    sys.argv = [
        "domainprune",
        "report",
        str(runs["flap35"]),
        str(runs["wanda50"]),
        "--figures",
        str(figures),
        "--out",
        str(out),
        "--force",
        "--quiet",
    ]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = argv
    assert exit_.value.code in (0, None)
    return out


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in IMG.findall(page)]


def test_report_holds_figures_ratios_plots_recipes_and_samples(report, figures):
    data = json.loads(figures.read_text())
    page = (report / "report.html").read_text()
    pngs = images(page)
    assert len(pngs) == 3 and all(p.startswith(PNG) and len(p) > 5000 for p in pngs)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: opens from disk, offline
    c = load_figures(figures)
    header, rows = c.table()
    assert "decode tok/s (×)" in header and "bytes dense/pruned" in header
    for row in rows:  # every figure and ratio of the table is on the page
        for cell in row:
            assert f"<td>{html.escape(cell)}</td>" in page, cell
    flap = data["models"][1]
    assert f"({flap['ratios'][f'ppl_{c.domain}']:.2f}×)" in page and "(1.20×)" in page  # perplexity and decode ratios
    assert '<td class="l">wanda-sp</td>' in page and '<td class="l">bias_compensation</td>' in page
    gen = data["generation"]
    for prompt in gen["prompts"]:
        assert html.escape(prompt) in page
    for texts in gen["continuations"].values():
        assert all(html.escape(t) in page for t in texts)
    md = (report / "report.md").read_text()
    assert md.count("](") >= 3 and all(
        (report / name).read_bytes().startswith(PNG) for name in ("pareto.png", "layers.png", "throughput.png")
    )
    assert "| flap35 | flap/global |" in md and "| wanda50 | wanda-sp/uniform |" in md and "(1.20×)" in md
    assert all(t in md for texts in gen["continuations"].values() for t in texts)


def test_layer_fractions_from_plan_and_from_config_agree(runs, tmp_path):
    m = Measurement("x", 1)
    entry = Entry("flap35", m, path=str(runs["flap35"]))
    c = Comparison("code", [Entry("dense", m, "dense", str(runs["dense"])), entry])
    from_plan = kept_fractions(entry, dense_shapes(c))
    bare = tmp_path / "flap35"
    shutil.copytree(runs["flap35"], bare, ignore=shutil.ignore_patterns("plan.json"))
    c_bare = Comparison("code", [Entry("dense", m, "dense", str(runs["dense"])), Entry("bare", m, path=str(bare))])
    from_config = kept_fractions(c_bare.runs[0], dense_shapes(c_bare))  # dense widths from the dense config.json
    assert len(from_plan) == 4 and [list(f) for f in from_plan] == [pytest.approx(list(f)) for f in from_config]
    assert any(f < 1 for layer in from_plan for f in layer)
    assert pareto_front([(3, 9), (1, 5), (2, 7), (2, 4), (4, 1)]) == [1, 3, 4]


def test_report_from_benchmark_rows(capsys, runs, figures, tmp_path):
    data = json.loads(figures.read_text())
    dense, flap, _ = data["models"]
    bare = tmp_path / "flap_global_0.35"  # as bench/quality.py saved checkpoints: no plan.json
    shutil.copytree(runs["flap35"], bare, ignore=shutil.ignore_patterns("plan.json"))
    rows = [
        {"key": "dense", "measurement": dense["measurement"]},
        {
            "key": "flap|global|0.35",
            "method": "flap",
            "allocation": "global",
            "level": 0.35,
            "achieved": flap["prune"]["sparsity_achieved"],
            "prune_seconds": 3.0,
            "peak_rss_bytes": 2**30,
            "recipe": flap["recipe"],
            "uniform": False,
            "checkpoint": str(bare),
            "measurement": flap["measurement"],
        },
    ]
    jsonl = tmp_path / "quality.jsonl"
    rows[0]["machine"] = "CPU\u2028(a line separator inside a JSON string is not a line break of the JSONL)"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    code, _, err = cli(
        capsys,
        "report",
        "--figures",
        jsonl,
        "--baseline",
        runs["dense"],
        "--prompts",
        "0",
        "--out",
        tmp_path / "rep",
        "--quiet",
    )
    assert code == 0, err
    page = (tmp_path / "rep" / "report.html").read_text()
    assert len(images(page)) == 3 and "flap|global|0.35" in page and "No generation samples" in page
    assert "<td>3 s</td>" not in page and '<td class="l">3 s</td>' in page  # pruning wall time from the row


def test_report_measures_when_no_figures_are_given(capsys, runs, tmp_path):
    code, _, err = cli(
        capsys,
        "report",
        runs["wanda50"],
        "--baseline",
        runs["dense"],
        "--data",
        runs["corpus"],
        "--samples",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--no-speed",
        "--prompts",
        "1",
        "--new-tokens",
        "4",
        "--out",
        tmp_path / "rep",
        "--quiet",
    )
    assert code == 0, err
    page = (tmp_path / "rep" / "report.html").read_text()
    assert len(images(page)) == 3 and "wanda50" in page and "Prompt 1" in page and "Prompt 2" not in page
    assert "decode tok/s" not in page  # not measured: the throughput plot shows the parameter-bytes ratio instead


def test_report_errors_are_one_line(capsys, runs, figures, tmp_path):
    for args, message in (
        ((runs["dense"], "--figures", figures), "has no figures in"),
        (("--figures", tmp_path / "missing.json"), "does not exist"),
        ((runs["flap35"], "--figures", runs["task"]), "is not a benchmark JSONL"),
        ((runs["flap35"], "--figures", runs["flap35"] / "plan.json"), "is not a compare.json"),
    ):
        code, _, err = cli(capsys, "report", *args, "--out", tmp_path / "r", "--quiet")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


# --------------------------------------------------------------------------------------------- in a browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
PROBE = """<script>window.addEventListener("load", function () {
  var d = document.createElement("div"); d.id = "probe";
  d.textContent = Array.prototype.map.call(document.images, function (i) {
    return (i.complete && i.naturalWidth > 0 ? "ok:" : "bad:") + i.naturalWidth + "x" + i.naturalHeight; }).join(" ");
  document.body.appendChild(d);
});</script>"""


def chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
        ]
        return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def browser() -> str:
    """The Chromium binary; module-scoped so that the test skips before the report is built."""
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium binary on PATH (apt-get install chromium)")
    return binary


def test_report_renders_in_chromium(browser, report, tmp_path):
    binary = browser
    page = (report / "report.html").read_text()
    probe = tmp_path / "probe.html"  # the report plus a script that records how every image decoded
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = run_chromium(binary, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<div id="probe">([^<]*)</div>', dom.stdout)
    assert found, dom.stdout[-2000:]
    decoded = found.group(1).split()
    assert len(decoded) == 3 and all(d.startswith("ok:") for d in decoded), decoded
    for text in (
        "Figures and ratios to dense",
        "flap35",
        "wanda50",
        "Generation samples",
        "Prompt 2",
        "bias_compensation",
    ):
        assert text in dom.stdout, text
    shot = tmp_path / "report.png"
    result = run_chromium(binary, f"--screenshot={shot}", "--window-size=1280,2400", (report / "report.html").as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1280, 2400)
        small = rgb.resize((320, 600))
        colours = small.getcolors(maxcolors=1 << 16) or []
        not_white = sum(n for n, c in colours if sum(c) < 720)
        assert len(colours) > 50 and not_white > 0.05 * 320 * 600  # text, tables and plots, not a blank page
