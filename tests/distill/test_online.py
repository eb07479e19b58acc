"""Deep mutual learning as an objective: the loss, its gradients, BN modes, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdq
from kdq.distill.online import MutualLearning, mutual_terms
from kdq.engine import TrainConfig, fit
from kdq.errors import KdqError
from kdq.models import create_model
from tests.helpers import Interrupt, assert_same_state, straight_and_resumed


@pytest.fixture(scope="module")
def digits():
    return kdq.load_dataset("digits", subset=300)


def _numpy_dml(logits: list[np.ndarray], y: np.ndarray, t: float, smoothing: float) -> dict[str, float]:
    """The paper's loss written out: CE(z_k, y) + 1/(K-1) sum_j T^2 KL(p_j || p_k), batch mean."""
    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    n, c = logits[0].shape
    onehot = np.eye(c)[y] * (1 - smoothing) + smoothing / c
    out = {"loss": 0.0}
    for k, zk in enumerate(logits):
        ce = -(onehot * log_softmax(zk)).sum(1).mean()
        kl = 0.0
        for j, zj in enumerate(logits):
            if j != k:
                pj, log_pj, log_pk = np.exp(log_softmax(zj / t)), log_softmax(zj / t), log_softmax(zk / t)
                kl += (pj * (log_pj - log_pk)).sum(1).mean()
        kl *= t * t / (len(logits) - 1)
        out[f"ce_{k}"], out[f"kl_{k}"] = ce, kl
        out["loss"] += ce + kl
    return out


@pytest.mark.parametrize("students, t, smoothing", [(2, 1.0, 0.0), (3, 1.0, 0.0), (3, 2.5, 0.1)])
def test_the_loss_matches_a_hand_computation(students, t, smoothing):
    g = torch.Generator().manual_seed(students)
    logits = [torch.randn(16, 7, generator=g, dtype=torch.float64) * 3 for _ in range(students)]
    y = torch.randint(0, 7, (16,), generator=g)
    got = mutual_terms(logits, y, t, smoothing)
    want = _numpy_dml([z.numpy() for z in logits], y.numpy(), t, smoothing)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].item() == pytest.approx(value, rel=1e-6), name
    # the two-student case the paper writes out: L_1 = CE_1 + KL(p_2 || p_1)
    if students == 2 and t == 1.0:
        p2 = torch.softmax(logits[1], 1)
        kl = (p2 * (p2.log() - torch.log_softmax(logits[0], 1))).sum(1).mean()
        assert got["kl_0"].item() == pytest.approx(kl.item(), rel=1e-6)


def test_each_student_is_moved_by_its_own_loss_alone():
    """The peers' distributions are targets (detached): d loss / d z_k = d L_k / d z_k."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(8, 5, generator=g, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 5, (8,), generator=g)
    terms = mutual_terms(logits, y, 2.0)
    total = torch.autograd.grad(terms["loss"], logits, retain_graph=True)
    for k in range(3):
        own = torch.autograd.grad(terms[f"ce_{k}"] + terms[f"kl_{k}"], logits, allow_unused=True, retain_graph=True)
        assert torch.allclose(total[k], own[k], atol=1e-7)
        assert all(g is None or not g.abs().sum() for i, g in enumerate(own) if i != k)


def test_gradients_reach_every_student(digits):
    torch.manual_seed(0)
    first, *peers = (create_model(name, 10, 1) for name in ("cnn-tiny", "cnn-tiny", "cnn-small"))
    objective = MutualLearning(peers)
    objective.prepare(first, digits.train, torch.device("cpu"))
    x, y = digits.train.x[:16], digits.train.y[:16]
    out = objective(first(x), y, x, torch.arange(16))
    assert set(out) == {"loss", "ce_0", "kl_0", "ce_1", "kl_1", "ce_2", "kl_2"}
    out["loss"].backward()
    for net in (first, *peers):
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # the peers are the objective's parts: fit optimises and checkpoints them
    assert {id(p) for p in objective.parameters()} == {id(p) for m in peers for p in m.parameters()}


def test_bad_students_and_temperatures_are_refused():
    with pytest.raises(KdqError, match="mutual learning needs two or more students"):
        MutualLearning([])
    for t in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(KdqError, match="temperature must be > 0 and finite"):
            MutualLearning([torch.nn.Linear(2, 2)], t)
    net = torch.nn.Linear(2, 2)
    with pytest.raises(KdqError, match="student 0"):
        MutualLearning([net]).prepare(net, None, torch.device("cpu"))


class _Modes(torch.nn.Module):
    """A peer that records whether it ran in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.modes = create_model("cnn-tiny", 10, 1), []

    def forward(self, x):  # noqa: ANN001
        self.modes.append(self.net.training)
        return self.net(x)


def test_peers_train_with_batch_statistics_and_end_at_the_best_epoch(digits, tmp_path):
    torch.manual_seed(0)
    first, peer = create_model("cnn-tiny", 10, 1), _Modes()
    before = {k: v.clone() for k, v in peer.state_dict().items()}
    objective = MutualLearning([peer])
    cfg = TrainConfig(epochs=2, batch_size=64, progress=False, device="cpu")
    result = fit(first, digits, cfg, tmp_path, objective=objective)
    assert peer.modes and all(peer.modes)  # BN in train mode on every step
    after = peer.state_dict()
    assert any("running_mean" in k and not torch.equal(before[k], after[k]) for k in after)
    best = kdq.io.load_weights(tmp_path / "best_objective.safetensors")
    assert all(torch.equal(best[f"students.0.{k}"], v) for k, v in after.items())
    assert result.history[0].keys() >= {"train_ce_0", "train_kl_0", "train_ce_1", "train_kl_1"}


def test_resume_is_bit_exact_for_every_student(digits, tmp_path):
    """An interrupted mutual-learning run resumes to the same students, peers included."""
    cfg = TrainConfig(epochs=2, batch_size=64, progress=False, device="cpu")
    steps = len(digits.train) // cfg.batch_size

    def run(out, after, resume=False):  # noqa: ANN001, ANN202
        torch.manual_seed(0 if not resume else 123)  # a resumed process starts from other weights
        first, peer = create_model("cnn-tiny", 10, 1), create_model("cnn-tiny", 10, 1)
        objective = Interrupt(MutualLearning([peer]), after)
        fit(first, digits, cfg, out, objective=objective, resume=resume)
        return first, peer

    straight, resumed = straight_and_resumed(run, tmp_path, steps + 2)
    assert_same_state(*zip(straight, resumed))
    # two students of one architecture start, and stay, different
    assert not torch.equal(next(straight[0].parameters()), next(straight[1].parameters()))
