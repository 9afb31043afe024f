"""The rematerialised training scan: the plain scan over chunks of ``N`` steps, each rematerialised.

Differentiating a scan stores every step's carry. Scanning chunks of ``N`` steps instead, with
each chunk rematerialised (``nn.remat``), keeps only every chunk's first carry and recomputes the
chunk in the backward pass: ``T/N + N`` carries instead of ``T`` (``N ≈ sqrt(T)`` is best), for
about one more forward pass of time. Without dropout the results are the plain scan's to float
rounding; with dropout the masks come from the same rng stream split per chunk, so they are
other draws of the same distribution.
"""

from __future__ import annotations

import jax
from flax import linen as nn
from flax.typing import PRNGKey

from larnn_jax.scans.plain import PlainScan, scan_options
from larnn_jax.typing import Carry


def _step(cell: nn.RNNCellBase, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
    return cell(carry, x)


def _chunk(cell: nn.RNNCellBase, carry: Carry, chunk: jax.Array) -> tuple[Carry, jax.Array]:
    """The plain scan over one chunk ``(N, B, D)`` of steps."""
    return nn.scan(_step, **scan_options(training=True))(cell, carry, chunk)


class RematScan(PlainScan):
    """The training scan in rematerialised chunks of ``chunk_length`` steps.

    Attributes:
      chunk_length: ``N``; the sequence length must be a multiple of it.
    """

    chunk_length: int = 1

    def __call__(  # type: ignore[override]
        self,
        inputs: jax.Array,
        initial_carry: Carry | None,
        init_key: PRNGKey | None,
        seq_lengths: jax.Array | None,
    ) -> tuple[Carry, jax.Array]:
        """``inputs`` ``(T, B, D)`` → the final carry and the outputs ``(T, B, H)``."""
        steps = inputs.shape[0]
        if seq_lengths is not None:
            raise ValueError(
                "scan='remat' does not support seq_lengths: use scan='auto' or 'plain'"
            )
        if steps % self.chunk_length:
            raise ValueError(
                f"remat_chunk_length={self.chunk_length} must divide the sequence length {steps}"
            )
        if initial_carry is None:
            key = init_key if init_key is not None else jax.random.key(0)
            initial_carry = self.cell.initialize_carry(key, inputs.shape[1:])
        chunks = inputs.reshape(steps // self.chunk_length, self.chunk_length, *inputs.shape[1:])
        scan_chunks = nn.scan(nn.remat(_chunk), **scan_options(training=True))
        carry, outputs = scan_chunks(self.cell, initial_carry, chunks)
        return carry, outputs.reshape(steps, *outputs.shape[2:])
