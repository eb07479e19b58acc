"""The quantization-aware distillation recipes, end to end on a tiny digits subset."""

from __future__ import annotations

import json

import pytest
import torch

import kdq
from kdq import recipes
from kdq.distill import KDLoss
from kdq.errors import KdqError
from kdq.quant.lowbit import LowBitConfig, lowbit_layers, quantize_lowbit
from kdq.rundir import read_config

FAST = {"epochs": 1, "batch_size": 64, "progress": False}


@pytest.fixture(scope="module")
def digits():
    return kdq.load_dataset("digits", subset=300)


@pytest.fixture(scope="module")
def float_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipes") / "float"
    torch.manual_seed(0)
    kdq.train("cnn-tiny", digits, out=out, **{**FAST, "epochs": 3})
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["individual", "apprentice"])
def test_direct_recipes_write_one_packed_run_per_scheme(name, float_run, digits, tmp_path):
    results = recipes.run_recipe(name, float_run, tmp_path, bits=["w8a8", "w2a2"], data=digits, **FAST)
    assert list(results) == ["w8a8", "w2a2"]
    for scheme, r in results.items():
        run_dir = tmp_path / scheme
        assert (run_dir / "packed.safetensors").exists() and r["bits"] == scheme
        config = read_config(run_dir)
        assert config["source"] == str(float_run)
        assert config["teacher"] == (None if name == "individual" else str(float_run))
        assert ("train_kd" in metrics(run_dir)[0]) == (name == "apprentice")
        # kdq evaluate reads the run back to the same accuracy
        assert kdq.evaluate(run_dir, digits, speed=False)["accuracy"] == pytest.approx(r["accuracy"])
    assert results["w2a2"]["size_bytes"] < results["w8a8"]["size_bytes"]


@pytest.mark.slow
def test_takd_chain_passes_each_precision_to_the_next(float_run, digits, tmp_path):
    results = recipes.run_recipe("takd-chain", float_run, tmp_path, bits=["w8a8", "w4a4", "w2a2"], data=digits, **FAST)
    assert list(results) == ["w8a8", "w4a4", "w2a2"]
    first, second, third = (read_config(tmp_path / s) for s in results)
    assert first["source"] == first["teacher"] == str(float_run)
    assert second["source"] == second["teacher"] == str(tmp_path / "w8a8")
    assert third["source"] == third["teacher"] == str(tmp_path / "w4a4")
    # the 4-bit link started from the 8-bit link's latent weights, not the float model's
    start, _, _ = kdq.stages.lowbit.lowbit_source(tmp_path / "w8a8", digits)
    float_model, _ = kdq.load_model(float_run)
    key = next(k for k, v in float_model.state_dict().items() if v.ndim == 4)  # the first conv's weight
    assert not torch.equal(start.state_dict()[key], float_model.state_dict()[key])

    # resuming keeps finished schemes as they are
    before = (tmp_path / "w4a4" / "results.json").stat().st_mtime_ns
    again = recipes.run_recipe("takd-chain", float_run, tmp_path, bits=["w8a8", "w4a4", "w2a2"], data=digits,
                               resume=True, **FAST)
    assert (tmp_path / "w4a4" / "results.json").stat().st_mtime_ns == before
    assert again["w2a2"]["accuracy"] == results["w2a2"]["accuracy"]


@pytest.mark.slow
def test_qkd_runs_three_phases(float_run, digits, tmp_path):
    phases = {"self_studying": {"lr": 0.02}, "co_studying": {"epochs": 2}}
    results = recipes.run_recipe("qkd", float_run, tmp_path, bits="w4a4", phases=phases, data=digits, **FAST)
    run_dir = tmp_path / "w4a4"
    assert 0 <= results["w4a4"]["accuracy"] <= 1
    assert len(metrics(run_dir / "self_studying")) == 1 and "train_kd" not in metrics(run_dir / "self_studying")[0]
    co = metrics(run_dir / "co_studying")
    assert len(co) == 2 and {"train_kd", "train_teacher_loss"} <= co[0].keys()
    assert "train_kd" in metrics(run_dir)[0]  # tutoring distils
    config = read_config(run_dir)
    assert config["phases"]["self_studying"]["lr"] == 0.02 and config["phases"]["tutoring"]["epochs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parts", "pair"])
def test_qkd_resumed_after_co_studying_reloads_the_trained_teacher(float_run, digits, tmp_path, monkeypatch, layout):
    """Tutoring after a resume is taught by co-studying's best teacher (best_objective.safetensors),
    or, in a phase written before objectives had parts, by the teacher inside the pair's weights."""
    from kdq.io import load_weights, save_weights

    options = dict(bits="w4a4", phases={"co_studying": {"epochs": 2}}, data=digits, **FAST)
    recipes.run_recipe("qkd", float_run, tmp_path / "straight", **options)
    co = tmp_path / "resumed" / "w4a4" / "co_studying"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # dies as tutoring starts: both phases are finished
        patch.setattr(recipes.qkd, "train_lowbit", interrupt)
        with pytest.raises(KeyboardInterrupt):
            recipes.run_recipe("qkd", float_run, tmp_path / "resumed", **options)
    teacher = load_weights(co / "best_objective.safetensors")
    assert teacher and all(k.startswith("teacher.") for k in teacher)
    if layout == "pair":  # the co-studied teacher and student as one module, as kdq wrote it before
        student = load_weights(co / "best.safetensors")
        save_weights(co / "best.safetensors", {**teacher, **{f"student.{k}": v for k, v in student.items()}})
        (co / "best_objective.safetensors").unlink()
    recipes.run_recipe("qkd", float_run, tmp_path / "resumed", resume=True, **options)
    packed = [(tmp_path / run / "w4a4" / "packed.safetensors").read_bytes() for run in ("straight", "resumed")]
    assert packed[0] == packed[1]


def test_co_studying_trains_the_teacher_too(float_run, digits):
    model, _ = kdq.load_model(float_run)
    student = quantize_lowbit(model, LowBitConfig.parse("w4a4"))
    teacher, _ = kdq.load_model(float_run)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kdq.engine.fit(student, digits, kdq.engine.TrainConfig(**FAST), objective=recipes.qkd.MutualKD(teacher, KDLoss()))
    assert any(not torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.slow
def test_speq_distils_from_its_own_stochastic_precision(float_run, digits, tmp_path):
    results = recipes.run_recipe("speq", float_run, tmp_path, bits=["w2a2"], teacher_bits=[2, 4, 32], data=digits, **FAST)
    run_dir = tmp_path / "w2a2"
    assert "train_cosine" in metrics(run_dir)[0] and 0 <= results["w2a2"]["accuracy"] <= 1
    assert read_config(run_dir)["teacher_bits"] == [2, 4, 32]


def test_speq_teacher_pass_moves_nothing_and_uses_its_widths(float_run, digits):
    model, _ = kdq.load_model(float_run)
    student = quantize_lowbit(model, LowBitConfig.parse("w2a2", first_last_bits=None))
    x = digits.train.x[:32]
    student.train()
    student(x)  # initialise the quantizers' step sizes
    state = {k: v.clone() for k, v in student.state_dict().items()}
    target = recipes.speq.StochasticPrecision(student, 2, [2])
    wide = recipes.speq.StochasticPrecision(student, 2, [32])
    t = target.teacher_logits(x)
    assert not t.requires_grad
    # BN statistics, step sizes and observers unchanged (BN counts batches, which momentum-based BN ignores)
    assert all(torch.equal(state[k], v) for k, v in student.state_dict().items() if "num_batches" not in k)
    assert torch.allclose(t, student(x), atol=1e-5)  # the target width only: the student's own pass
    float_acts = {name: layer.act_quantizer for name, layer in lowbit_layers(student).items()}
    w = wide.teacher_logits(x)
    assert all(layer.act_quantizer is float_acts[name] for name, layer in lowbit_layers(student).items())  # restored
    for layer in lowbit_layers(student).values():
        layer.act_quantizer = None
    assert torch.allclose(w, student(x), atol=1e-5)  # 32: float activations everywhere


def test_at_bits_keeps_the_range_and_adds_levels():
    from kdq.quant.lowbit import make_quantizer

    q = make_quantizer("lsq", 2, "activation")
    x = torch.rand(4096) * 3
    q(x)  # initialises the step
    with torch.no_grad():
        q.step.fill_(0.5)  # codes 0..3 span [0, 1.5]: x reaches all of them
    low = q(x)
    with q.at_bits(4):
        high = q(x)
    assert q.bits == 2 and torch.equal(q(x), low)  # restored
    assert low.unique().numel() == 4 and high.unique().numel() == 16
    assert high.max().item() == pytest.approx(low.max().item(), rel=1e-5)  # same clip


@pytest.mark.slow
def test_sweep_gives_one_row_per_scheme_and_seed(float_run, digits, tmp_path):
    rows = recipes.sweep("individual", float_run, tmp_path, bits=["w4a4"], seeds=[0, 1], data=digits, **FAST)
    assert [(r["bits"], r["seed"]) for r in rows] == [("w4a4", 0), ("w4a4", 1)]
    assert (tmp_path / "seed1" / "w4a4" / "packed.safetensors").exists()
    assert rows[0]["float_size_bytes"] == json.loads((float_run / "results.json").read_text())["size_bytes"]
    assert read_config(tmp_path / "seed1" / "w4a4")["train"]["seed"] == 1


@pytest.mark.parametrize("name, options, words", [
    ("takd", {"bits": "w4a4"}, "did you mean takd-chain"),
    ("apprentice", {"bits": "w4a4", "phases": {}}, "does not take 'phases'"),
    ("individual", {"bits": ["w4a4", "w0a4"]}, "bits"),
    ("individual", {"bits": ["w4a4", "w4a4"]}, "twice"),
    ("individual", {"bits": "w4a4", "epochs": 0}, "epochs must be >= 1"),
    ("individual", {"bits": []}, "list of them"),
    ("speq", {"bits": "w4"}, "activation bits"),
    ("speq", {"bits": "w4a4", "teacher_bits": [4, 64]}, "teacher_bits"),
    ("qkd", {"bits": "w4a4", "phases": {"tutor": {}}}, "did you mean tutoring"),
    ("qkd", {"bits": "w4a4", "phases": {"tutoring": {"lr": -1}}}, "lr must be > 0"),
    ("apprentice", {"bits": "w4a4", "quantizer": "lsqq"}, "did you mean"),
])
def test_bad_recipe_configs_fail_in_one_line_before_work(name, options, words, tmp_path):
    with pytest.raises(KdqError, match=words) as info:
        recipes.run_recipe(name, tmp_path / "missing-run", tmp_path / "out", **options)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
