"""Run a multi-stage YAML experiment and compare its models in one table and on one report page
(report.html and report.md in the experiment's folder, kdq.report.page)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

from kdq.config import Experiment, Stage
from kdq.engine import describe_machine, distributed
from kdq.engine.config import WATCHING_KEYS
from kdq.errors import KdqError
from kdq.io import read_json, write_json, write_text
from kdq.recipes import write_report
from kdq.report.compare import collect
from kdq.report.page import write_report as write_page
from kdq.report.table import human_bytes, markdown_table
from kdq.rundir.claim import check_claim, claim
from kdq.rundir.layout import RESULTS, STAGE_FILE, SUMMARY_JSON, SUMMARY_MD, read_results
from kdq.rundir.load import resolve_data
from kdq.stages import STAGES

COLUMNS = (
    ("stage", "model"),
    ("arch", "architecture"),
    ("runtime", "runs on"),
    ("params", "params"),
    ("size", "size"),
    ("accuracy", "accuracy"),
    ("latency", "latency b=1 (ms, median ± IQR/2)"),
    ("throughput", "throughput (img/s)"),
    ("train_time", "train time (s)"),
)


def run_experiment(exp: Experiment, out: str | Path | None = None) -> dict[str, Any]:
    """Run every stage in order into `out/<stage>`, then write and print the summary.

    A stage whose directory already holds finished results for the same configuration is
    reused, and an interrupted one resumes from its last checkpoint: rerunning the same
    command after a crash loses nothing that was finished. A stage whose configuration
    changed is run again from scratch. A stage directory that this experiment did not write
    (no stage.json) is refused before any stage runs.
    """
    distributed.require_one_process("an experiment")
    root = Path(out or exp.out or Path("runs") / exp.name)
    bundle, data_record = resolve_data(exp.data["name"], **{k: v for k, v in exp.data.items() if k != "name"})
    check_claim(root, "experiment", resume=True)
    for stage in exp.stages:
        ours = (root / stage.name / STAGE_FILE).exists()
        check_claim(root / stage.name, _run_kind(stage), resume=ours, overwrite=ours)
    with claim(root, "experiment", "run", resume=True):  # kdq run always continues its own folder
        return _run_stages(exp, root, bundle, data_record)


def _run_kind(stage: Stage) -> str:
    """The kind of run directory a stage writes (kdq.rundir.layout.KINDS)."""
    return STAGES.get(stage.kind).run_kind(stage.options)


def _claim_stage(stage: Stage, stage_dir: Path, same: bool):  # noqa: ANN202
    """Claim a stage's directory: resumed when its configuration is unchanged, else replaced
    (only when stage.json says this experiment wrote it; a stage that cannot resume, such as
    quantize, is replaced too)."""
    ours = (stage_dir / STAGE_FILE).exists()
    resumable = "resume" in STAGES.get(stage.kind).parameters()
    return claim(stage_dir, _run_kind(stage), "run", resume=same, overwrite=ours and (not same or not resumable))


def _run_stages(exp: Experiment, root: Path, bundle, data_record: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    results: dict[str, dict[str, Any]] = {}
    sweep_rows: list[dict[str, Any]] = []
    for number, stage in enumerate(exp.stages, 1):
        stage_dir = root / stage.name
        # each stage announced as it starts: "[3/5] pruned: prune resnet8 channels from student -> runs/x/pruned"
        taught = ", ".join(map(str, stage.teacher)) if isinstance(stage.teacher, list) else stage.teacher
        print(f"[{number}/{len(exp.stages)}] {stage.name}: {stage.kind} {_arch(stage)}"
              f"{f' from {stage.source}' if stage.source else ''}{f' taught by {taught}' if taught else ''}"
              f" -> {stage_dir}", file=sys.stderr, flush=True)
        rows, sweep = _run_stage(stage, bundle, data_record, stage_dir, root, results)
        results.update(rows)
        sweep_rows += sweep
    summary = summarize(exp, results)
    text = summary["table"] + "\n\n" + "\n".join(summary["notes"]) + "\n"
    if sweep_rows:
        summary["sweep"] = _sweep_report(exp, sweep_rows, results, root)
        summary["sweep_rows"] = sweep_rows
        text += "\n" + summary["sweep"] + "\n"
    summary["compare"] = dict(exp.compare)  # `kdq report` on this folder takes its teacher as the reference
    write_json(root / SUMMARY_JSON, summary)
    write_text(root / SUMMARY_MD, text)
    print(text, end="")
    _write_page(exp, root)
    return summary


def _write_page(exp: Experiment, root: Path) -> None:
    """report.html and report.md beside the summary: every stage compared on one page, ratios
    against the teacher. The stages' results are safe in their folders whatever happens here, so
    a report that cannot be written is a warning saying how to write it later."""
    try:
        rows = collect([root / stage.name for stage in exp.stages])
        teacher = exp.compare.get("teacher")
        reference = next((r.label for r in rows if teacher and str(root / teacher) in r.paths), None)
        files = write_page(rows, root, title=f"{exp.name}: every stage compared on {rows[0].dataset}",
                           reference=reference)
    except KdqError as exc:
        print(f"kdq: warning: report not written: {exc}; write it with `kdq report {root} --out {root}`",
              file=sys.stderr)
        return
    print(f"wrote {files.html} and {files.markdown}", file=sys.stderr)


def _fingerprint(stage: Stage, data_record: dict[str, Any], options: dict[str, Any], root: Path,
                 earlier: dict[str, Any]) -> dict[str, Any]:
    """What a stage's results depend on; equal fingerprints mean the finished run can be reused.

    That includes the runs of the earlier stages it starts from or learns from: a digest of
    their results.json files, so a stage whose source or teacher was trained again (changed
    options, or its folder deleted) is redone too, never reused on top of a model that is gone.
    """
    teachers = stage.teacher if isinstance(stage.teacher, list) else [stage.teacher]
    inputs = {name: _results_digest(root / name) for name in dict.fromkeys([stage.source, *teachers])
              if name in earlier}
    fingerprint = {"kind": stage.kind, "model": stage.model, "options": options, "train": stage.train,
                   "data": data_record}
    return {**fingerprint, "inputs": inputs} if inputs else fingerprint  # a first stage's is as it always was


def _results_digest(stage_dir: Path) -> str:
    """sha256 over a stage's results.json files (one for a run, one per run of a recipe)."""
    digest = hashlib.sha256()
    for path in sorted(stage_dir.rglob(RESULTS)):
        digest.update(str(path.relative_to(stage_dir)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _same_fingerprint(stage_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """Whether the stage directory was made by this configuration; an unreadable stage.json
    (torn, garbage) counts as another configuration, so the stage is redone, never reused."""
    if not (stage_dir / STAGE_FILE).exists():
        return False
    try:
        recorded = read_json(stage_dir / STAGE_FILE, fix=f"running stage {stage_dir.name} again")
    except KdqError as exc:
        print(f"kdq: warning: {exc}", file=sys.stderr)
        return False
    return _what_counts(recorded) == _what_counts(fingerprint)


def _what_counts(fingerprint: Any) -> Any:
    """The fingerprint without how the run is watched: turning the progress bar or TensorBoard on
    does not make a finished stage stale."""
    if not (isinstance(fingerprint, dict) and isinstance(fingerprint.get("train"), dict)):
        return fingerprint
    return {**fingerprint, "train": {k: v for k, v in fingerprint["train"].items() if k not in WATCHING_KEYS}}


def _finished_results(stage_dir: Path) -> dict[str, Any]:
    """The stage's results, or {} (unfinished: it resumes) when results.json is missing or unreadable."""
    try:
        return read_results(stage_dir)
    except KdqError as exc:
        print(f"kdq: warning: {exc}; treating stage {stage_dir.name} as unfinished", file=sys.stderr)
        return {}


def _resolved(stage: Stage, root: Path, earlier: dict[str, Any]) -> dict[str, Any]:
    """The stage's options with earlier stages' names (source, teacher) as their directories."""
    options = dict(stage.options)
    if stage.source is not None:
        options["source"] = str(root / stage.source)
    named = lambda t: str(root / t) if t in earlier else t  # noqa: E731
    if isinstance(stage.teacher, list):
        options["teacher"] = [named(t) for t in stage.teacher]
    elif stage.teacher is not None:
        options["teacher"] = named(stage.teacher)
    return options


def _sweep_report(exp: Experiment, rows: list[dict[str, Any]], results: dict[str, Any], root: Path) -> str:
    source = next(s for s in exp.stages if STAGES.get(s.kind).collect is not None).source
    return write_report(rows, root, results.get(source, {}).get("accuracy"),
                        f"{exp.name}: accuracy against bit width", f"stage {source}")


def _run_stage(stage: Stage, bundle, data_record: dict[str, Any], stage_dir: Path, root: Path,
               earlier: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:  # noqa: ANN001
    """Run (or reuse) one stage; its rows for the table, and for a sweep report."""
    kind = STAGES.get(stage.kind)
    options = _resolved(stage, root, earlier)
    fingerprint = _fingerprint(stage, data_record, options, root, earlier)
    same = _same_fingerprint(stage_dir, fingerprint)
    finished = _finished_results(stage_dir) if same and kind.collect is None else {}
    if finished:
        print(f"   reusing finished stage {stage.name} (delete {stage_dir} to retrain)", file=sys.stderr)
        return {stage.name: {**finished, "arch": _arch(stage)}}, []
    with _claim_stage(stage, stage_dir, same):
        write_json(stage_dir / STAGE_FILE, fingerprint)
        returned = kind.call(options, stage.train, data=bundle, out=stage_dir, resume=same)
    if kind.collect is not None:  # several runs (a recipe: one per scheme and seed)
        return kind.collect(stage, returned)
    results = returned if isinstance(returned, dict) else returned.results  # a training stage returns a Run
    return {stage.name: {**results, "arch": _arch(stage)}}, []


def _arch(stage: Stage) -> str:
    """The table's architecture cell: the model, with its precision when quantized."""
    arch = STAGES.get(stage.kind).arch
    return stage.model if arch is None else arch(stage.model, stage.options)


def _latency_cell(r: dict[str, Any]) -> str:
    """Median batch-1 latency, with half its interquartile range where it was recorded."""
    iqr = r.get("latency_ms_batch1_iqr")
    median = f"{r['latency_ms_batch1']:.3f}"
    return median if iqr is None else f"{median} ± {iqr / 2:.3f}"


def _times(ours: float, theirs: float, smaller: str, larger: str, same: str) -> str | None:
    """'2.0x fewer parameters' or '1.3x more parameters': `ours` against `theirs`, either way round."""
    if not ours or not theirs:
        return None  # nothing to divide by (a missing measurement)
    ratio = theirs / ours if ours <= theirs else ours / theirs
    if f"{ratio:.1f}" == "1.0":
        return same
    return f"{ratio:.1f}x {smaller if ours < theirs else larger}"


def student_vs_teacher(student: dict[str, Any], teacher: dict[str, Any]) -> list[str]:
    """The summary's comparison phrases, each worded in the direction the numbers go."""
    points = (student["accuracy"] - teacher["accuracy"]) * 100
    accuracy = ("as accurate" if f"{abs(points):.2f}" == "0.00"
                else f"{abs(points):.2f} points {'more' if points > 0 else 'less'} accurate")
    phrases = [
        _times(student.get("params"), teacher.get("params"), "fewer parameters", "more parameters", "as many parameters"),
        _times(student.get("size_bytes"), teacher.get("size_bytes"), "smaller on disk", "larger on disk", "the same size on disk"),
        _times(student.get("latency_ms_batch1"), teacher.get("latency_ms_batch1"), "lower batch-1 latency",
               "higher batch-1 latency", "the same batch-1 latency"),
        accuracy,
    ]
    return [p for p in phrases if p is not None]


def summarize(exp: Experiment, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for name, r in results.items():
        rows.append({
            "stage": name,
            "arch": r["arch"],
            "runtime": f"{r.get('runtime', 'pytorch')} {r['environment'].get('device_type', '')}".strip(),
            "params": f"{r['params']:,}",
            "size": human_bytes(r["size_bytes"]),
            "accuracy": f"{r['accuracy']:.4f}",
            "latency": _latency_cell(r),
            "throughput": f"{r['throughput_per_s']:.0f}",
            "train_time": f"{r.get('train_time_s', 0):.0f}",
        })
    notes = []
    compare = exp.compare
    if "baseline" in compare and "student" in compare:
        base, student = results[compare["baseline"]], results[compare["student"]]
        gain = (student["accuracy"] - base["accuracy"]) * 100
        notes.append(
            f"KD gain: {gain:+.2f} accuracy points ({compare['student']} {student['accuracy']:.4f} "
            f"vs {compare['baseline']} {base['accuracy']:.4f}, same architecture and budget)"
        )
    if "teacher" in compare and "student" in compare:
        teacher, student = results[compare["teacher"]], results[compare["student"]]
        notes.append("student vs teacher: " + ", ".join(student_vs_teacher(student, teacher)))
    # int8 rows run on the CPU even where float rows ran on a GPU: name every processor used
    devices = dict.fromkeys(describe_machine(r["environment"]) for r in results.values())
    env = next(iter(results.values()))["environment"]
    notes.append(f"measured on {' and '.join(devices)} with {env['threads']} CPU threads, torch {env['torch']}")
    return {"experiment": exp.name, "table": markdown_table(rows, COLUMNS), "notes": notes, "stages": results}

