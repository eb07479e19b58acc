"""The synthetic data set's own options (samples, features, classes): Python, YAML and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from kdq.cli import main
from kdq.config import parse_experiment
from kdq.data import DATASETS, load_dataset
from kdq.errors import KdqError
from kdq.rundir.load import load_run


def test_default_is_the_registered_problem_byte_for_byte():
    # the generator call as it was before the options existed: runs made then must load the same rows
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=12000, n_features=20, n_informative=12, n_redundant=4, n_classes=10,
                               n_clusters_per_class=2, class_sep=1.5, flip_y=0.02, random_state=0)
    raw = DATASETS.get("synthetic").read()
    assert raw.x_train.tobytes() + raw.x_test.tobytes() == x.astype(np.float32).tobytes()
    assert np.array_equal(np.concatenate([raw.y_train, raw.y_test]), y) and len(raw.y_test) == 2000
    assert DATASETS.get("synthetic").configure() is DATASETS.get("synthetic")


def test_options_size_the_problem_and_are_recorded():
    b = load_dataset("synthetic", samples=1000, features=20, classes=3)
    assert b.input_shape == (20,) and b.num_classes == 3 and b.classes == ["class 0", "class 1", "class 2"]
    assert len(b.test) == 166 and len(b.train) + len(b.val) == 834  # a sixth held out, as for the default
    assert set(b.train.y.tolist()) == {0, 1, 2}
    assert {k: b.options[k] for k in ("samples", "features", "classes")} == {"samples": 1000, "features": 20, "classes": 3}
    assert "samples" not in load_dataset("synthetic", subset=50).options  # the default records nothing new
    few = load_dataset("synthetic", features=5, samples=200)  # fewer than 16 features: all informative
    assert few.input_shape == (5,) and few.num_classes == 10 and len(few.test) == 33


@pytest.mark.parametrize("options, message", [
    ({"samples": 0}, "samples must be an integer from 20 to 1,000,000, got 0"),
    ({"samples": 10**7}, "samples must be an integer from 20"),
    ({"samples": 1000.0}, "samples must be an integer"),
    ({"features": True}, "features must be an integer from 1 to 10,000, got True"),
    ({"classes": 1}, "classes must be an integer from 2 to 1,000"),
    ({"classes": "3"}, "classes must be an integer"),
    ({"samples": 50, "classes": 10}, "50 samples are too few for 10 classes; give samples >= 100"),
    ({"features": 2, "classes": 5}, "2 features cannot hold 5 classes .*give features >= 4"),
    ({"samples": 1_000_000, "features": 10_000}, "over 50,000,000 values"),
    ({"sample": 10}, "has no option 'sample' \\(did you mean samples\\?\\)"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(KdqError, match=message) as e:
        load_dataset("synthetic", **options)
    assert "\n" not in str(e.value)


def test_other_data_sets_take_no_options():
    with pytest.raises(KdqError, match="data set 'digits' takes no option 'samples'"):
        load_dataset("digits", samples=100)


def test_yaml_data_options_set_the_shape_checked_before_training():
    exp = parse_experiment({"data": {"name": "synthetic", "samples": 1000, "features": 8, "classes": 3},
                            "stages": {"a": {"model": "mlp-small"}}})
    assert exp.data["features"] == 8
    with pytest.raises(KdqError, match="^data: synthetic classes must be an integer from 2"):
        parse_experiment({"data": {"name": "synthetic", "classes": 1}, "stages": {"a": {"model": "mlp"}}})
    with pytest.raises(KdqError, match="^data: data set 'digits' takes no option 'features'"):
        parse_experiment({"data": {"name": "digits", "features": 8}, "stages": {"a": {"model": "mlp"}}})


def test_cli_data_arg_trains_and_the_run_reloads_its_data(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", "synthetic", "--data-arg", "samples=300", "--data-arg", "features=6",
                 "--data-arg", "classes=3", "--model", "mlp-small", "--model-arg", "hidden=[8]", "--epochs", "1",
                 "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    run = load_run(out)  # the recorded options load the same 6-feature, 3-class data again
    assert run.data.input_shape == (6,) and run.data.num_classes == 3 and len(run.data.test) == 50
    assert run.model.kdq_spec["kwargs"] == {"hidden": [8]}


@pytest.mark.parametrize("arg, message", [
    ("samples", "--data-arg 'samples' must look like NAME=VALUE"),
    ("seed=3", "--data-arg seed is not a data set's own option; use --split-seed"),
    ("subset=3", "use --subset"),
    ("classes=1", "synthetic classes must be an integer from 2"),
])
def test_cli_bad_data_arg_exits_2(arg, message, tmp_path, capsys):
    code = main(["train", "--data", "synthetic", "--data-arg", arg, "--model", "mlp-small", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and message in err
