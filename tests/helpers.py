"""Helpers several test files share."""

from __future__ import annotations

from kdq.engine.objectives import Objective


class Interrupt(Objective):
    """Delegates to another objective, and dies after `after` steps (as a killed run would).

    Its state is the inner objective's (under `inner.`), so a straight run through it and a
    resumed one checkpoint the same parts.
    """

    def __init__(self, inner: Objective, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def prepare(self, model, train, device):  # noqa: ANN001
        self.inner.prepare(model, train, device)
        super().prepare(model, train, device)

    def start_epoch(self, epoch: int) -> None:
        if callable(getattr(self.inner, "start_epoch", None)):
            self.inner.start_epoch(epoch)

    def release(self) -> None:
        if callable(getattr(self.inner, "release", None)):
            self.inner.release()

    def forward(self, logits, targets, inputs, indices):  # noqa: ANN001
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.inner(logits, targets, inputs, indices)


NEVER = 10**9  # an Interrupt that never fires


def straight_and_resumed(run, tmp_path, interrupt_after: int):  # noqa: ANN001, ANN201
    """`run(out, after, resume=False)` once straight into tmp_path/a, and once into tmp_path/b
    interrupted after `interrupt_after` steps, then resumed; what the two runs return."""
    import pytest

    straight = run(tmp_path / "a", NEVER)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", interrupt_after)
    return straight, run(tmp_path / "b", NEVER, resume=True)


def assert_same_state(*pairs) -> None:  # noqa: ANN002
    """Each (module, module) pair holds bit-identical state."""
    import torch

    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
