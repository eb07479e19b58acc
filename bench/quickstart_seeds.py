"""The quickstart over several seeds: is the KD gain larger than the seed-to-seed spread?

    .venv/bin/python bench/quickstart_seeds.py [--seeds 0,1,2] [--out runs/quickstart-seeds] [--write BENCHMARKS.md]

Each seed runs `kdq run examples/quickstart.yaml --set train.seed=K` in its own process (the
seed sets every stage's initial weights, shuffling and augmentation), into OUT/seedK; finished
seeds are reused. The report gives each model's test accuracy and the KD gain (kd minus
baseline) as mean ± sample standard deviation, the gain of every seed, and whether the mean
gain exceeds the spread of the baseline over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kdq.engine import describe_machine, environment  # noqa: E402
from markdown_section import replace_section  # noqa: E402  (bench/ is on sys.path)

SECTION = "## Quickstart over seeds (issue 9)"


def run_seed(seed: int, out: Path, experiment: Path) -> dict:
    """One quickstart in a fresh process; its summary.json's per-stage results."""
    cmd = [sys.executable, "-m", "kdq.cli", "run", str(experiment), "--set", f"train.seed={seed}", "--out", str(out)]
    print("$", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "summary.json").read_text())["stages"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(per_seed: dict[int, dict], command: str) -> str:
    seeds = sorted(per_seed)
    acc = {stage: [per_seed[s][stage]["accuracy"] for s in seeds] for stage in ("teacher", "baseline", "kd")}
    gains = [(k - b) * 100 for k, b in zip(acc["kd"], acc["baseline"])]
    gain_mean, gain_std = mean_std(gains)
    base_std = mean_std(acc["baseline"])[1] * 100
    env = next(iter(per_seed.values()))["teacher"]["environment"]
    lines = [SECTION, "", f"Command: `{command}`", "",
             f"Machine: {describe_machine(env)}, "
             f"{env['threads']} threads, torch {env['torch']}.", "",
             "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|" + "---|" * len(seeds) + "---|"]
    for stage, values in acc.items():
        m, sd = mean_std(values)
        lines.append(f"| {stage} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {m:.4f} ± {sd:.4f} |")
    lines.append("| KD gain (points) | " + " | ".join(f"{g:+.2f}" for g in gains) + f" | {gain_mean:+.2f} ± {gain_std:.2f} |")
    verdict = "exceeds" if abs(gain_mean) > max(gain_std, base_std) else "does not exceed"
    lines += ["", f"The mean KD gain, {gain_mean:+.2f} points, {verdict} the seed spread "
              f"(std of the gain {gain_std:.2f}, std of the baseline {base_std:.2f} points) over {len(seeds)} seeds."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/quickstart-seeds")
    parser.add_argument("--experiment", default=str(ROOT / "examples" / "quickstart.yaml"))
    parser.add_argument("--write", help="replace this section of a Markdown file (e.g. BENCHMARKS.md)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {s: run_seed(s, Path(args.out) / f"seed{s}", Path(args.experiment)) for s in seeds}
    command = f"python bench/quickstart_seeds.py --seeds {args.seeds} --out {args.out}"
    text = report(per_seed, command)
    print(text)
    if args.write:
        replace_section(Path(args.write), SECTION, text)
    print(f"environment: {environment()}", file=sys.stderr)


if __name__ == "__main__":
    main()
