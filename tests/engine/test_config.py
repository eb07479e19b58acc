import pytest

from kdq.engine import TrainConfig
from kdq.errors import KdqError


@pytest.mark.parametrize(
    "values, words",
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"epochs": "three"}, "epochs must be an integer"),
        ({"augment": "yes"}, "augment must be true or false"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"epoch": 3}, "unknown training option 'epoch' (did you mean epochs"),
    ],
)
def test_bad_values_fail_with_one_line(values, words):
    with pytest.raises(KdqError, match=None) as info:
        TrainConfig.from_dict(values)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_round_trip():
    cfg = TrainConfig.from_dict({"epochs": 3, "lr": 0.1, "patience": 2})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
