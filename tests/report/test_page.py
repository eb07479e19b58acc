"""The report page: self-contained HTML (no network, figures as data URIs), the same content in
Markdown with PNGs beside it, strings from results escaped, empty sections left out with a note."""

from __future__ import annotations

import base64
import re

import pytest

from kdq.cli import main
from kdq.errors import KdqError
from kdq.report.compare import collect
from kdq.report.page import report_runs, write_report
from tests.report.fake import ENV, fake_experiment, fake_run

PNG = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Three experiment folders of one YAML at seeds 0..2: teacher, baseline, kd."""
    root = tmp_path_factory.mktemp("seeds")
    for seed, (t, b, k) in enumerate(((0.90, 0.80, 0.83), (0.92, 0.81, 0.84), (0.91, 0.79, 0.85))):
        fake_experiment(root / f"seed{seed}", {"teacher": t, "baseline": b, "kd": k}, seed=seed,
                        compare={"teacher": "teacher", "student": "kd", "baseline": "baseline"})
    return root


@pytest.fixture(scope="module")
def report(seeds, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return report_runs([seeds], out), out


def test_html_is_self_contained(report):
    files, out = report
    page = files.html.read_text()
    assert not re.search(r"https?://", page, re.IGNORECASE)  # no fonts, scripts, styles or images from the web
    assert "<script" not in page and "<link" not in page
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == len(files.figures) >= 6
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_markdown_has_the_same_sections_and_its_figures_beside_it(report):
    files, out = report
    md, page = files.markdown.read_text(), files.html.read_text()
    headings = re.findall(r"^## (.+)$", md, re.MULTILINE)
    assert headings == re.findall(r"<h2>(.+?)</h2>", page)
    assert headings[:2] == ["Summary", "Accuracy against size and latency"]
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert "/" not in name and (out / name).read_bytes().startswith(PNG)
    assert {p.name for p in files.figures} == set(re.findall(r"\]\(([^)]+)\)", md))


def test_seeds_grouped_teacher_is_the_reference(report):
    files, _ = report
    md = files.markdown.read_text()
    assert "| teacher (reference) " in md and "(3 seeds)" in md
    assert "0.8400 ± 0.0100 (3 seeds) (-7.00 pt)" in md  # kd: mean and sample std over seeds, against the teacher


def test_empty_sections_are_left_out_with_a_note(report):
    files, _ = report
    md = files.markdown.read_text()
    assert "No low-bit sweep: fewer than two weight bit widths" in md
    assert "No pruned models among these runs." in md
    assert "report-bits.png" not in md and not (files.html.parent / "report-bits.png").exists()


def test_strings_from_results_are_escaped(tmp_path):
    fake_run(tmp_path / "runs" / EVIL.replace("/", "_"), 0.9, per_class_accuracy={EVIL: 0.9, "$x^$": 0.8, "c": 0.7},
             environment={**ENV, "device": "<img src=x onerror=alert(2)>"})
    fake_run(tmp_path / "runs" / "kd$^", 0.8, model="small")  # "$" in labels: drawn as text, never as mathtext
    files = report_runs([tmp_path / "runs"], tmp_path / "out", title="<b>title</b>")
    page, md = files.html.read_text(), files.markdown.read_text()
    for text in (page, md):
        assert "<script>" not in text and "<img src=x" not in text and "<b>title" not in text
        assert "&lt;script&gt;" in text
    assert "&lt;b&gt;title&lt;/b&gt;" in page


def test_machine_mismatch_is_flagged_on_the_page(tmp_path):
    fake_run(tmp_path / "runs" / "teacher", 0.9, model="big")
    fake_run(tmp_path / "runs" / "gpu", 0.8, environment={**ENV, "device": "NVIDIA H100", "device_type": "cuda"})
    files = report_runs([tmp_path / "runs"], tmp_path / "out", reference="teacher")
    md = files.markdown.read_text()
    assert "| gpu † " in md and "† measured on NVIDIA H100" in md and "Test CPU (avx2), 2 threads" in md
    assert "Left out, measured on another machine: gpu." in md  # not on the latency plot


def test_low_bit_sweep_and_pruning_sections(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "float", 0.9, sparsity=0.0, macs=40000)
    for bits, acc in (("w8a8", 0.89), ("w4a4", 0.87), ("w2a2", 0.8)):
        fake_run(runs / "apprentice" / bits, acc, kind="lowbit", bits=bits)
    for sparsity, acc in ((0.5, 0.88), (0.9, 0.7)):
        fake_run(runs / f"mag{sparsity}", acc, sparsity=sparsity, pruning={"method": "magnitude"})
    fake_run(runs / "ch2", 0.85, macs=20000, pruning={"method": "channels"})
    files = report_runs([runs], tmp_path / "out", models=["float", "w2a2"])
    names = {p.name for p in files.figures}
    assert {"report-bits.png", "report-sparsity.png", "report-macs.png"} <= names
    assert {"report-confusion-1.png", "report-confusion-2.png"} <= names and "report-confusion-3.png" not in names
    md = files.markdown.read_text()
    assert "Accuracy per class of float, w2a2" in md


def test_a_rewritten_report_removes_its_stale_figures(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "a", 0.9)
    fake_run(runs / "b", 0.8, model="other")
    out = tmp_path / "out"
    report_runs([runs], out)
    (out / "report-bits.png").write_bytes(PNG)  # as an earlier report of a sweep would have left
    (out / "notes.png").write_bytes(PNG)  # not ours: kept
    report_runs([runs], out, models=["a"])
    assert not (out / "report-bits.png").exists() and not (out / "report-confusion-2.png").exists()
    assert (out / "notes.png").exists() and (out / "report-confusion-1.png").exists()


def test_no_history_means_a_note_not_a_figure(tmp_path):
    fake_run(tmp_path / "runs" / "exported", 0.9, history=False)
    files = report_runs([tmp_path / "runs"], tmp_path / "out")
    assert "No training history (metrics.jsonl) for exported" in files.markdown.read_text()
    assert "report-curves.png" not in {p.name for p in files.figures}


def test_unknown_models_and_unwritable_out(tmp_path, capsys):
    fake_run(tmp_path / "runs" / "a", 0.9)
    rows = collect([tmp_path / "runs"])
    with pytest.raises(KdqError, match=r"unknown model 'b' in --models"):
        write_report(rows, tmp_path / "out", models=["b"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(KdqError, match="lies inside the file"):
        write_report(rows, tmp_path / "file" / "out")
    code = main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "file" / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "lies inside the file" in err, err
    code = main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "file")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is a file" in err, err


def test_report_command_writes_the_page_and_prints_the_table(tmp_path, capsys):
    fake_run(tmp_path / "runs" / "teacher", 0.9, model="big")
    fake_run(tmp_path / "runs" / "kd", 0.85)
    code = main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--title", "KD on toy"])
    out, err = capsys.readouterr()
    assert code == 0 and "kd (reference)" in out and "report.html" in err
    assert "<h1>KD on toy</h1>" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.slow
def test_kdq_run_writes_the_report_into_the_experiment(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "name: tiny\n"
        "data: {name: digits, subset: 300}\n"
        "train: {batch_size: 64, progress: false, epochs: 1}\n"
        "stages:\n"
        "  baseline: {model: cnn-tiny}\n"
        "  teacher: {model: cnn-small}\n"
        "compare: {teacher: teacher, baseline: baseline}\n"
    )
    assert main(["run", str(exp), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "report.md").read_text()
    assert md.startswith("# tiny: every stage compared on digits") and "| teacher (reference) " in md
    page = (tmp_path / "o" / "report.html").read_text()
    assert "data:image/png;base64," in page and not re.search(r"https?://", page)
    # the folder is also what `kdq report` reads later: the teacher is still the reference
    code = main(["compare", str(tmp_path / "o")])
    assert code == 0 and "teacher (reference)" in capsys.readouterr().out


def test_the_page_in_a_real_browser(report, tmp_path):
    """Headless Chromium opens the page from disk: every figure loads, the console stays clean,
    nothing is fetched, and the screenshot shows something."""
    from tests.report.browser import NOT_FOUND, find_chromium, is_blank, render

    chromium = find_chromium()
    if chromium is None:
        pytest.skip(NOT_FOUND)
    files, _ = report
    result = render(files.html, tmp_path / "page.png", chromium=chromium)
    tags = len(re.findall(r"<img\b", files.html.read_text()))
    assert tags >= 5 and len(result["images"]) == tags
    assert result["images_ok"], [i for i in result["images"] if not i["natural_width"]]
    assert result["console_errors"] == [] and result["failed_requests"] == []
    assert not is_blank(tmp_path / "page.png")
