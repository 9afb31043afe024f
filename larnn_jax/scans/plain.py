"""The plain scan: Flax's ``nn.RNN`` over the cell, with the collections batch norm needs.

Batch norm inside a recurrence keeps its running statistics in the ``batch_stats`` collection
and, in training, updates them at every step, so the scan must carry that collection from step
to step (a bare ``nn.RNN`` broadcasts only ``params``). :func:`scan_options` gives the lifted
scan's arguments for each mode.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn
from flax.typing import PRNGKey

from larnn_jax.typing import Carry


def scan_options(training: bool) -> dict[str, Any]:
    """``nn.RNN``'s (and ``nn.scan``'s) variable and rng arguments for a cell with batch norm.

    Training: the statistics are carried through the scan (updated at every step) and every step
    gets its own dropout rng. Evaluation: parameters and statistics are read-only.
    """
    if training:
        return dict(
            variable_broadcast="params",
            variable_carry="batch_stats",
            split_rngs={"params": False, "dropout": True},
        )
    return dict(variable_broadcast=("params", "batch_stats"), split_rngs={"params": False})


class PlainScan(nn.RNN):
    """``nn.RNN`` over a cell, time-major, returning its final carry; also steps the cell alone."""

    def __call__(  # type: ignore[override]
        self,
        inputs: jax.Array,
        initial_carry: Carry | None,
        init_key: PRNGKey | None,
        seq_lengths: jax.Array | None,
    ) -> tuple[Carry, jax.Array]:
        """``inputs`` ``(T, B, D)`` → the carry after each sequence's last step (``seq_lengths``)
        and the outputs ``(T, B, H)``."""
        return super().__call__(
            inputs,
            initial_carry=initial_carry,
            init_key=init_key,
            seq_lengths=seq_lengths,
            return_carry=True,
            time_major=True,
        )

    def step(self, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
        """One step of the cell: ``x`` ``(*batch, D)`` → (the carry after it, the output)."""
        return self.cell(carry, x)
