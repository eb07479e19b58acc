"""Collecting runs for a comparison: seeds grouped, untrusted results checked, the table and its flags,
and every bad input as one `kdq: error:` line with exit 2."""

from __future__ import annotations

import json
import statistics

import pytest

from kdq.cli import main
from kdq.errors import KdqError
from kdq.report.compare import collect, summary_cells, summary_table
from tests.conftest import TinyNet, make_bundle
from tests.report.fake import ENV, fake_experiment, fake_run


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def by_label(rows):
    return {r.label: r for r in rows}


# ---- grouping seeds


def test_one_stage_across_seed_experiments_is_one_row_with_mean_and_sample_std(tmp_path):
    accs = {0: (0.90, 0.80), 1: (0.92, 0.84), 2: (0.91, 0.83)}
    for seed, (teacher, kd) in accs.items():
        fake_experiment(tmp_path / "seeds" / f"seed{seed}", {"teacher": teacher, "kd": kd}, seed=seed)
    rows = collect([tmp_path / "seeds"])
    assert [r.label for r in rows] == ["teacher", "kd"]  # the experiments' order, not alphabetical
    kd = rows[1]
    assert kd.seeds == 3 and kd.accuracies == [0.80, 0.84, 0.83]
    assert kd.accuracy == pytest.approx(statistics.fmean([0.80, 0.84, 0.83]))
    assert kd.accuracy_std == pytest.approx(statistics.stdev([0.80, 0.84, 0.83]))  # sample std (n - 1)
    assert kd.history[-1]["val_accuracy"] == pytest.approx(0.80 - 0.05)  # the first seed's metrics.jsonl
    assert len(kd.paths) == 3
    cells, _ = summary_cells(rows)
    assert cells[1]["accuracy"].startswith(f"{kd.accuracy:.4f} ± {kd.accuracy_std:.4f} (3 seeds)")


def test_runs_equal_but_for_the_seed_group_in_one_folder_and_other_configs_stay_apart(tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path / f"kd-s{seed}", 0.8 + seed / 100, seed=seed)
        fake_run(tmp_path / f"hot-s{seed}", 0.7, seed=seed, lr=0.5)  # another learning rate: another model
    rows = by_label(collect([tmp_path]))
    assert set(rows) == {"kd", "hot"}
    assert rows["kd"].seeds == 2 and rows["hot"].seeds == 2 and rows["kd"].accuracy == pytest.approx(0.805)


def test_two_runs_at_one_seed_are_two_rows(tmp_path):
    # the same config at the same seed in two places (a rerun, or quickstart vs quickstart-seeds/seed0)
    fake_run(tmp_path / "a" / "kd", 0.8)
    fake_run(tmp_path / "b" / "kd", 0.9)
    rows = collect([tmp_path / "a", tmp_path / "b"])
    assert [(r.label, r.seeds) for r in rows] == [("a/kd", 1), ("b/kd", 1)]


def test_real_tiny_runs_at_two_seeds_group(tmp_path):
    import kdq

    data = make_bundle()
    for seed in (0, 1):
        kdq.train(TinyNet(), data, out=tmp_path / f"seed{seed}" / "tiny", epochs=1, batch_size=64, progress=False,
                  seed=seed)
    (row,) = collect([tmp_path])
    assert row.label == "tiny" and row.seeds == 2 and row.dataset == "toy"
    assert row.classes == ["c0", "c1", "c2", "c3"] and len(row.confusion_matrix) == 4
    assert row.history and "train_loss" in row.history[0] and row.latency_ms > 0


def test_experiment_teacher_is_the_default_reference(tmp_path):
    fake_experiment(tmp_path / "e", {"baseline": 0.8, "teacher": 0.9, "kd": 0.85},
                    compare={"teacher": "teacher", "student": "kd"})
    rows = collect([tmp_path / "e"])
    assert [r.label for r in rows] == ["baseline", "teacher", "kd"]
    cells, notes = summary_cells(rows)
    assert cells[1]["label"] == "teacher (reference)" and "against teacher" in notes[0]
    assert cells[0]["accuracy"] == "0.8000 (-10.00 pt)"
    cells, notes = summary_cells(rows, "kd")
    assert cells[2]["label"] == "kd (reference)" and cells[1]["accuracy"] == "0.9000 (+5.00 pt)"


def test_ratios_to_the_reference(tmp_path):
    fake_run(tmp_path / "big", 0.9, size_bytes=8000, params=4000, latency_ms_batch1=2.0, model="big")
    fake_run(tmp_path / "small", 0.8, size_bytes=2000, params=1000, latency_ms_batch1=0.5)
    cells, _ = summary_cells(collect([tmp_path / "big", tmp_path / "small"]))
    assert cells[1]["params"] == "1,000 (0.25x)" and cells[1]["size"] == "2.0 KB (0.25x)"
    assert cells[1]["latency"] == "0.500 ± 0.010 (0.25x)"


# ---- machines


def test_rows_from_another_machine_are_flagged_with_both_machines_named(tmp_path):
    gpu = {**ENV, "device": "NVIDIA H100", "device_type": "cuda"}
    fake_run(tmp_path / "ref", 0.9, model="big")
    fake_run(tmp_path / "away", 0.8, environment=gpu, latency_ms_batch1=0.1)
    rows = collect([tmp_path / "ref", tmp_path / "away"])
    cells, notes = summary_cells(rows)
    assert cells[1]["label"] == "away †" and "†" not in cells[0]["label"]
    assert cells[1]["latency"] == "0.100 ± 0.010"  # no ratio across machines
    footnote = next(n for n in notes if n.startswith("†"))
    assert "NVIDIA H100" in footnote and "Test CPU (avx2), 2 threads" in footnote
    # thread counts differ: flagged too
    fake_run(tmp_path / "threads", 0.8, threads=8)
    cells, _ = summary_cells(collect([tmp_path / "ref", tmp_path / "threads"]))
    assert cells[1]["label"].endswith("†")


# ---- untrusted results.json


@pytest.mark.parametrize("results, words", [
    ({"confusion_matrix": [[1] * 4] * 4}, "confusion_matrix must be a list of 3 rows of 3 counts, one per class, got '4 items'"),
    ({"confusion_matrix": [[1, 2, 3, 4], [1, 2, 3], [1, 2, 3]]}, "confusion_matrix[0] must be 3 counts"),
    ({"confusion_matrix": [[0] * 300] * 300}, "confusion_matrix must be a list of 3 rows"),
    ({"confusion_matrix": [[1, "x", 3], [1, 2, 3], [1, 2, 3]]}, "confusion_matrix[0][1] must be a count"),
    ({"confusion_matrix": [[1, -2, 3], [1, 2, 3], [1, 2, 3]]}, "must be a count"),
    ({"confusion_matrix": "[[1, 2"}, "not a JSON list"),
    ({"accuracy": "high"}, "accuracy must be a finite number"),
    ({"accuracy": 87.5}, "accuracy must be a fraction in [0, 1]"),
    ({"accuracy": None}, "accuracy is missing"),
    ({"per_class_accuracy": {"cat": 2}}, "per_class_accuracy['cat'] must be a fraction"),
    ({"per_class_accuracy": ["cat"]}, "per_class_accuracy must be a JSON object"),
    ({"latency_ms_batch1": -1}, "latency_ms_batch1 must be a number >= 0"),
    ({"environment": {"device": ["x"]}}, "environment.device must be a string"),
    ({"environment": {**ENV, "cpu_flags": "avx"}}, "cpu_flags must be a list"),
    ({"dataset": "x" * 500}, "dataset must be a string of at most 200"),
])
def test_damaged_results_are_one_error_naming_the_file(tmp_path, results, words):
    path = fake_run(tmp_path / "r", 0.9) / "results.json"
    record = {**json.loads(path.read_text()), **results}
    path.write_text(json.dumps({k: v for k, v in record.items() if v is not None}))
    with pytest.raises(KdqError) as err:
        collect([tmp_path / "r"])
    assert words in str(err.value) and "results.json" in str(err.value), err.value


def test_confusion_matrix_stored_as_a_json_string_is_read(tmp_path):
    fake_run(tmp_path / "r", 0.9, confusion_matrix=json.dumps([[8, 1, 1], [0, 9, 1], [1, 0, 9]]))
    assert collect([tmp_path / "r"])[0].confusion_matrix == [[8, 1, 1], [0, 9, 1], [1, 0, 9]]


def test_torn_last_metrics_line_is_dropped_and_a_damaged_one_refused(tmp_path):
    path = fake_run(tmp_path / "r", 0.9)
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # killed mid-write
    assert [h["epoch"] for h in collect([path])[0].history] == [1, 2]
    (path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(KdqError, match="line 2 is not JSON"):
        collect([path])


def test_low_bit_and_int8_runs_record_their_bits(tmp_path):
    fake_run(tmp_path / "w4a4", 0.8, kind="lowbit", bits="w4a4")
    fake_run(tmp_path / "q", 0.85, kind="int8", model="m2")
    rows = by_label(collect([tmp_path]))
    assert (rows["w4a4"].bits, rows["w4a4"].scheme, rows["w4a4"].arch) == (4, "w4a4", "cnn-tiny w4a4")
    assert (rows["q"].bits, rows["q"].arch) == (8, "m2 int8")
    fake_run(tmp_path / "bad", 0.8, kind="lowbit", bits="w99")
    with pytest.raises(KdqError, match="bits"):
        collect([tmp_path / "bad"])


def test_terminal_table_cannot_carry_escape_sequences(tmp_path):
    fake_run(tmp_path / "evil\x1b[2J", 0.9)
    text = summary_table(collect([tmp_path]), markdown=False)
    assert "\x1b" not in text and "evil?[2J" in text


# ---- bad input on the command line: one line, exit 2


def test_no_runs_given(capsys):
    for command in (["compare"], ["report", "--out", "x"]):
        code, _, err = run(capsys, *command)
        assert code == 2 and err.count("\n") == 1 and "no runs given" in err, err


def test_a_folder_with_no_runs(tmp_path, capsys):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    code, _, err = run(capsys, "compare", tmp_path / "empty")
    assert code == 2 and err.count("\n") == 1 and "holds no kdq runs" in err, err
    code, _, err = run(capsys, "compare", tmp_path / "missing")
    assert code == 2 and err.count("\n") == 1 and "not found" in err, err


def test_a_run_without_results(tmp_path, capsys):
    path = fake_run(tmp_path / "r", 0.9)
    (path / "results.json").unlink()
    code, _, err = run(capsys, "compare", path)
    assert code == 2 and err.count("\n") == 1 and f"{path} is a run without results.json" in err, err
    # inside a folder that holds other runs it is skipped with a warning, the others compared
    fake_run(tmp_path / "done", 0.8)
    code, out, err = run(capsys, "compare", tmp_path)
    assert code == 0 and "done (reference)" in out and "skipping" in err


def test_runs_on_different_data_sets_are_refused(tmp_path, capsys):
    fake_run(tmp_path / "a", 0.9, dataset="fashion-mnist")
    fake_run(tmp_path / "b", 0.9, dataset="cifar10")
    for command in (["compare"], ["report", "--out", tmp_path / "out"]):
        code, _, err = run(capsys, *command, tmp_path / "a", tmp_path / "b")
        assert code == 2 and err.count("\n") == 1, err
        assert "'fashion-mnist'" in err and "'cifar10'" in err and str(tmp_path / "a") in err
        assert str(tmp_path / "b") in err and "report them separately" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_reference(tmp_path, capsys):
    fake_run(tmp_path / "teacher", 0.9, model="big")
    fake_run(tmp_path / "kd", 0.9)
    for command in (["compare"], ["report", "--out", tmp_path / "out"]):
        code, _, err = run(capsys, *command, tmp_path, "--reference", "teachr")
        assert code == 2 and err.count("\n") == 1 and "unknown --reference 'teachr' (did you mean teacher" in err, err
    assert not (tmp_path / "out").exists()


def test_compare_prints_the_table(tmp_path, capsys):
    fake_run(tmp_path / "teacher", 0.9, model="big")
    fake_run(tmp_path / "kd", 0.85)
    code, out, _ = run(capsys, "compare", tmp_path, "--reference", "kd")
    assert code == 0 and "kd (reference)" in out and "0.9000 (+5.00 pt)" in out and "|" not in out
    code, out, _ = run(capsys, "compare", tmp_path, "--markdown")
    assert code == 0 and out.startswith("| model ")
