"""Low-bit recipes compared: accuracy against bit width over seeds, packed size, issue 4's goals.

    .venv/bin/python bench/lowbit.py [--out runs/lowbit] [--write BENCHMARKS.md] [KEY=VALUE ...]

1. Runs bench/lowbit.yaml with `kdq run`'s machinery: a float ResNet-20 on 10,000 Fashion-MNIST
   training images, then individual, apprentice and takd-chain at w16a16/w8a8/w4a4/w2a2/w1a2 and
   qkd and speq at w4a4 and w2a2, for seeds 0 and 1. Finished runs in --out are reused, so an
   interrupted benchmark continues where it stopped. KEY=VALUE overrides the YAML (e.g.
   `data.subset=2000 float.epochs=1` for a quick look).
2. Compares the quantizers (dorefa, pact, uniform, ternary, binary against lsq) with the
   apprentice recipe, seed 0, from the same float model, into --out/quantizers.
3. Runs apprentice again at w2a2 and w1a2 with --long-epochs (3) epochs, seed 0: what a
   longer budget buys where one epoch falls short.
4. Prints the sweep table (mean ± sample std over seeds, all 10,000 test images), the packed
   sizes against k/32 of the float size + 10%, the goals checked, and the chain against direct
   distillation; --write replaces the "## Low-bit" section of that Markdown file with them.

Goals (issue 4), each in accuracy points below the float model: w8a8 at most 0.3, w4a4 at most
1, w2a2 at most 4; the 1-bit-weight network at least 50% (five times chance on 10 classes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from markdown_section import replace_section  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"w8a8": 0.3, "w4a4": 1.0, "w2a2": 4.0}  # most accuracy points lost against float
ONE_BIT_FLOOR = 0.5
LONG_SCHEMES = ["w2a2", "w1a2"]
# the quantizer comparison: pact means PACT activations with DoReFa weights; binary and ternary
# fix the weight width and keep LSQ activations
QUANTIZERS = {"dorefa": ["w4a4", "w2a2"], "pact": ["w4a4", "w2a2"], "uniform": ["w4a4", "w2a2"],
              "ternary": ["w2a2"], "binary": ["w1a2"]}
SECTION = "## Low-bit"


def goal_rows(summary: list[dict[str, Any]], reference: float) -> list[dict[str, str]]:
    rows = []
    for s in summary:
        delta = (s["mean"] - reference) * 100
        if s["bits"] in GOALS:
            limit = GOALS[s["bits"]]
            goal, met = f"Δ ≥ -{limit:g}", delta >= -limit
        elif s["weight_bits"] == 1:
            goal, met = f"≥ {ONE_BIT_FLOOR:.2f}", s["mean"] >= ONE_BIT_FLOOR
        else:
            continue
        rows.append({"recipe": s["recipe"], "bits": s["bits"], "accuracy": f"{s['mean']:.4f} ± {s['std']:.4f}",
                     "delta": f"{delta:+.2f}", "goal": goal, "result": "met" if met else "MISSED"})
    return rows


def chain_vs_direct(summary: list[dict[str, Any]]) -> list[dict[str, str]]:
    """takd-chain minus apprentice per scheme, with the seeds' spread beside it."""
    by = {(s["recipe"], s["bits"]): s for s in summary}
    rows = []
    for (recipe, bits), chain in by.items():
        direct = by.get(("apprentice", bits))
        if recipe != "takd-chain" or direct is None:
            continue
        alone = by.get(("individual", bits))
        rows.append({
            "bits": bits,
            "chain": f"{chain['mean']:.4f}", "direct": f"{direct['mean']:.4f}",
            "alone": f"{alone['mean']:.4f}" if alone else "-",
            "diff": f"{(chain['mean'] - direct['mean']) * 100:+.2f}",
            "spread": f"{max(chain['std'], direct['std']) * 100:.2f}",
        })
    return rows


def quantizer_rows(sweep_rows: list[dict[str, Any]], float_dir: Path, out: Path) -> list[dict[str, Any]]:
    """Apprentice (seed 0, one epoch) with each quantizer; lsq's rows come from the main sweep."""
    from kdq.recipes import sweep

    rows = [{**r, "recipe": "lsq"} for r in sweep_rows
            if r["recipe"] == "apprentice" and r["seed"] == 0 and r["bits"] in ("w4a4", "w2a2", "w1a2")]
    for quantizer, schemes in QUANTIZERS.items():
        found = sweep("apprentice", float_dir, out / quantizer, bits=schemes, seeds=[0], quantizer=quantizer,
                      resume=True, epochs=1, batch_size=128)
        rows += [{**r, "recipe": quantizer} for r in found]
    return rows


def size_breakdown(sweep_rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Per scheme, from one run: the packed weights (codes, scales, zero points) against k/32 of
    those weights in float32 (each layer at its own width: the 8-bit edges at 8), and the rest
    of packed.safetensors (batch norm, activation steps, biases, the header)."""
    import json
    import struct

    from kdq.report.table import human_bytes

    rows, seen = [], set()
    for r in sweep_rows:
        scheme = r["bits"]
        if scheme in seen:
            continue
        seen.add(scheme)
        run = Path(r["run"])
        path = run / "packed.safetensors"
        raw = path.read_bytes()
        header = json.loads(raw[8: 8 + struct.unpack("<Q", raw[:8])[0]])
        weights = json.loads((run / "packed.json").read_text())["weights"]
        packed = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if "::" in k)
        floats = sum(4 * _numel(e["shape"]) for e in weights.values())
        bound = sum(4 * _numel(e["shape"]) * e["bits"] / 32 for e in weights.values())
        rows.append({"bits": scheme, "weights": human_bytes(packed), "float": human_bytes(floats),
                     "ratio": f"{packed / bound:.3f}x", "met": "met" if packed <= 1.1 * bound else "missed",
                     "rest": human_bytes(len(raw) - packed), "file": human_bytes(len(raw))})
    return rows


def _numel(shape: list[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/lowbit")
    p.add_argument("--config", default=str(ROOT / "bench" / "lowbit.yaml"))
    p.add_argument("--write", help="replace the '## Low-bit' section of this Markdown file with the report")
    p.add_argument("--long-epochs", type=int, default=3, help="also run apprentice at w2a2 and w1a2 this long (0: skip)")
    p.add_argument("--no-quantizers", action="store_true", help="skip the comparison of quantizers")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the experiment, as for `kdq run`")
    args = p.parse_args()

    from kdq.config import load_experiment
    from kdq.engine import describe_machine, environment
    from kdq.experiment import run_experiment
    from kdq.report.sweep import summarize_sweep
    from kdq.report.table import markdown_table

    exp = load_experiment(args.config, args.overrides)
    start = time.perf_counter()
    result = run_experiment(exp, args.out)
    wall = time.perf_counter() - start
    stages = result["stages"]
    reference = stages["float"]["accuracy"]
    rows = result["sweep_rows"]
    summary = summarize_sweep(rows)
    train_time = statistics.fmean([r.get("train_time_s", 0) for k, r in stages.items() if "/" in k])
    env = environment("cpu")
    seeds = sorted({r["seed"] for r in rows})
    cmd = "python bench/lowbit.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        f"{SECTION}: recipes compared at 16, 8, 4, 2 and 1 bit (issue 4)",
        "",
        f"Command: `{cmd}` ({wall / 60:.0f} min this invocation; finished runs in --out are reused)  ",
        f"Machine: {describe_machine(env)}, {env['threads']} torch threads, torch {env['torch']}",
        "",
        f"Float ResNet-20 (stage `float`, {stages['float'].get('best_epoch', '?')} of {exp.stages[0].train.epochs} epochs best): "
        f"**{reference:.4f}** on all {sum(sum(r) for r in stages['float']['confusion_matrix'])} test images, "
        f"{stages['float']['size_bytes'] / 1024:.1f} KB float32. Training data: {exp.data.get('subset', 'all')} images. "
        f"Seeds {', '.join(map(str, seeds))}: each seed retrains every low-bit run (the float model is shared). "
        f"Every low-bit run: LSQ weights (per channel) and activations, first conv and classifier at 8 bits, "
        f"one epoch from the float weights at lr 0.01 (cosine); qkd: one epoch per phase (3 in all). "
        f"Mean training time per run: {train_time:.0f} s. \"16-bit\" is a 16-bit integer grid, not fp16.",
        "",
        result["sweep"].replace("## Low-bit sweep\n\n", "").replace("plot: sweep.png", f"Plot: `{args.out}/sweep.png`, copied to `bench/lowbit.png`."),
        "",
        "Goals, in accuracy points against the float model:",
        "",
        markdown_table(goal_rows(summary, reference), [("recipe", "recipe"), ("bits", "bits"), ("accuracy", "accuracy"),
                                                       ("delta", "Δ (points)"), ("goal", "goal"), ("result", "result")]),
        "",
        "Where the bytes go (one run per scheme): `packed weights` are the codes, scales and zero points of every "
        "quantized layer, against k/32 of the same weights in float32 with each layer at its own width (the first "
        "and last at 8 bits); `rest` is batch norm, activation step sizes and the safetensors header. "
        "The JSON manifest (packed.json, about 10 KB) is beside the file, or in its header after "
        "`kdq export --format packed`.",
        "",
        markdown_table(size_breakdown(rows), [("bits", "bits"), ("weights", "packed weights"), ("float", "float32 weights"),
                                                ("ratio", "vs k/32"), ("met", "≤ k/32 + 10%"), ("rest", "rest"),
                                                ("file", "file")]),
        "",
        "Chain against direct distillation (a finding, not a target): `diff` is takd-chain minus apprentice in points; "
        "`spread` is the larger of the two seed standard deviations, in points.",
        "",
        markdown_table(chain_vs_direct(summary), [("bits", "bits"), ("chain", "takd-chain"), ("direct", "apprentice"),
                                                  ("alone", "individual"), ("diff", "diff"), ("spread", "spread")]),
    ])
    if args.long_epochs:
        from kdq.recipes import sweep
        from kdq.report.sweep import sweep_table

        long_rows = sweep("apprentice", Path(args.out) / "float", Path(args.out) / f"apprentice-{args.long_epochs}ep",
                          bits=LONG_SCHEMES, seeds=[0], resume=True, epochs=args.long_epochs, batch_size=128)
        long_rows = [{**r, "recipe": f"apprentice, {args.long_epochs} epochs"} for r in long_rows]
        report += "\n".join([
            "", "",
            f"A longer budget: apprentice, seed 0, {args.long_epochs} epochs instead of 1 (same float model, same "
            "data), for the schemes that miss with one epoch:",
            "",
            sweep_table(long_rows, reference),
        ])
    if not args.no_quantizers:
        from kdq.report.sweep import plot_sweep, sweep_table

        qrows = quantizer_rows(rows, Path(args.out) / "float", Path(args.out) / "quantizers")
        plot_sweep(qrows, ROOT / "bench" / "lowbit_quantizers.png", reference=reference,
                   title="apprentice, seed 0: accuracy by quantizer")
        report += "\n".join([
            "", "",
            "Quantizers compared: the apprentice recipe, seed 0, one epoch, each quantizer for weights and "
            "activations (pact: PACT activations with DoReFa weights; ternary and binary: TTQ and XNOR-style "
            "weights with LSQ activations); first and last layers 8-bit LSQ or uniform as always. "
            "Plot: `bench/lowbit_quantizers.png`.",
            "",
            sweep_table(qrows, reference),
        ])
    print(report)
    png = Path(args.out) / "sweep.png"
    if png.exists():
        (ROOT / "bench" / "lowbit.png").write_bytes(png.read_bytes())
    if args.write:
        replace_section(Path(args.write), SECTION, report)


if __name__ == "__main__":
    main()
