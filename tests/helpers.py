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

    def forward(self, logits, targets, inputs, indices):  # noqa: ANN001
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.inner(logits, targets, inputs, indices)
