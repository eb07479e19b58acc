"""Int8 students in PyTorch and ONNX Runtime: accuracy, size and speed against float, with targets.

    .venv/bin/python bench/int8.py [--out runs/seed004] [--extra-students resnet20] [--write BENCHMARKS.md]

1. Runs seed 004's experiment (examples/seed004.yaml: teacher, baseline, KD MobileNetV2 student,
   static PTQ, QAT + KD) plus the same KD, PTQ and QAT recipe for each extra student, and
   dynamic quantization of every student. Finished stages in --out are reused, so after
   `kdq run examples/seed004.yaml --out runs/seed004` only the extra stages are trained.
2. Exports each student to ONNX four ways: float; int8 calibrated by ONNX Runtime; and the
   PTQ and QAT int8 models with their own scales.
3. Evaluates every model on the whole test set and times it in this one process, on the CPU,
   with the same thread count for both runtimes: median batch-1 latency, batch-256 throughput.
4. Prints the tables, with issue 3's targets checked, and appends them to --write.

Targets, each against the float student in the same runtime: static PTQ loses at most 0.5
accuracy points and QAT + KD at most 0.3; int8 is at least 3.5x smaller on disk and at least
2x the float throughput at batch 256.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ROOT = Path(__file__).resolve().parents[1]
MAX_PTQ_LOSS, MAX_QAT_LOSS, MIN_SIZE_RATIO, MIN_SPEEDUP = 0.5, 0.3, 3.5, 2.0


def add_students(raw: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """The experiment with the student's recipe repeated for each `extra` model, and dynamic PTQ for all."""
    raw = copy.deepcopy(raw)
    stages = raw["stages"]
    student = raw["compare"]["student"]
    derived = {name: body for name, body in stages.items() if body.get("source") == student}
    if not any(body.get("method") == "dynamic" for body in derived.values()):
        derived[f"{student}-dyn"] = {"kind": "quantize", "source": student, "method": "dynamic"}
        stages[f"{student}-dyn"] = derived[f"{student}-dyn"]
    for model in extra:
        stages[f"{model}-{student}"] = {**stages[student], "model": model}
        for name, body in derived.items():
            stages[f"{model}-{name}"] = {**body, "source": f"{model}-{student}"}
    return raw


def variants(exp, student: str) -> dict[str, str]:  # noqa: ANN001
    """Stage names of a student's float, dynamic, static and QAT models."""
    found = {"float": student}
    for stage in exp.stages:
        if stage.source != student:
            continue
        if stage.kind == "qat":
            found["qat"] = stage.name
        else:
            found["dynamic" if stage.quant.get("method") == "dynamic" else "static"] = stage.name
    return found


def measure_student(root: Path, names: dict[str, str], work: Path) -> list[dict[str, Any]]:
    import kdq

    rows = []
    labels = {"float": "float", "dynamic": "dynamic PTQ (Linear)", "static": "static PTQ", "qat": "QAT + KD"}
    for kind in ("float", "dynamic", "static", "qat"):
        if kind in names:
            r = kdq.evaluate(root / names[kind], out=work / names[kind])
            rows.append({**r, "runtime": "PyTorch", "variant": labels[kind], "kind": kind})
    onnx_dir = work / "onnx"
    exports = [("float", "float", root / names["float"], False),
               ("int8, ORT calibration", "static", root / names["float"], True)]
    exports += [(f"int8, {labels[k]} scales", k, root / names[k], True) for k in ("static", "qat") if k in names]
    for label, kind, source, int8 in exports:
        path = onnx_dir / f"{names['float']}-{label.replace(' ', '').replace(',', '-')}.onnx"
        kdq.export(source, path, int8=int8)
        r = kdq.stages.evaluate.evaluate_onnx_file(path)
        rows.append({**r, "runtime": "ONNX Runtime", "variant": label, "kind": kind, "params": rows[0]["params"]})
    return rows


def _check(ok: bool) -> str:
    return "met" if ok else "MISSED"


def judge(rows: list[dict[str, Any]]) -> None:
    """Compare each row to the float row of its runtime; mark the targets that apply."""
    base = {r["runtime"]: r for r in rows if r["kind"] == "float"}
    for r in rows:
        b = base[r["runtime"]]
        r["delta"] = (r["accuracy"] - b["accuracy"]) * 100
        r["smaller"] = b["size_bytes"] / r["size_bytes"]
        r["faster"] = r["throughput_per_s"] / b["throughput_per_s"]
        checks = []
        if r["kind"] in ("static", "qat"):
            limit = MAX_PTQ_LOSS if r["kind"] == "static" else MAX_QAT_LOSS
            checks.append(f"accuracy {_check(r['delta'] >= -limit)}")
        if r["kind"] != "float":
            if r["kind"] != "dynamic":  # dynamic PTQ quantizes only Linear layers: no size target
                checks.append(f"size {_check(r['smaller'] >= MIN_SIZE_RATIO)}")
            checks.append(f"speed {_check(r['faster'] >= MIN_SPEEDUP)}")
        r["targets"] = ", ".join(checks)


def fmt_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    from kdq.report.table import human_bytes

    return [{
        "student": r["student"], "runtime": r["runtime"], "variant": r["variant"],
        "accuracy": f"{r['accuracy']:.4f}", "delta": f"{r['delta']:+.2f}", "size": human_bytes(r["size_bytes"]),
        "smaller": f"{r['smaller']:.2f}x", "latency": f"{r['latency_ms_batch1']:.3f}",
        "throughput": f"{r['throughput_per_s']:.0f}", "faster": f"{r['faster']:.2f}x", "targets": r["targets"],
    } for r in rows]


COLUMNS = (("student", "student"), ("runtime", "runtime"), ("variant", "model"), ("accuracy", "accuracy"),
           ("delta", "vs float (pts)"), ("size", "size"), ("smaller", "smaller"), ("latency", "b=1 latency (ms)"),
           ("throughput", "b=256 img/s"), ("faster", "faster"), ("targets", "targets"))
JOURNEY = (("model", "model"), ("runtime", "runtime"), ("accuracy", "accuracy"), ("params", "params"),
           ("size", "size"), ("compression", "compression"), ("latency", "b=1 latency (ms)"),
           ("lat_gain", "latency gain"), ("throughput", "b=256 img/s"), ("tp_gain", "throughput gain"))


def journey(teacher: dict[str, Any], students: dict[str, list[dict[str, Any]]]) -> list[dict[str, str]]:
    """The float teacher in PyTorch against each student, float in PyTorch and int8 (QAT) in ONNX Runtime."""
    from kdq.report.table import human_bytes

    picked = [("teacher (float)", teacher)]
    for name, rows in students.items():
        for r in rows:
            if (r["runtime"], r["kind"]) in (("PyTorch", "float"), ("ONNX Runtime", "qat")):
                picked.append((f"{name} ({'float' if r['kind'] == 'float' else 'int8 QAT + KD'})", r))
    return [{
        "model": label, "runtime": r["runtime"], "accuracy": f"{r['accuracy']:.4f}", "params": f"{r['params']:,}",
        "size": human_bytes(r["size_bytes"]), "compression": f"{teacher['size_bytes'] / r['size_bytes']:.1f}x",
        "latency": f"{r['latency_ms_batch1']:.3f}", "lat_gain": f"{teacher['latency_ms_batch1'] / r['latency_ms_batch1']:.1f}x",
        "throughput": f"{r['throughput_per_s']:.0f}", "tp_gain": f"{r['throughput_per_s'] / teacher['throughput_per_s']:.1f}x",
    } for label, r in picked]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default=str(ROOT / "examples" / "seed004.yaml"))
    p.add_argument("--out", default="runs/seed004", help="experiment directory; finished stages there are reused")
    p.add_argument("--extra-students", default="resnet20", help="comma-separated models given the student's recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="experiment override, as for `kdq run`")
    p.add_argument("--write", help="append the report to this Markdown file")
    args = p.parse_args()
    # int8 kernels are CPU kernels: train, evaluate and time everything on the CPU, so every
    # row of the table comes from the same processor
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import yaml

    import kdq
    from kdq.config import apply_override, parse_experiment
    from kdq.engine import describe_machine, environment
    from kdq.experiment import run_experiment
    from kdq.report.table import markdown_table

    raw = yaml.safe_load(Path(args.experiment).read_text())
    for item in args.set:
        apply_override(raw, item)
    extra = [m for m in args.extra_students.split(",") if m]
    exp = parse_experiment(add_students(raw, extra), default_name=Path(args.experiment).stem)
    root, work = Path(args.out), Path(args.out) / "bench-int8"
    start = time.perf_counter()
    run_experiment(exp, root)
    trained_s = time.perf_counter() - start

    student = exp.compare["student"]
    students = {s: next(x.model for x in exp.stages if x.name == s) for s in [student, *(f"{m}-{student}" for m in extra)]}
    per_student: dict[str, list[dict[str, Any]]] = {}
    for stage, model in students.items():
        rows = measure_student(root, variants(exp, stage), work)
        for r in rows:
            r["student"] = model
        judge(rows)
        per_student[model] = rows
    teacher = kdq.evaluate(root / exp.compare["teacher"], out=work / exp.compare["teacher"])
    teacher["runtime"] = "PyTorch"
    env = environment("cpu")
    cmd = "python bench/int8.py " + " ".join(sys.argv[1:])
    teacher_model = next(x.model for x in exp.stages if x.name == exp.compare["teacher"])
    report = "\n".join([
        f"### Int8 students on {exp.data['name']} (teacher {teacher_model}; students {', '.join(per_student)})",
        "",
        f"Command: `{cmd}` (training and export included: {trained_s / 60:.0f} min of training, "
        f"{(time.perf_counter() - start - trained_s) / 60:.0f} min of export and measurement)  ",
        f"Machine: {describe_machine(env)}, {env['cpu_count']} cores, {env['threads']} threads for both runtimes, "
        f"torch {env['torch']}; accuracy on all {sum(map(sum, teacher['confusion_matrix']))} test images",
        "",
        "Each row against the float student in the same runtime:",
        "",
        markdown_table(fmt_rows([r for rows in per_student.values() for r in rows]), COLUMNS),
        "",
        "The journey: float teacher in PyTorch against each student (compression and gains vs the teacher):",
        "",
        markdown_table(journey(teacher, per_student), JOURNEY),
        "",
    ])
    print(report)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
