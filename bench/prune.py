"""Pruning measured: accuracy against sparsity and MACs, speed in PyTorch and ONNX Runtime, the journey.

    .venv/bin/python bench/prune.py [--out runs/bench-prune] [--models resnet56,mobilenetv2-x0.35] [--seeds 0,1]
                                    [--subset 5000] [--base-epochs 8] [--epochs 2] [--write BENCHMARKS.md]

For each model and seed, a dense model is trained on a Fashion-MNIST training subset (keeping
its epoch-1 weights for weight rewinding). Then, from it, every run at equal budget (`--epochs`
of retraining each):

- unstructured (global magnitude) at each sparsity: one-shot (no retraining), fine-tuned,
  learning-rate rewinding and weight rewinding (to epoch 1);
- structured (channels removed) at each MACs reduction: fine-tuned alone, and fine-tuned with
  the unpruned model as the teacher (KD).

Then, on the first seed, the 2x-fewer-MACs KD model and the dense model are timed in one go:
PyTorch float and int8 (static PTQ), ONNX Runtime float and int8, batch-1 latency and batch-256
throughput. Last, examples/compress.yaml (teacher -> KD student -> channels with KD -> int8 QAT
-> ONNX Runtime) is run and its float teacher in PyTorch is timed against the deployed student.
Finished runs under OUT are reused, so an interrupted benchmark continues; every timing is
measured anew, in this process. The report goes to OUT/report.md (and to --write, replacing its
section).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import kdq  # noqa: E402
from kdq.engine import describe_machine, environment  # noqa: E402
from kdq.report.table import human_bytes  # noqa: E402
from kdq.rundir.layout import DEPLOYED  # noqa: E402
from kdq.stages.evaluate import evaluate_onnx_file  # noqa: E402
from markdown_section import replace_section  # noqa: E402  (bench/ is on sys.path)

SECTION = "## Pruning: accuracy, size and speed (issue 12)"
REWINDS = {"fine-tune": "none", "lr rewinding": "lr", "weight rewinding": "weights"}
# Targets from the issue: 2x fewer MACs within 0.5 points after KD fine-tuning, 1.6x ORT throughput
# from that pruning alone; the journey 30x smaller and 20x lower batch-1 latency within 1 point.
MAX_KD_LOSS, MIN_ORT_SPEEDUP = 0.5, 1.6
MIN_SMALLER, MIN_LATENCY, MAX_JOURNEY_LOSS = 30.0, 20.0, 1.0


def results(out: Path) -> dict[str, Any] | None:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def once(out: Path, make) -> dict[str, Any]:  # noqa: ANN001
    """The run in `out`, made by `make(out)` unless it finished before."""
    done = results(out)
    if done is None:
        print(f"== {out}", file=sys.stderr)
        if out.exists():  # an interrupted benchmark's unfinished run: start it again
            shutil.rmtree(out)
        make(out)
        done = results(out)
    return done


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def unstructured(base: Path, root: Path, sparsity: float, epochs: int, common: dict) -> dict[str, dict]:
    rows = {"one-shot": once(root / f"mag{sparsity}-oneshot", lambda out: kdq.prune(
        base, out, sparsity=sparsity, scope="global", epochs=0, **common))}
    for label, rewind in REWINDS.items():
        extra = {"rewind_epoch": 1} if rewind == "weights" else {}
        rows[label] = once(root / f"mag{sparsity}-{rewind}", lambda out, r=rewind, e=extra: kdq.prune(
            base, out, sparsity=sparsity, scope="global", rewind=r, epochs=epochs, **e, **common))
    return rows


def structured(base: Path, root: Path, macs: float, epochs: int, common: dict) -> dict[str, dict]:
    return {
        "fine-tune": once(root / f"ch{macs}-ft", lambda out: kdq.prune(
            base, out, method="channels", macs=macs, epochs=epochs, **common)),
        "KD fine-tune": once(root / f"ch{macs}-kd", lambda out: kdq.prune(
            base, out, method="channels", macs=macs, teacher=base, epochs=epochs, **common)),
    }


def at_target(base: Path, root: Path, round_to: int, epochs: int, common: dict) -> dict[str, Any]:
    """2x fewer MACs at widths a multiple of `round_to`, KD fine-tuned `epochs` epochs by the unpruned model."""
    return once(root / f"ch2.0-r{round_to}-kd{epochs}", lambda out: kdq.prune(
        base, out, method="channels", macs=2.0, round_to=round_to, teacher=base, epochs=epochs, **common))


def dense_control(base: Path, root: Path, epochs: int, common: dict) -> dict[str, Any]:
    """The dense model given the same extra training: nothing removed (ratio 0), KD fine-tuned `epochs` epochs."""
    return once(root / f"dense-kd{epochs}", lambda out: kdq.prune(
        base, out, method="channels", ratio=0.0, teacher=base, epochs=epochs, **common))


def rounded_table(model: str, struct: dict, roundings: list[int], dense_acc: list[float], dense0: dict,
                  epochs: int) -> list[str]:
    """The 2x-MACs target rows: against the source dense model and against it given the same extra epochs."""
    control = [r["accuracy"] for r in struct["control"]]
    lines = [f"### {model}: 2x fewer MACs, widths a multiple of N, KD fine-tuned {epochs} epochs", "",
             f"Control: the dense model KD fine-tuned the same {epochs} epochs, nothing removed: {mean_std(control)}.",
             "", "| widths | MACs kept | params kept | KD fine-tune | vs dense source (points) "
             "| vs dense control (points) |", "|---|---|---|---|---|---|"]
    for r in roundings:
        rows = struct[("rounded", r)]
        acc = [x["accuracy"] for x in rows]
        loss = (statistics.mean(acc) - statistics.mean(dense_acc)) * 100
        verdict = "met" if loss >= -MAX_KD_LOSS else "MISSED"
        lines.append(f"| x{r} | {rows[0]['macs'] / dense0['macs']:.2f} | {rows[0]['params'] / dense0['params']:.2f} "
                     f"| {mean_std(acc)} | {loss:+.2f} (target -{MAX_KD_LOSS}: {verdict}) "
                     f"| {(statistics.mean(acc) - statistics.mean(control)) * 100:+.2f} |")
    return [*lines, ""]


def timed(run: Path, work: Path) -> list[dict[str, Any]]:
    """PyTorch float and int8, ONNX Runtime float and int8 of one float run, timed now."""
    int8 = work / f"{run.name}-int8"
    if results(int8) is None:
        kdq.quantize(run, int8, overwrite=int8.exists())
    rows = [{**kdq.evaluate(run, out=work / run.name), "runtime": "PyTorch", "variant": "float"},
            {**kdq.evaluate(int8, out=work / int8.name), "runtime": "PyTorch", "variant": "int8 static PTQ"}]
    for variant, source, as_int8 in (("float", run, False), ("int8 (PTQ scales)", int8, True)):
        path = work / "onnx" / f"{run.name}-{'int8' if as_int8 else 'float'}.onnx"
        kdq.export(source, path, int8=as_int8)
        rows.append({**evaluate_onnx_file(path), "runtime": "ONNX Runtime", "variant": variant})
    return rows


def speed_table(model: str, widths: str, dense: list[dict], pruned: list[dict]) -> list[str]:
    lines = []
    for d, p in zip(dense, pruned):
        faster = p["throughput_per_s"] / d["throughput_per_s"]
        lower = d["latency_ms_batch1"] / p["latency_ms_batch1"]
        target = ""
        if d["runtime"] == "ONNX Runtime" and d["variant"] == "float":
            target = f" (target {MIN_ORT_SPEEDUP}x: {'met' if faster >= MIN_ORT_SPEEDUP else 'MISSED'})"
        lines.append(f"| {model} | {widths} | {d['runtime']} | {d['variant']} | {d['latency_ms_batch1']:.3f} / {p['latency_ms_batch1']:.3f} "
                     f"| {lower:.2f}x | {d['throughput_per_s']:.0f} / {p['throughput_per_s']:.0f} | {faster:.2f}x{target} |")
    return lines


def journey(out: Path, work: Path, timing: bool = True) -> list[str]:
    """examples/compress.yaml, then its teacher (PyTorch float) against the deployed student (ORT int8)."""
    kdq.run_experiment(kdq.load_experiment(ROOT / "examples" / "compress.yaml"), out)  # reuses finished stages
    if not timing:
        return []
    teacher = {**kdq.evaluate(out / "teacher", out=work / "journey-teacher"), "runtime": "PyTorch float"}
    student = {**evaluate_onnx_file(out / "deployed" / DEPLOYED, write=False), "runtime": "ONNX Runtime int8"}
    pruned = results(out / "pruned")
    lines = ["| model | runtime | accuracy | params | MACs | size | b=1 latency (ms) | b=256 img/s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in (("teacher", teacher), ("deployed student", student)):
        macs = r.get("macs") or (pruned or {}).get("macs")
        lines.append(f"| {name} | {r['runtime']} | {r['accuracy']:.4f} | {r.get('params', 0):,} | {macs:,} | "
                     f"{human_bytes(r['size_bytes'])} | {r['latency_ms_batch1']:.3f} | {r['throughput_per_s']:.0f} |")
    smaller = teacher["size_bytes"] / student["size_bytes"]
    lower = teacher["latency_ms_batch1"] / student["latency_ms_batch1"]
    faster = student["throughput_per_s"] / teacher["throughput_per_s"]
    lost = (teacher["accuracy"] - student["accuracy"]) * 100
    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    lines += ["", f"Deployed student against the teacher: **{smaller:.1f}x smaller** (target {MIN_SMALLER:.0f}x: "
              f"{verdict(smaller >= MIN_SMALLER)}), **{lower:.1f}x lower batch-1 latency** (target {MIN_LATENCY:.0f}x: "
              f"{verdict(lower >= MIN_LATENCY)}), {faster:.1f}x the throughput, **{lost:+.2f} points lost** "
              f"(target at most {MAX_JOURNEY_LOSS}: {verdict(lost <= MAX_JOURNEY_LOSS)}). Command: "
              f"`kdq run examples/compress.yaml --out {out}`."]
    return lines


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdq.report.plots import save_figure

    models = list(dict.fromkeys(m for m, _ in curves))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        for row, kind in enumerate(("sparsity", "macs")):
            ax = axes[row][col]
            for label, points in curves.get((model, kind), {}).items():
                xs = sorted(points)
                ms = [statistics.mean(points[x]) for x in xs]
                sd = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0 for x in xs]
                ax.errorbar(xs, ms, yerr=sd, marker="o", capsize=3, label=label)
            ax.set_xlabel("weights set to zero" if kind == "sparsity" else "times fewer MACs")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{model}: {'unstructured' if kind == 'sparsity' else 'channels removed'}")
            ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def main() -> None:  # noqa: PLR0915 - one report, top to bottom
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-prune")
    p.add_argument("--models", default="resnet56,mobilenetv2-x0.35")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--subset", type=int, default=5000)
    p.add_argument("--base-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2, help="retraining epochs of every pruned run")
    p.add_argument("--sparsities", default="0.5,0.75,0.9,0.95")
    p.add_argument("--macs", default="1.5,2,3")
    p.add_argument("--round-to", default="8,16", help="widths a multiple of these, for the 2x-MACs target rows")
    p.add_argument("--target-epochs", type=int, default=8, help="KD fine-tuning epochs of the target rows")
    p.add_argument("--no-journey", action="store_true", help="skip examples/compress.yaml")
    p.add_argument("--no-timing", action="store_true",
                   help="train and score only (for a busy machine); time later on a quiet one, reusing the runs")
    p.add_argument("--write", help="replace this report's section in this Markdown file (e.g. BENCHMARKS.md)")
    args = p.parse_args()
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    targets = [float(m) for m in args.macs.split(",")]
    roundings = [int(r) for r in args.round_to.split(",")] if args.round_to else []
    data = kdq.load_dataset("fashion-mnist", subset=args.subset)
    env = environment("cpu")
    lines = [SECTION, "", f"Command: `.venv/bin/python bench/prune.py --models {args.models} --seeds {args.seeds} "
             f"--subset {args.subset} --base-epochs {args.base_epochs} --epochs {args.epochs} --sparsities "
             f"{args.sparsities} --macs {args.macs} --round-to {args.round_to} --target-epochs {args.target_epochs}`", "",
             f"Machine: {describe_machine(env)}, {env['threads']} threads, torch {env['torch']}. Fashion-MNIST, "
             f"{args.subset} training images, the 10,000 test images; every pruned run retrains {args.epochs} "
             "epochs (one-shot: none), mean ± std over seeds.", ""]
    curves: dict = {}
    speed_lines: list[str] = []
    for model in args.models.split(","):
        unstr: dict = {}
        struct: dict = {}
        dense_acc = []
        for seed in seeds:
            root = out / model / f"s{seed}"
            common = dict(seed=seed, batch_size=128, progress=False)
            base = root / "dense"
            dense_acc.append(once(base, lambda o: kdq.train(model, data, out=o, epochs=args.base_epochs,
                                                             keep_epoch=1, **common))["accuracy"])
            for s in sparsities:
                for label, r in unstructured(base, root, s, args.epochs, common).items():
                    unstr.setdefault((s, label), []).append(r)
            for m in targets:
                for label, r in structured(base, root, m, args.epochs, common).items():
                    struct.setdefault((m, label), []).append(r)
            if roundings:
                struct.setdefault("control", []).append(dense_control(base, root, args.target_epochs, common))
            for r in roundings:
                struct.setdefault(("rounded", r), []).append(at_target(base, root, r, args.target_epochs, common))
        labels = ["one-shot", *REWINDS]
        lines += [f"### {model}: unstructured (global magnitude)", "",
                  f"Dense: {mean_std(dense_acc)}. Accuracy, and the sparse file against the dense one.", "",
                  "| sparsity | " + " | ".join(labels) + " | file size vs dense |", "|---" * (len(labels) + 2) + "|"]
        for s in sparsities:
            size = statistics.mean(r["size_bytes"] for r in unstr[(s, "one-shot")])
            dense_size = statistics.mean(results(out / model / f"s{seed}" / "dense")["size_bytes"] for seed in seeds)
            lines.append(f"| {s:.0%} | " + " | ".join(mean_std([r["accuracy"] for r in unstr[(s, k)]]) for k in labels)
                         + f" | {dense_size / size:.1f}x smaller |")
            for k in labels:
                curves.setdefault((model, "sparsity"), {}).setdefault(k, {})[s] = [r["accuracy"] for r in unstr[(s, k)]]
        lines += ["", f"### {model}: channels removed (L2 filter norm, per layer)", "",
                  "| target | MACs kept | params kept | fine-tune | KD fine-tune (unpruned teacher) | KD vs dense (points) |",
                  "|---|---|---|---|---|---|"]
        dense0 = results(out / model / f"s{seeds[0]}" / "dense")
        for m in targets:
            kd = [r["accuracy"] for r in struct[(m, "KD fine-tune")]]
            loss = (statistics.mean(kd) - statistics.mean(dense_acc)) * 100
            r0 = struct[(m, "fine-tune")][0]
            note = f" (target -{MAX_KD_LOSS}: {'met' if loss >= -MAX_KD_LOSS else 'MISSED'})" if m == 2 else ""
            lines.append(f"| {m:g}x fewer MACs | {r0['macs'] / dense0['macs']:.2f} | {r0['params'] / dense0['params']:.2f} "
                         f"| {mean_std([r['accuracy'] for r in struct[(m, 'fine-tune')]])} | {mean_std(kd)} | {loss:+.2f}{note} |")
            for k in ("fine-tune", "KD fine-tune"):
                curves.setdefault((model, "macs"), {}).setdefault(k, {})[m] = [r["accuracy"] for r in struct[(m, k)]]
        lines.append("")
        if roundings:
            lines += rounded_table(model, struct, roundings, dense_acc, dense0, args.target_epochs)
        if 2.0 in targets and not args.no_timing:
            work = out / "timing"
            first = out / model / f"s{seeds[0]}"
            dense_rows = timed(first / "dense", work)
            speed_lines += speed_table(model, "exact", dense_rows, timed(first / "ch2.0-kd", work))
            for r in roundings:
                speed_lines += speed_table(model, f"x{r}", dense_rows,
                                           timed(first / f"ch2.0-r{r}-kd{args.target_epochs}", work))
    if speed_lines:
        lines += ["### Speed: the 2x-fewer-MACs models against the dense one, measured in one run", "",
                  "Widths: exact (whatever the MACs target gave) or kept a multiple of 8 or 16 (`--round-to`).", "",
                  "| model | widths | runtime | variant | b=1 latency ms (dense / pruned) | lower by "
                  "| b=256 img/s (dense / pruned) | faster |", "|---|---|---|---|---|---|---|---|", *speed_lines, "",
                  "Unstructured sparsity runs on the same dense kernels: no faster (`bench/sparse.py` times it).", ""]
    if not args.no_journey:
        lines += ["### The journey: examples/compress.yaml", "", *journey(out / "journey", out / "timing", not args.no_timing), ""]
    report = "\n".join(lines)
    plot(curves, out / "prune.png", f"Fashion-MNIST subset {args.subset}, seeds {args.seeds}")
    (out / "report.md").write_text(report)
    print(report)
    if args.write:
        replace_section(Path(args.write), SECTION, report)


if __name__ == "__main__":
    main()
