import copy
import math

import numpy as np
import pytest
import torch

from kdq.distill import LOSSES
from kdq.distill.contrastive import CRDLoss
from kdq.errors import KdqError


def _built(num_samples=12, s_dim=4, t_dim=6, **options):
    torch.manual_seed(0)  # the heads come from torch's global generator
    loss = CRDLoss(**{"feat_dim": 3, "nce_k": 5, **options})
    loss.setup((s_dim,), (t_dim,), num_samples)
    return loss


def _batch(seed, n=4, s_dim=4, t_dim=6, num_samples=12):
    rng = np.random.default_rng(seed)
    idx = rng.choice(num_samples, n, replace=False)
    return rng.normal(size=(n, s_dim)), rng.normal(size=(n, t_dim)), idx


def _np_normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_crd_step(state, s, t, idx, rows, nce_t, nce_m):
    """One training step of CRD written with NumPy from the formulas of the docstring / paper
    eq. 18; returns the loss and updates the banks and Z in `state`."""
    n_data = state["memory_student"].shape[0]
    e_s = _np_normalize(s @ state["embed_student.weight"].T + state["embed_student.bias"])
    e_t = _np_normalize(t @ state["embed_teacher.weight"].T + state["embed_teacher.bias"])
    total = 0.0
    for e, bank, z in ((e_s, state["memory_teacher"], "z_student"), (e_t, state["memory_student"], "z_teacher")):
        scores = np.exp(np.einsum("bkd,bd->bk", bank[rows], e) / nce_t)
        if state[z] < 0:
            state[z] = scores.mean() * n_data
        p = scores / state[z]
        noise = (rows.shape[1] - 1) / n_data
        positive = np.log(p[:, 0] / (p[:, 0] + noise + 1e-7))
        negative = np.log(noise / (p[:, 1:] + noise + 1e-7))
        total += -(positive.sum() + negative.sum()) / len(idx)
    for name, e in (("memory_student", e_s), ("memory_teacher", e_t)):
        state[name][idx] = _np_normalize(nce_m * state[name][idx] + (1 - nce_m) * e)
    return total


@pytest.mark.parametrize("num_samples", [12, 1000])  # all rows scored at once / rows gathered
def test_matches_numpy_over_two_steps(num_samples):
    loss = _built(num_samples, nce_t=0.5, nce_m=0.3)
    state = {k: v.double().numpy().copy() for k, v in loss.state_dict().items()}
    for seed in (1, 2):
        s, t, idx = _batch(seed, num_samples=num_samples)
        idx_t = torch.tensor(idx)
        rows = loss.contrast_indices(idx_t).numpy()
        expected = _np_crd_step(state, s, t, idx, rows, 0.5, 0.3)
        out = loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), None, idx_t)
        assert set(out) == {"loss", "crd"}
        assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
        for name in ("memory_student", "memory_teacher", "z_student", "z_teacher"):
            np.testing.assert_allclose(getattr(loss, name).numpy(), state[name], rtol=1e-4, atol=1e-6)


def test_gradient_check_float64():
    loss = _built().double()
    s, t, idx = _batch(3)
    s, t, idx = torch.tensor(s, requires_grad=True), torch.tensor(t, requires_grad=True), torch.tensor(idx)
    loss.eval()  # no bank update, no step: every call below scores against the same banks and rows
    loss(s, t, None, idx)  # fixes Z
    before = copy.deepcopy(loss.state_dict())
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, None, idx)["loss"], (s, t))
    for key, value in loss.state_dict().items():
        torch.testing.assert_close(value, before[key])
    # the heads train: the loss reaches their parameters
    loss(s, t, None, idx)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


def test_setup_builds_heads_and_banks():
    loss = CRDLoss(seed=3)
    assert list(loss.parameters()) == []
    loss.setup((64,), (256,), 50)
    shapes = {name: tuple(p.shape) for name, p in loss.named_parameters()}
    assert shapes == {"embed_student.weight": (128, 64), "embed_student.bias": (128,),
                      "embed_teacher.weight": (128, 256), "embed_teacher.bias": (128,)}
    for name in ("memory_student", "memory_teacher"):
        bank = dict(loss.named_buffers())[name]
        assert bank.shape == (50, 128)
        assert bank.abs().max() <= 1 / math.sqrt(128 / 3)
    assert loss.negatives == 49  # nce_k 4096 clamped to the other 49 rows
    again = CRDLoss(seed=3)
    again.setup((64,), (256,), 50)
    torch.testing.assert_close(again.memory_student, loss.memory_student)
    other = CRDLoss(seed=4)
    other.setup((64,), (256,), 50)
    assert not torch.equal(other.memory_student, loss.memory_student)


def test_registration_and_defaults():
    assert LOSSES.get("crd") is CRDLoss
    assert (CRDLoss.family, CRDLoss.reads, CRDLoss.includes_ce, CRDLoss.default_weight) == (
        "contrastive", "embedding", False, 0.8)
    loss = CRDLoss()
    assert (loss.feat_dim, loss.nce_k, loss.nce_t, loss.nce_m, loss.seed) == (128, 4096, 0.07, 0.5, 0)


def test_negatives_never_hit_the_positive_and_are_reproducible():
    loss = _built(num_samples=6, nce_k=50)
    assert loss.negatives == 5
    idx = torch.tensor([0, 3, 5])
    rows = loss.contrast_indices(idx)
    assert rows.shape == (3, 6)
    assert torch.equal(rows[:, 0], idx)
    assert not (rows[:, 1:] == idx[:, None]).any()
    assert ((rows >= 0) & (rows < 6)).all()
    big = _built(num_samples=500, nce_k=400)
    idx = torch.arange(0, 500, 7)
    rows = big.contrast_indices(idx)
    assert not (rows[:, 1:] == idx[:, None]).any()
    assert torch.equal(rows, big.contrast_indices(idx))  # looking does not advance the sampler
    assert torch.equal(rows, _built(num_samples=500, nce_k=400).contrast_indices(idx))  # same seed
    assert not torch.equal(rows, _built(num_samples=500, nce_k=400, seed=1).contrast_indices(idx))
    s, t = torch.randn(len(idx), 4), torch.randn(len(idx), 6)
    big(s, t, None, idx)  # a training step advances it
    assert not torch.equal(rows, big.contrast_indices(idx))


def test_resume_from_state_dict_is_bit_exact():
    batches = [_batch(seed) for seed in range(4)]
    run = _built()
    losses, saved = [], None
    for step, (s, t, idx) in enumerate(batches):
        if step == 2:
            saved = copy.deepcopy(run.state_dict())
        losses.append(run(torch.tensor(s).float(), torch.tensor(t).float(), None, torch.tensor(idx))["loss"])
    resumed = _built()
    resumed.load_state_dict(saved)
    for step, (s, t, idx) in enumerate(batches[2:], start=2):
        again = resumed(torch.tensor(s).float(), torch.tensor(t).float(), None, torch.tensor(idx))["loss"]
        assert again.item() == losses[step].item()


def test_eval_mode_leaves_the_banks_alone():
    loss = _built()
    s, t, idx = _batch(5)
    before = copy.deepcopy(loss.state_dict())
    loss.eval()
    loss(torch.tensor(s).float(), torch.tensor(t).float(), None, torch.tensor(idx))
    after = loss.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("z_"))


def test_low_precision_inputs_are_scored_in_float32():
    loss = _built()
    s, t, idx = _batch(6)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = loss(torch.tensor(s).bfloat16(), torch.tensor(t).bfloat16(), None, torch.tensor(idx))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert loss.memory_student.dtype == torch.float32


@pytest.mark.parametrize("kwargs, words", [
    ({"feat_dim": 0}, "feat_dim must be a whole number >= 1, got 0"),
    ({"feat_dim": 2.5}, "feat_dim must be a whole number >= 1, got 2.5"),
    ({"nce_k": True}, "nce_k must be a whole number >= 1, got True"),
    ({"nce_k": float("inf")}, "nce_k must be a whole number >= 1, got inf"),
    ({"nce_t": 0}, "nce_t must be > 0 and finite, got 0"),
    ({"nce_t": float("nan")}, "nce_t must be > 0 and finite, got nan"),
    ({"nce_m": 1}, "nce_m must be in [0, 1)"),
    ({"nce_m": -0.1}, "nce_m must be in [0, 1)"),
    ({"seed": -1}, "seed must be a whole number in [0, 2**31), got -1"),
    ({"seed": "0"}, "seed must be a whole number in [0, 2**31), got '0'"),
])
def test_bad_options_are_refused_by_name(kwargs, words):
    with pytest.raises(KdqError) as info:
        CRDLoss(**kwargs)
    assert str(info.value).startswith(words)


@pytest.mark.parametrize("student, teacher, n, words", [
    ((), (64,), 100, "crd: student embedding () and teacher embedding (64,): the student's has no values"),
    ((64,), (0,), 100, "crd: student embedding (64,) and teacher embedding (0,): the teacher's has no values"),
    ((64,), (64,), 1, "crd needs a training set of at least 2 samples"),
])
def test_unusable_shapes_are_refused(student, teacher, n, words):
    with pytest.raises(KdqError) as info:
        CRDLoss().setup(student, teacher, n)
    assert str(info.value).startswith(words)


def test_bad_calls_are_refused():
    s, t, idx = _batch(7)
    s, t, idx = torch.tensor(s).float(), torch.tensor(t).float(), torch.tensor(idx)
    with pytest.raises(KdqError, match="call setup"):
        CRDLoss()(s, t, None, idx)
    loss = _built()
    with pytest.raises(KdqError, match="needs each sample's row in the training set"):
        loss(s, t, None, None)
    with pytest.raises(KdqError, match=r"must lie in \[0, 12\)"):
        loss(s, t, None, idx + 12)
    with pytest.raises(KdqError, match="3 indices for a batch of 4"):
        loss(s, t, None, idx[:3])
