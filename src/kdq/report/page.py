"""The comparison report: one page, as self-contained HTML and as Markdown with PNGs beside it.

    rows = collect(["runs/quickstart"])
    write_report(rows, "runs/quickstart", reference="teacher")   # report.html, report.md, report-*.png

report.html opens from disk with no server and no network: its figures are embedded as
base64 data URIs, its CSS is inline, and a Content-Security-Policy forbids loading anything
else. Every string that comes from a run (labels, class names, machine names) is escaped, in
the HTML and in the Markdown alike. Both files hold the same sections, built once here:

- the summary table (kdq.report.compare.summary_cells), ratios to the reference row;
- accuracy against size and against latency, the Pareto front marked;
- accuracy per model, with error bars over seeds;
- per-class accuracy and confusion matrices of the chosen models (reference + the most
  accurate other by default), and their training curves overlaid;
- accuracy against weight bits (low-bit runs), and against sparsity and MACs (pruned runs).

A section with nothing to show is left out with a one-line note saying why.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

from kdq.errors import KdqError, suggest
from kdq.io import write_text
from kdq.report.compare import COLUMNS, Row, check_rows, collect, md_escape, pick_reference, summary_cells
from kdq.report.figures import (
    plot_accuracy_bars, plot_confusions, plot_curves, plot_per_class, plot_sweep, plot_tradeoff, tradeoff_front,
)
from kdq.report.table import markdown_table
from kdq.rundir.layout import REPORT_FIGURE, REPORT_HTML, REPORT_MD, report_figure

_PNG = b"\x89PNG\r\n\x1a\n"
_MAX_PER_CLASS_TABLE = 50  # classes listed in the per-class table (the figure shows them all)
_SPARSE = 0.05  # a pruned model with at least this share of zero weights was pruned unstructured


class ReportFiles(NamedTuple):
    html: Path
    markdown: Path
    figures: list[Path]


@dataclass
class _Figure:
    path: Path
    caption: str


@dataclass
class _Section:
    """One part of the page; `note` alone when it has nothing to show."""

    id: str
    heading: str
    lines: list[str] = field(default_factory=list)  # paragraphs (plain text, escaped when written)
    table: tuple[list[dict[str, str]], list[tuple[str, str]]] | None = None  # (cells, columns)
    figures: list[_Figure] = field(default_factory=list)
    note: str | None = None


def report_runs(paths: list[str | Path], out: str | Path, *, reference: str | None = None,
                models: list[str] | None = None, title: str | None = None) -> ReportFiles:
    """`kdq report`: collect the runs under `paths` (kdq.report.compare.collect) and write the report into `out`."""
    return write_report(collect(paths), out, title=title, reference=reference, models=models)


def write_report(rows: list[Row], out_dir: str | Path, *, title: str | None = None, reference: str | None = None,
                 models: list[str] | None = None) -> ReportFiles:
    """Write out_dir/report.html, out_dir/report.md and the figures (report-*.png) beside them.

    `reference` names the row every ratio is taken against (default: the experiment's teacher,
    else the first row); `models` names the rows whose per-class accuracy, confusion matrices
    and training curves are shown (default: the reference and the most accurate other row).
    Report figures of an earlier report in out_dir that this one does not draw are removed.
    """
    check_rows(rows)
    ref = pick_reference(rows, reference)
    chosen = _chosen(rows, ref, models)
    out = check_out(out_dir)  # made only once everything asked for is known to exist
    dicts = {id(r): asdict(r) for r in rows}
    machine = _short_machine(ref.machine)
    heading = title or f"{_models(len(rows))} compared on {ref.dataset}"
    # Labels and class names come from folders and results.json: drawn as they are, never read as
    # mathtext (a "$" in a folder name would otherwise fail the figure, or typeset as a formula).
    with matplotlib.rc_context({"text.parse_math": False}):
        sections = [
            _summary(rows, ref),
            _tradeoff(rows, ref, dicts, out),
            _accuracy(rows, ref, dicts, out),
            _per_class(chosen, dicts, out),
            _confusions(chosen, dicts, out),
            _curves(chosen, dicts, out),
            _bits(rows, ref, dicts, out),
            _pruning(rows, ref, dicts, out),
        ]
    figures = [f.path for s in sections for f in s.figures]
    _remove_stale(out, {p.name for p in figures})
    subtitle = (f"{_models(len(rows))} on {ref.dataset}; reference: {ref.label}; "
                f"latency and throughput measured on {machine} (see the notes for any other machine).")
    md = write_text(out / REPORT_MD, _markdown(heading, subtitle, sections))
    page = write_text(out / REPORT_HTML, _html(heading, subtitle, sections))
    return ReportFiles(page, md, figures)


def check_out(out: str | Path) -> Path:
    """`out` as a folder kdq can write the report into (made if missing); else one KdqError line."""
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == out else f"lies inside the file {path}"
            raise KdqError(f"--out {out} {where}; give a folder to write the report into")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdqError(f"cannot write {out}: {exc.strerror or exc}; check the folder's permissions "
                       "or choose another --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise KdqError(f"cannot write {out}: permission denied; check the folder's permissions "
                       "or choose another --out")
    return out


def _chosen(rows: list[Row], ref: Row, models: list[str] | None) -> list[Row]:
    """The rows shown in detail: `models` by label, or the reference and the most accurate other."""
    if models is None:
        others = [r for r in rows if r is not ref]
        return [ref] + ([max(others, key=lambda r: r.accuracy)] if others else [])
    by_label = {r.label: r for r in rows}
    for name in models:
        if name not in by_label:
            raise KdqError(f"unknown model {name!r} in --models{suggest(name, by_label)}; choose rows by their "
                           f"labels: {', '.join(list(by_label)[:20])}")
    if not models:
        raise KdqError("--models names no rows; give labels separated by commas, e.g. --models teacher,kd")
    return [by_label[name] for name in dict.fromkeys(models)]


def _models(n: int) -> str:
    return f"{n} model" if n == 1 else f"{n} models"


def _short_machine(machine: str) -> str:
    """The machine without its CPU extension list, for titles: 'AMD EPYC, 2 threads'."""
    return re.sub(r" \([^()]*\)", "", machine)


def _names(rows: list[Row]) -> str:
    names = [r.label for r in rows]
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


# ---- the sections


def _summary(rows: list[Row], ref: Row) -> _Section:
    cells, notes = summary_cells(rows, ref.label)
    return _Section("summary", "Summary", notes, table=(cells, list(COLUMNS)))


def _tradeoff(rows: list[Row], ref: Row, dicts: dict[int, dict[str, Any]], out: Path) -> _Section:
    section = _Section("tradeoff", "Accuracy against size and latency")
    path = plot_tradeoff([dicts[id(r)] for r in rows], "size_bytes", out / report_figure("size"),
                         f"{ref.dataset}: accuracy against model size")
    if path is not None:
        front = tradeoff_front([dicts[id(r)] for r in rows], "size_bytes")
        section.figures.append(_Figure(path, f"Accuracy against size on disk; Pareto front (no smaller model is "
                                             f"as accurate): {', '.join(front)}."))
    here = [r for r in rows if r.machine == ref.machine]  # latency is compared on one machine only
    path = plot_tradeoff([dicts[id(r)] for r in here], "latency_ms", out / report_figure("latency"),
                         f"{ref.dataset}: accuracy against batch-1 latency on {_short_machine(ref.machine)}")
    if path is not None:
        front = tradeoff_front([dicts[id(r)] for r in here], "latency_ms")
        away = [r for r in rows if r.machine != ref.machine]
        left = f" Left out, measured on another machine: {_names(away)}." if away else ""
        section.figures.append(_Figure(path, f"Accuracy against median batch-1 latency on {ref.machine}; Pareto front "
                                             f"(no faster model is as accurate): {', '.join(front)}.{left}"))
    if not section.figures:
        section.note = "No size or latency recorded in any run's results.json: nothing to plot against accuracy."
    return section


def _accuracy(rows: list[Row], ref: Row, dicts: dict[int, dict[str, Any]], out: Path) -> _Section:
    section = _Section("accuracy", "Accuracy")
    seeds = "; error bars: sample std over seeds" if any(r.seeds > 1 for r in rows) else ""
    path = plot_accuracy_bars([dicts[id(r)] for r in rows], out / report_figure("accuracy"),
                              f"{ref.dataset}: test accuracy of {_models(len(rows))}")
    if path is not None:
        section.figures.append(_Figure(path, f"Test accuracy on {ref.dataset}{seeds}."))
    return section


def _per_class(chosen: list[Row], dicts: dict[int, dict[str, Any]], out: Path) -> _Section:
    section = _Section("per-class", "Accuracy per class")
    path = plot_per_class([dicts[id(r)] for r in chosen], out / report_figure("per-class"),
                          f"{chosen[0].dataset}: accuracy per class of {_names(chosen)}")
    if path is None:
        section.note = f"No per-class accuracy recorded for {_names(chosen)}."
        return section
    section.figures.append(_Figure(path, f"Accuracy per class of {_names(chosen)} "
                                         "(first seed's run where there are several)."))
    classes = list(dict.fromkeys(c for r in chosen for c in r.per_class_accuracy))
    if len(classes) <= _MAX_PER_CLASS_TABLE:
        columns = [("class", "class")] + [(f"m{i}", r.label) for i, r in enumerate(chosen)]
        cells = [{"class": c, **{f"m{i}": _percent(r.per_class_accuracy.get(c)) for i, r in enumerate(chosen)}}
                 for c in classes]
        section.table = (cells, columns)
    return section


def _confusions(chosen: list[Row], dicts: dict[int, dict[str, Any]], out: Path) -> _Section:
    section = _Section("confusion", "Confusion matrices")
    for i, row in enumerate(chosen, 1):
        path = plot_confusions(dicts[id(row)], out / report_figure(f"confusion-{i}"),
                               f"{row.label} on {row.dataset}: accuracy {row.accuracy:.4f}")
        if path is not None:
            seed = " (its first seed)" if row.seeds > 1 else ""
            section.figures.append(_Figure(path, f"{row.label}{seed}: counts, and each true class's share "
                                                 "(rows sum to 1)."))
    if not section.figures:
        section.note = f"No confusion matrix recorded for {_names(chosen)}."
    return section


def _curves(chosen: list[Row], dicts: dict[int, dict[str, Any]], out: Path) -> _Section:
    section = _Section("curves", "Training curves")
    path = plot_curves([dicts[id(r)] for r in chosen], out / report_figure("curves"),
                       f"training of {_names(chosen)}")
    if path is None:
        section.note = f"No training history (metrics.jsonl) for {_names(chosen)}: they were not trained here."
    else:
        section.figures.append(_Figure(path, "Each loss term its own line (colour: model, line style: term), "
                                             "and validation accuracy, per epoch (first seed's run)."))
    return section


def _bits(rows: list[Row], ref: Row, dicts: dict[int, dict[str, Any]], out: Path) -> _Section:
    section = _Section("bits", "Accuracy against weight bits")
    swept = [r for r in rows if r.bits is not None]
    if len({r.bits for r in swept}) < 2:
        section.note = "No low-bit sweep: fewer than two weight bit widths among these models."
        return section
    points = [{**dicts[id(r)], "group": _group(r.label, r"w\d+(?:a\d+)?")} for r in swept]
    path = plot_sweep(points, "bits", out / report_figure("bits"), f"{ref.dataset}: accuracy against weight bits")
    if path is not None:
        section.figures.append(_Figure(path, f"Accuracy against weight bits of {_names(swept)}."))
    return section


def _pruning(rows: list[Row], ref: Row, dicts: dict[int, dict[str, Any]], out: Path) -> _Section:
    section = _Section("pruning", "Accuracy against sparsity and MACs")
    if not any(r.pruned for r in rows):
        section.note = "No pruned models among these runs."
        return section
    for x, what in (("sparsity", "sparsity (share of weights that are zero)"), ("macs", "multiply-accumulates kept")):
        swept = [r for r in rows if getattr(r, x) is not None]
        if x == "sparsity":
            # unstructured pruning against the dense float models; channel-pruned models are dense
            # (they belong on the MACs axis), and low-bit rounding zeroes weights without pruning
            swept = [r for r in swept if (r.pruned and r.sparsity >= _SPARSE) or (not r.pruned and r.kind == "float")]
            if not any(r.pruned for r in swept):
                continue
        if len({getattr(r, x) for r in swept}) < 2:
            continue
        points = [{**dicts[id(r)], "group": _group(r.label, r"\d+(?:\.\d+)?")} for r in swept]
        path = plot_sweep(points, x, out / report_figure(x), f"{ref.dataset}: accuracy against {x}")
        if path is not None:
            section.figures.append(_Figure(path, f"Accuracy against {what}; one line per family of runs "
                                                 "(labels without their numbers)."))
    if not section.figures:
        section.note = "Pruned models, but all at one sparsity and one MAC count: nothing to sweep."
    return section


def _group(label: str, pattern: str) -> str | None:
    """A sweep line's name: the label without its swept number ('alone/w4a4' -> 'alone')."""
    name = re.sub(r"[-_./]{2,}", lambda m: m.group(0)[0], re.sub(pattern, "", label)).strip("-_./ ")
    return name or None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Figures an earlier report in `out` drew and this one does not (they would mislead)."""
    for path in out.iterdir():
        if REPORT_FIGURE.fullmatch(path.name) and path.name not in keep and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)


# ---- writing the page


def _markdown(title: str, subtitle: str, sections: list[_Section]) -> str:
    parts = [f"# {md_escape(title)}", md_escape(subtitle)]
    for s in sections:
        parts.append(f"## {md_escape(s.heading)}")
        if s.note is not None:
            parts.append(md_escape(s.note))
            continue
        if s.table is not None:
            cells, columns = s.table
            parts.append(markdown_table([{k: md_escape(v) for k, v in c.items()} for c in cells],
                                        [(k, md_escape(h)) for k, h in columns]))
        if s.lines:
            parts.append("\n".join(f"- {md_escape(line)}" for line in s.lines))
        for f in s.figures:
            parts.append(f"![{md_escape(s.heading)}]({f.path.name})\n\n{md_escape(f.caption)}")
    return "\n\n".join(parts) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1rem; color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { font-size: 1.25rem; margin-top: 2.2rem;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.sub, .note, figcaption { color: #555; } .note { font-style: italic; }
nav a { margin-right: 1rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.8rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; white-space: nowrap; }
td.num { text-align: right; } th { background: #f4f4f4; white-space: normal; vertical-align: bottom; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1rem 0; } img { max-width: 100%; height: auto; }
"""
# Defence in depth: even if a string slipped through unescaped, the page could load nothing.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _html(title: str, subtitle: str, sections: list[_Section]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>", f'<p class="sub">{e(subtitle)}</p>',
            "<nav>" + "".join(f'<a href="#{s.id}">{e(s.heading)}</a>' for s in sections) + "</nav>"]
    for s in sections:
        body.append(f'<section id="{s.id}"><h2>{e(s.heading)}</h2>')
        if s.note is not None:
            body.append(f'<p class="note">{e(s.note)}</p></section>')
            continue
        if s.table is not None:
            body.append(_html_table(*s.table))
        if s.lines:
            body.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in s.lines) + "</ul>")
        for f in s.figures:
            body.append(f'<figure><img src="{_data_uri(f.path)}" alt="{e(s.heading)}">'
                        f"<figcaption>{e(f.caption)}</figcaption></figure>")
        body.append("</section>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _html_table(cells: list[dict[str, str]], columns: list[tuple[str, str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for _, h in columns)
    rows = "".join("<tr>" + "".join(_td(str(c.get(k, ""))) for k, _ in columns) + "</tr>" for c in cells)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def _td(text: str) -> str:
    """A cell, right-aligned when it holds a number (so digits line up), else left-aligned."""
    numeric = re.match(r"[-+]?\d", text) is not None
    return f'<td class="num">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"


def _data_uri(path: Path) -> str:
    data = path.read_bytes()
    if not data.startswith(_PNG):
        raise KdqError(f"{path} is not a PNG image; delete it and write the report again")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
