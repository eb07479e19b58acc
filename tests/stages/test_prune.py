"""`kdq prune`: magnitude and channel pruning of a run, fine-tuned, gradual, in rounds with rewinding."""

from __future__ import annotations

import json

import pytest
import torch

import kdq
from kdq.cli import main
from kdq.io import load_weights
from kdq.rundir.layout import kept_epoch

DATA = ["--data", "digits", "--subset", "300", "--batch-size", "64", "--no-progress"]
QUIET = ["--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A resnet8 trained 2 epochs on digits, its epoch-1 weights kept for weight rewinding."""
    out = tmp_path_factory.mktemp("prune") / "base"
    assert main(["train", "--model", "resnet8", *DATA, "--epochs", "2", "--keep-epoch", "1", "--out", str(out)]) == 0
    return out


def _results(run):
    return json.loads((run / "results.json").read_text())


def _outputs(run, x):
    return kdq.load_run(run).model.eval()(x)


def test_keep_epoch_keeps_the_weights_after_that_epoch(base):
    kept = load_weights(base / kept_epoch(1))
    best = load_weights(base / "best.safetensors")
    assert kept.keys() == best.keys()


def test_channels_really_removed_and_the_run_rebuilds(base, tmp_path):
    out = tmp_path / "half"
    assert main(["prune", str(base), "--method", "channels", "--macs", "2", "--epochs", "0", *QUIET,
                 "--out", str(out)]) == 0
    pruned, dense = _results(out), _results(base)
    assert 1.9 < dense["macs"] / pruned["macs"] < 2.2 and pruned["params"] < dense["params"]
    assert pruned["pruning"]["macs_reduction"] == pytest.approx(dense["macs"] / pruned["macs"], rel=1e-6)
    run = kdq.load_run(out)  # from model.json's widths: no pickle
    assert run.model.kdq_spec["widths"] and run.format.kind == "float"
    x = run.data.test.x[:8]
    torch.testing.assert_close(run.model.eval()(x), _outputs(out, x), rtol=0, atol=0)


def test_round_to_from_the_command_line(base, tmp_path):
    out = tmp_path / "rounded"
    assert main(["prune", str(base), "--method", "channels", "--ratio", "0.4", "--round-to", "4", "--epochs", "0",
                 *QUIET, "--out", str(out)]) == 0
    layers = _results(out)["pruning"]["layers"]
    assert _results(out)["pruning"]["round_to"] == 4
    assert all(s["kept"] % 4 == 0 or s["kept"] == s["of"] for name, s in layers.items() if name != "fc"), layers
    assert main(["prune", str(base), "--sparsity", "0.5", "--round-to", "4", *QUIET, "--out", str(tmp_path / "x")]) == 2


def test_magnitude_in_rounds_with_weight_rewinding(base, tmp_path):
    out = tmp_path / "lottery"
    assert main(["prune", str(base), "--sparsity", "0.8", "--scope", "global", "--rounds", "2", "--rewind", "weights",
                 "--rewind-epoch", "1", "--epochs", "1", *QUIET, "--out", str(out)]) == 0
    results = _results(out)
    assert results["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert (out / "round-1" / "phase.json").exists() and (out / "model.sparse.safetensors").exists()
    assert results["size_bytes"] < 0.5 * _results(base)["size_bytes"]
    weights = kdq.load_run(out).model.state_dict()
    assert all(torch.count_nonzero(w) < w.numel() for k, w in weights.items() if k.endswith("conv1.0.weight"))


def test_gradual_keeps_an_epoch_at_the_final_sparsity(base, tmp_path):
    out = tmp_path / "gradual"
    results = kdq.prune(base, out, sparsity=0.7, gradual=True, epochs=3, batch_size=64, progress=False)
    assert results["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert results["best_epoch"] >= 2  # epoch 1 trains below the final sparsity (cubic schedule from 0)


def test_fine_tuning_with_a_teacher_and_a_feature_method(base, tmp_path):
    out = tmp_path / "kd"
    assert main(["prune", str(base), "--method", "channels", "--ratio", "0.5", "--teacher", str(base),
                 "--distill-method", "at", "--epochs", "1", *QUIET, "--out", str(out)]) == 0
    metrics = (out / "metrics.jsonl").read_text()
    assert "train_at" in metrics and "train_ce" in metrics
    assert not any("adapter" in k for k in load_weights(out / "model.safetensors"))


@pytest.mark.slow
def test_an_interrupted_pruning_resumes_to_the_same_bytes(base, tmp_path, monkeypatch):
    """Rounds of channel pruning with lr rewinding, killed in the second round, then resumed."""
    import kdq.stages.prune as stage

    args = dict(method="channels", ratio=0.5, rounds=2, rewind="lr", epochs=1, batch_size=64, progress=False)
    kdq.prune(base, tmp_path / "a", **args)
    real_fit, calls = stage.fit, []

    def dying_fit(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*a, **kw)

    monkeypatch.setattr(stage, "fit", dying_fit)
    with pytest.raises(KeyboardInterrupt):
        kdq.prune(base, tmp_path / "b", **args)
    monkeypatch.setattr(stage, "fit", real_fit)
    kdq.prune(base, tmp_path / "b", resume=True, **args)
    a, b = (load_weights(tmp_path / d / "model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_prune_stage_in_an_experiment(tmp_path):
    text = f"""
name: p
data: {{name: digits, subset: 300}}
train: {{epochs: 1, batch_size: 64, progress: false}}
stages:
  base: {{model: resnet8}}
  half: {{kind: prune, source: base, method: channels, macs: 2.0, teacher: base, epochs: 1}}
  int8: {{kind: quantize, source: half}}
"""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "exp")]) == 0
    assert _results(tmp_path / "exp" / "int8")["macs"] == _results(tmp_path / "exp" / "half")["macs"]


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity", "-0.1"], "sparsity"),
    (["--method", "channels", "--ratio", "1.0"], "ratio"),
    (["--method", "channels", "--ratio", "0.5", "--macs", "2"], "one of"),
    (["--sparsity", "0.5", "--ratio", "0.5"], "ratio is an option of the channels method"),
    (["--sparsity", "0.5", "--skip", "layer9"], "layer9"),
    (["--sparsity", "0.5", "--rewind", "weights", "--rewind-epoch", "2"], "kept no weights of epoch 2"),
    (["--sparsity", "0.5", "--rewind", "weights"], "needs --rewind-epoch"),
    (["--method", "channels", "--ratio", "0.5", "--rewind", "weights", "--rewind-epoch", "1"], "use --rewind lr"),
    (["--sparsity", "0.5", "--gradual", "--rounds", "2"], "rounds 1"),
    (["--sparsity", "0.5", "--teacher", "x", "--epochs", "0"], "a teacher needs fine-tuning epochs"),
    (["--method", "channels", "--ratio", "0.5", "--importance", "taylor", "--epochs", "0", "--skip", "nope"], "nope"),
])
def test_bad_input_is_one_line_and_writes_nothing(base, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(["prune", str(base), *extra, *QUIET, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_quantized_runs_are_refused_with_the_order_that_works(base, tmp_path, capsys):
    assert main(["quantize", str(base), "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["prune", str(tmp_path / "q"), "--sparsity", "0.5", *QUIET, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "prune the float run it was made from" in err and not (tmp_path / "bad").exists()


def test_a_teacher_on_other_data_is_refused(base, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", "--model", "mlp-small", "--data", "synthetic", "--subset", "300", "--epochs", "1",
                 *QUIET, "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["prune", str(base), "--sparsity", "0.5", "--teacher", str(other), "--epochs", "1", *QUIET,
                 "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "bad").exists()
