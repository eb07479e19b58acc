"""Run a multi-stage YAML experiment and compare its models in one table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kdq import api
from kdq.config import Experiment, Stage
from kdq.io import read_json, write_json, write_text
from kdq.report.table import human_bytes, markdown_table
from kdq.rundir import read_results

STAGE_FILE = "stage.json"
COLUMNS = (
    ("stage", "model"),
    ("arch", "architecture"),
    ("runtime", "runs on"),
    ("params", "params"),
    ("size", "size"),
    ("accuracy", "accuracy"),
    ("latency", "latency b=1 (ms)"),
    ("throughput", "throughput (img/s)"),
    ("train_time", "train time (s)"),
)


def run_experiment(exp: Experiment, out: str | Path | None = None) -> dict[str, Any]:
    """Run every stage in order into `out/<stage>`, then write and print the summary.

    A stage whose directory already holds finished results for the same configuration is
    reused, and an interrupted one resumes from its last checkpoint: rerunning the same
    command after a crash loses nothing that was finished.
    """
    root = Path(out or exp.out or Path("runs") / exp.name)
    bundle, data_record = api.resolve_data(exp.data["name"], **{k: v for k, v in exp.data.items() if k != "name"})
    results: dict[str, dict[str, Any]] = {}
    sweep_rows: list[dict[str, Any]] = []
    for stage in exp.stages:
        stage_dir = root / stage.name
        print(f"== {exp.name}: stage {stage.name} ({stage.kind} {stage.model}) -> {stage_dir}", file=sys.stderr)
        if stage.kind == "recipe":
            # lines of the report are rows by stage: two stages may run one recipe differently
            rows = [{**r, "recipe": stage.name} for r in _run_recipe(stage, bundle, data_record, stage_dir, root, results)]
            sweep_rows += rows
            several = len(stage.quant["seeds"]) > 1
            for row in rows:
                key = f"{stage.name}/{row['bits']}" + (f" seed{row['seed']}" if several else "")
                results[key] = {**read_results(row["run"]), "arch": f"{stage.model} {row['bits']}"}
        else:
            results[stage.name] = _run_stage(stage, bundle, data_record, stage_dir, root, results)
    summary = summarize(exp, results)
    text = summary["table"] + "\n\n" + "\n".join(summary["notes"]) + "\n"
    if sweep_rows:
        summary["sweep"] = _sweep_report(exp, sweep_rows, results, root)
        summary["sweep_rows"] = sweep_rows
        text += "\n" + summary["sweep"] + "\n"
    write_json(root / "summary.json", summary)
    write_text(root / "summary.md", text)
    print(text, end="")
    return summary


def _fingerprint(stage: Stage, data_record: dict[str, Any], teacher: str | None) -> dict[str, Any]:
    """What a stage's results depend on; equal fingerprints mean the finished run can be reused."""
    return {
        "kind": stage.kind, "model": stage.model, "model_args": stage.model_args, "train": stage.train.to_dict(),
        "data": data_record, "teacher": teacher, "temperature": stage.temperature, "alpha": stage.alpha,
        "teacher_mode": stage.teacher_mode, "source": stage.source, "quant": stage.quant,
    }


def _resolve_teacher(stage: Stage, root: Path, earlier: dict[str, Any]) -> str | None:
    if stage.teacher is None:
        return None
    return str(root / stage.teacher) if stage.teacher in earlier else stage.teacher


def _run_recipe(stage: Stage, bundle, data_record: dict[str, Any], stage_dir: Path, root: Path,
                earlier: dict[str, Any]) -> list[dict[str, Any]]:  # noqa: ANN001
    """A recipe stage: its finished (scheme, seed) runs are kept when the stage is unchanged."""
    from kdq.recipes import sweep

    teacher = _resolve_teacher(stage, root, earlier)
    fingerprint = _fingerprint(stage, data_record, teacher)
    same = read_json(stage_dir / STAGE_FILE) == fingerprint if (stage_dir / STAGE_FILE).exists() else False
    write_json(stage_dir / STAGE_FILE, fingerprint)
    options = {k: v for k, v in stage.quant.items() if k not in ("recipe", "seeds")}
    if teacher is not None:
        options["teacher"] = teacher
    return sweep(stage.quant["recipe"], root / stage.source, stage_dir, seeds=stage.quant["seeds"],
                 data=bundle, resume=same, **options)


def _sweep_report(exp: Experiment, rows: list[dict[str, Any]], results: dict[str, Any], root: Path) -> str:
    from kdq.recipes import write_report

    source = next(s for s in exp.stages if s.kind == "recipe").source
    return write_report(rows, root, results.get(source, {}).get("accuracy"),
                        f"{exp.name}: accuracy against bit width", f"stage {source}")


def _run_stage(stage: Stage, bundle, data_record: dict[str, Any], stage_dir: Path, root: Path,
               earlier: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    teacher = _resolve_teacher(stage, root, earlier)
    options = stage.train.to_dict()
    fingerprint = _fingerprint(stage, data_record, teacher)
    same = read_json(stage_dir / STAGE_FILE) == fingerprint if (stage_dir / STAGE_FILE).exists() else False
    finished = read_results(stage_dir)
    if same and finished:
        print(f"   reusing finished stage {stage.name} (delete {stage_dir} to retrain)", file=sys.stderr)
        return {**finished, "arch": _arch(stage)}
    write_json(stage_dir / STAGE_FILE, fingerprint)
    if stage.kind in ("quantize", "qat"):
        from kdq.lowbit_api import lowbit_qat
        from kdq.quantize_api import qat, quantize

        source = root / stage.source
        options = dict(stage.quant)
        if stage.kind == "quantize":
            results = quantize(source, stage_dir, data=bundle, **options)
        else:
            train = options.pop("train", {})
            fine_tune = lowbit_qat if "bits" in options else qat  # a qat stage with bits is low-bit
            results = fine_tune(source, stage_dir, teacher=teacher, temperature=stage.temperature, alpha=stage.alpha,
                                resume=same, data=bundle, **options, **train)
        return {**results, "arch": _arch(stage)}
    common = dict(out=stage_dir, resume=same, model_kwargs=stage.model_args, **options)
    if stage.kind == "train":
        run = api.train(stage.model, bundle, **common)
    else:
        run = api.distill(stage.model, teacher, bundle, temperature=stage.temperature, alpha=stage.alpha,
                          teacher_mode=stage.teacher_mode, **common)
    return {**run.results, "arch": _arch(stage)}


def _arch(stage: Stage) -> str:
    """The table's architecture cell: the model, with its precision when quantized."""
    if stage.kind == "quantize":
        return f"{stage.model} int8"
    if stage.kind == "qat":
        return f"{stage.model} {stage.quant.get('bits', 'int8')}"
    return stage.model


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
            "latency": f"{r['latency_ms_batch1']:.3f}",
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
        notes.append(
            f"student vs teacher: {teacher['params'] / student['params']:.1f}x fewer parameters, "
            f"{teacher['size_bytes'] / student['size_bytes']:.1f}x smaller on disk, "
            f"{teacher['latency_ms_batch1'] / student['latency_ms_batch1']:.1f}x lower batch-1 latency, "
            f"{(teacher['accuracy'] - student['accuracy']) * 100:.2f} points less accurate"
        )
    # int8 rows run on the CPU even where float rows ran on a GPU: name every processor used
    devices = dict.fromkeys(r["environment"]["device"] for r in results.values())
    env = next(iter(results.values()))["environment"]
    notes.append(f"measured on {' and '.join(devices)} with {env['threads']} CPU threads, torch {env['torch']}")
    return {"experiment": exp.name, "table": markdown_table(rows, COLUMNS), "notes": notes, "stages": results}

