"""A training scan in rematerialised chunks: ``nn.RNN`` over each chunk, under ``nn.remat``.

Differentiating a scan stores every step's carry. Scanning chunks of ``N`` steps instead, with
each chunk rematerialised, keeps only every chunk's first carry and recomputes the chunk in the
backward pass: ``T/N + N`` carries instead of ``T`` (``N ≈ sqrt(T)`` is best), for about one
more forward pass of time. Without dropout the results are the plain scan's to float rounding;
with dropout the masks come from the same rng stream split per chunk, so they are other draws of
the same distribution.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import PRNGKey

Carry = Any


class _ChunkRNN(nn.RNN):
    """``nn.RNN`` over one chunk, in the ``(carry, chunk) -> (carry, outputs)`` form of a scan."""

    def __call__(self, carry: Carry, chunk: jax.Array) -> tuple[Carry, jax.Array]:  # type: ignore[override]
        return super().__call__(chunk, initial_carry=carry, return_carry=True)


def remat_rnn(
    cell: nn.RNNCellBase,
    chunk_length: int,
    scan_options: dict[str, Any],
    inputs: jax.Array,
    *,
    name: str,
    initial_carry: Carry | None = None,
    init_key: PRNGKey | None = None,
    seq_lengths: jax.Array | None = None,
    return_carry: bool = False,
    time_major: bool = False,
    reverse: bool = False,
    keep_order: bool = False,
) -> jax.Array | tuple[Carry, jax.Array]:
    """Scans ``cell`` over ``inputs`` in rematerialised chunks of ``chunk_length`` steps.

    Called from a compact method, like ``nn.RNN(cell, name=name, **scan_options)(inputs, ...)``,
    and with the same variables (the scan is the submodule ``name``), without ``seq_lengths``
    and ``reverse``. ``scan_options``: the lifted scan's ``variable_broadcast``,
    ``variable_carry`` and ``split_rngs``. The sequence length must be a multiple of
    ``chunk_length``.
    """
    del keep_order  # only meaningful with reverse
    steps = inputs.shape[0 if time_major else 1]
    if seq_lengths is not None or reverse:
        raise ValueError("scan='remat' does not support seq_lengths or reverse")
    if steps % chunk_length:
        raise ValueError(
            f"remat_chunk_length={chunk_length} must divide the sequence length {steps}"
        )
    batch_major = jnp.swapaxes(inputs, 0, 1) if time_major else inputs
    if initial_carry is None:
        shape = batch_major.shape[:1] + batch_major.shape[2:]
        key = init_key if init_key is not None else jax.random.key(0)
        initial_carry = cell.initialize_carry(key, shape)
    chunks = batch_major.reshape(
        batch_major.shape[0], steps // chunk_length, chunk_length, *batch_major.shape[2:]
    )
    scan_chunks = nn.scan(
        nn.remat(_ChunkRNN),
        in_axes=1,
        out_axes=1,
        length=steps // chunk_length,
        **scan_options,
    )
    carry, outputs = scan_chunks(cell, name=name, **scan_options)(initial_carry, chunks)
    outputs = outputs.reshape(outputs.shape[0], steps, *outputs.shape[3:])
    if time_major:
        outputs = jnp.swapaxes(outputs, 0, 1)
    return (carry, outputs) if return_carry else outputs
