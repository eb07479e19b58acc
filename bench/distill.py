"""Every distillation method at equal budget over seeds: is its gain larger than the spread?

    .venv/bin/python bench/distill.py [--seeds 0,1,2] [--students resnet20,cnn-small] [--out runs/bench-distill]
                                      [--methods kd,dkd,...] [--write BENCHMARKS.md]

A teacher (default resnet56) is trained once on a Fashion-MNIST training subset; then, for each
student and seed, the student alone and the student distilled with each method, every run with
the same epochs, batch size and learning rate. Each run is its own run directory under OUT
(finished runs are reused, so an interrupted benchmark continues). The report gives, per
method, test accuracy mean ± std over seeds, the gain over the student alone and over KD (per
seed, then mean ± std), whether that gain exceeds the seed spread (|mean| larger than the 95%
t-interval half-width of the per-seed gains), and the training time per image relative to
online KD, from a timing pass run at the end in one process (--timing-rows images, two epochs
per variant): finished runs reused from another session, or trained beside other work, carry
timings that cannot be compared, so the runs' own timings are not used. A plot of the gains with error bars is
written to OUT/gains.png.

Two experiments get their own rows. Teacher assistants (--takd resnet20,resnet8): the last
model alone, distilled straight from the teacher (kd) and through the assistants with
`kdq takd-size` (takd). Unlabeled data (--labeled 1000): the first student trained on the
N labeled images alone (as many optimizer steps as the others get) against KD that keeps
N labels and lets the teacher teach the rest (`--labeled N`). FitNets' two-stage schedule
is the row fitnet-hints (hints alone for the first epoch, then KD).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import kdq  # noqa: E402
from kdq.data import Split  # noqa: E402
from kdq.distill.objective import labeled_mask  # noqa: E402
from kdq.engine import describe_machine, environment  # noqa: E402
from kdq.stages.takd_size import takd_size  # noqa: E402

SECTION = "## Distillation methods side by side (issue 11)"
METHODS = ("kd", "dkd", "dist", "fitnet", "at", "sp", "rkd", "pkt", "crd")
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}  # two-sided 95% t quantiles by degrees of freedom


def _done(out: Path) -> dict | None:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def _image_seconds(out: Path) -> float:
    """Median over epochs of the training seconds per image, from metrics.jsonl: comparable
    between runs whose epochs hold different numbers of images."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(1 / r["images_per_s"] for r in rows)


def run(out: Path, kind: str, result: str = "", **kwargs) -> dict:  # noqa: ANN003
    """Train (or reuse) one run directory; `result` names the run inside a chain's folder."""
    done = _done(out / result)
    if done is None:
        print(f"== {out}", file=sys.stderr)
        entry = {"train": kdq.train, "distill": kdq.distill, "takd-size": takd_size}[kind]
        entry(out=out, overwrite=out.exists(), **kwargs)
        done = _done(out / result)
    return {"accuracy": done["accuracy"], "epoch": _image_seconds(out / result), "environment": done["environment"]}


def time_methods(data: kdq.DataBundle, student: str, teacher: Path, methods: list[str], rows: int) -> dict[str, float]:
    """Training seconds per image of each variant, timed now, one after the other in this process:
    two epochs over the first `rows` training images, the second epoch's rate (the first pays for
    start-up). Runs resumed from earlier sessions, or trained beside other work, carry timings
    that cannot be compared; these can."""
    small = dataclasses.replace(data, train=Split(data.train.x[:rows], data.train.y[:rows]))
    common = dict(data=small, epochs=2, batch_size=128, progress=False, seed=0)
    variants = {"alone": lambda: kdq.train(student, **common)}
    for method in methods:
        variants[method] = lambda m=method: kdq.distill(student, teacher, method=m, **common)
    variants["kd-cached"] = lambda: kdq.distill(student, teacher, teacher_mode="cached", **common)
    seconds = {}
    for name, make in variants.items():
        print(f"== timing {student} {name}", file=sys.stderr)
        seconds[name] = 1 / make().fit.history[-1]["images_per_s"]
    return seconds


def labeled_only(data: kdq.DataBundle, count: int, seed: int) -> kdq.DataBundle:
    """The same data with only the `count` training rows `--labeled count --seed seed` keeps."""
    mask = labeled_mask(data.train.y, count, data.num_classes, seed)
    return dataclasses.replace(data, train=Split(data.train.x[mask], data.train.y[mask]),
                               options={**data.options, "labeled_only": count, "labeled_seed": seed})


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(gains: list[float]) -> str:
    m, sd = mean_std(gains)
    half = T95.get(len(gains) - 1, 2.0) * sd / len(gains) ** 0.5 if len(gains) > 1 else float("inf")
    return "yes" if abs(m) > half else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-distill")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--students", default="resnet20,cnn-small")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--takd", default="resnet20,resnet8",
                        help="assistants then the student of the teacher-assistant rows ('' to skip)")
    parser.add_argument("--labeled", type=int, default=1000,
                        help="labels kept in the unlabeled-data rows, for the first student (0 to skip)")
    parser.add_argument("--timing-rows", type=int, default=2000,
                        help="training images of the timing pass (0: time per image from the runs themselves)")
    parser.add_argument("--write", help="append the report to this Markdown file (e.g. BENCHMARKS.md)")
    args = parser.parse_args()
    out = Path(args.out)
    data = kdq.load_dataset(args.data, subset=args.subset)
    common = {"batch_size": 128, "progress": False}
    teacher = out / "teacher"
    run(teacher, "train", model=args.teacher, data=data, epochs=args.teacher_epochs, seed=0, **common)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    table: dict[tuple[str, str], list[dict]] = {}
    for student in args.students.split(","):
        for seed in seeds:
            base = dict(data=data, epochs=args.epochs, seed=seed, **common)
            table.setdefault((student, "alone"), []).append(
                run(out / student / f"alone-s{seed}", "train", model=student, **base))
            for method in methods:
                table.setdefault((student, method), []).append(
                    run(out / student / f"{method}-s{seed}", "distill", student=student, teacher=teacher, method=method, **base))
            table.setdefault((student, "kd-cached"), []).append(
                run(out / student / f"kd-cached-s{seed}", "distill", student=student, teacher=teacher,
                    teacher_mode="cached", **base))
            if "fitnet" in methods:
                table.setdefault((student, "fitnet-hints"), []).append(
                    run(out / student / f"fitnet-hints-s{seed}", "distill", student=student, teacher=teacher,
                        method={"fitnet": 100, "kd": 1}, hint_epochs=1, **base))
    first = args.students.split(",")[0]
    for seed in seeds if args.labeled else []:
        base = dict(epochs=args.epochs, seed=seed, **common)
        who = f"{first}, {args.labeled} labeled"
        folder = out / f"{first}-labeled{args.labeled}"
        steps_scale = round(len(data.train) / args.labeled)  # as many optimizer steps as the full-data runs
        table.setdefault((who, "alone"), []).append(
            run(folder / f"alone-s{seed}", "train", model=first, data=labeled_only(data, args.labeled, seed),
                **{**base, "epochs": args.epochs * steps_scale}))
        table.setdefault((who, "kd"), []).append(
            run(folder / f"kd-s{seed}", "distill", student=first, teacher=teacher, data=data, labeled=args.labeled,
                **base))
    chain = [m for m in args.takd.split(",") if m]
    for seed in seeds if chain else []:
        base = dict(data=data, epochs=args.epochs, seed=seed, **common)
        who = f"{chain[-1]} (assistants {', '.join(chain[:-1])})"
        folder = out / f"takd-{'-'.join(chain)}"
        table.setdefault((who, "alone"), []).append(run(folder / f"alone-s{seed}", "train", model=chain[-1], **base))
        table.setdefault((who, "kd"), []).append(
            run(folder / f"kd-s{seed}", "distill", student=chain[-1], teacher=teacher, **base))
        table.setdefault((who, "takd"), []).append(
            run(folder / f"takd-s{seed}", "takd-size", result=f"{len(chain)}-{chain[-1]}", models=chain,
                teacher=teacher, **base))
    timing = {student: time_methods(data, student, teacher, methods, args.timing_rows)
              for student in args.students.split(",")} if args.timing_rows else {}
    text = report(table, seeds, args, _done(teacher), timing)
    (out / "report.md").write_text(text)
    plot(table, out / "gains.png", args)
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text)


def report(table: dict, seeds: list[int], args: argparse.Namespace, teacher: dict, timing: dict) -> str:
    env = environment("cpu") if timing else teacher["environment"]
    lines = [SECTION, "",
             f"Command: `.venv/bin/python bench/distill.py --subset {args.subset} --teacher {args.teacher} "
             f"--teacher-epochs {args.teacher_epochs} --students {args.students} --epochs {args.epochs} "
             f"--seeds {args.seeds} --takd '{args.takd}' --labeled {args.labeled} --timing-rows {args.timing_rows}`", "",
             f"Machine: {describe_machine(env)}, {env['threads']} threads, torch {env['torch']}. "
             f"Teacher {args.teacher}: test accuracy {teacher['accuracy']:.4f}.", "",
             "| student | method | accuracy (mean ± std) | gain over alone (points) | exceeds spread | "
             "gain over KD (points) | exceeds spread | time per image / online KD |",
             "|---|---|---|---|---|---|---|---|"]
    for student in dict.fromkeys(who for who, _ in table):
        alone = [r["accuracy"] for r in table[(student, "alone")]]
        kd = [r["accuracy"] for r in table[(student, "kd")]] if (student, "kd") in table else None
        kd_epoch = statistics.median(r["epoch"] for r in table.get((student, "kd"), [{"epoch": float("nan")}]))
        timed = timing.get(student)
        for (who, method), rows in table.items():
            if who != student:
                continue
            acc = [r["accuracy"] for r in rows]
            m, sd = mean_std(acc)
            over_alone = [(a - b) * 100 for a, b in zip(acc, alone)]
            over_kd = [(a - b) * 100 for a, b in zip(acc, kd)] if kd else []
            ga = mean_std(over_alone)
            gk = mean_std(over_kd) if over_kd else None
            epoch = statistics.median(r["epoch"] for r in rows) / kd_epoch
            if timing:  # the timing pass's figures, measured together; none for the other rows
                epoch = timed[method] / timed["kd"] if timed and method in timed else float("nan")
            lines.append(f"| {student} | {method} | {m:.4f} ± {sd:.4f} | "
                         + (f"{ga[0]:+.2f} ± {ga[1]:.2f} | {verdict(over_alone)} | " if method != "alone" else "- | - | ")
                         + (f"{gk[0]:+.2f} ± {gk[1]:.2f} | {verdict(over_kd)} | " if gk and method not in ("alone", "kd") else "- | - | ")
                         + (f"{epoch:.2f}x |" if epoch == epoch else "- |"))
    lines += ["", "A gain exceeds the spread when its mean over seeds lies outside the 95% t-interval "
              "half-width of the per-seed gains (paired by seed)."]
    if timing:
        lines += ["", f"Time per image: a timing pass after the runs, in one process on the machine above: each "
                  f"variant trains 2 epochs on {args.timing_rows} images, one after the other, and the second "
                  "epoch's rate is compared with online KD's (cached KD's teacher pass happens before its "
                  "epochs and is not counted)."]
    machines = sorted({describe_machine(r["environment"]) for rows in table.values() for r in rows})
    if len(machines) > 1 and not timing:  # a benchmark resumed in another session may have run on another CPU
        lines += ["", f"**Warning:** these runs were measured on {len(machines)} machines ({'; '.join(machines)}): "
                  "the time ratios mix them and are not comparable; rerun in one session for timings."]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdq.report.plots import save_figure

    students = list(dict.fromkeys(who for who, _ in table))
    cols = min(2, len(students))
    rows = -(-len(students) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(students):]:
        ax.set_visible(False)
    for ax, student in zip(axes.flat, students):
        alone = [r["accuracy"] for r in table[(student, "alone")]]
        names = [m for (s, m) in table if s == student and m != "alone"]
        gains = [mean_std([(r["accuracy"] - b) * 100 for r, b in zip(table[(student, m)], alone)]) for m in names]
        ax.bar(names, [g[0] for g in gains], yerr=[g[1] for g in gains], capsize=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{student}: gain over the student alone")
        ax.set_ylabel("test accuracy gain (points)")
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{args.data} subset {args.subset}, teacher {args.teacher}, {args.epochs} epochs, seeds {args.seeds}")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
