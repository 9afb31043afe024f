"""The paper's sequence classifier (``docs/model.md``, section 3) around any recurrent cell.

    x (B, T, D) → elu(Dense_H(x)) → L stacked recurrent layers → h at the last step → Dense_C

The cell is a :class:`~larnn_jax.LARNNCell`, a :class:`~larnn_jax.BNLSTMCell` (the same cell
without attention, to isolate what attention adds) or any Flax ``RNNCellBase`` with a
``features`` attribute, such as ``nn.LSTMCell`` (the vanilla baseline).

For streaming, :meth:`SequenceClassifier.initialize_carries` and :meth:`SequenceClassifier.step`
run the same network one time step at a time (evaluation mode).
"""

from __future__ import annotations

from typing import cast

import jax
from flax import linen as nn

from larnn_jax.layers import LARNN, last_valid_step
from larnn_jax.scans import Scan, check_scan
from larnn_jax.typing import Carry


class SequenceClassifier(nn.Module):
    """Classifies sequences ``(B, T, D)`` into ``num_classes`` logits ``(B, C)``.

    Example::

        model = SequenceClassifier(6, LARNNCell(81, num_heads=27, window_size=38))

    Attributes:
      num_classes: ``C >= 1``.
      cell: the recurrent cell every layer copies; its ``features`` is the width ``H`` of the
        input projection and of every layer, its ``dtype`` (if any) that of the dense layers.
      num_layers: ``L >= 1`` stacked layers.
      residual_stacking: add each layer's input to its output (see :class:`~larnn_jax.LARNN`).
      scan, remat_chunk_length: how the layers scan (see :class:`~larnn_jax.LARNNLayer`).
    """

    num_classes: int
    cell: nn.RNNCellBase
    num_layers: int = 3
    residual_stacking: bool = True
    scan: Scan = "auto"
    remat_chunk_length: int | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        check_scan(self.scan, self.remat_chunk_length)
        super().__post_init__()

    def setup(self) -> None:
        dtype = getattr(self.cell, "dtype", None)
        self.input_projection = nn.Dense(self.cell.features, dtype=dtype)
        self.recurrent = LARNN(
            self.cell,
            num_layers=self.num_layers,
            residual_stacking=self.residual_stacking,
            scan=self.scan,
            remat_chunk_length=self.remat_chunk_length,
        )
        self.classifier = nn.Dense(self.num_classes, dtype=dtype)

    def __call__(
        self, x: jax.Array, *, deterministic: bool, seq_lengths: jax.Array | None = None
    ) -> jax.Array:
        """Logits ``(B, C)`` for ``x`` ``(B, T, D)``.

        Args:
          x: input sequences.
          deterministic: ``True`` for evaluation (running statistics, no dropout); ``False`` for
            training (apply with ``mutable=['batch_stats']`` and a ``'dropout'`` rng).
          seq_lengths: ``(B,)`` int, length of each sequence (default: all ``T``); the logits
            come from each sequence's last valid step.
        """
        if x.ndim != 3:
            raise ValueError(f"expected inputs (batch, time, features), got shape {x.shape}")
        hidden = nn.elu(self.input_projection(x))
        sequence = self.recurrent(hidden, deterministic=deterministic, seq_lengths=seq_lengths)
        return self.classifier(last_valid_step(cast(jax.Array, sequence), seq_lengths))

    def initialize_carries(self, batch_shape: tuple[int, ...]) -> tuple[Carry, ...]:
        """The initial carry of every layer (a tuple of ``num_layers``) for a batch of shape
        ``batch_shape``, as :meth:`step` takes them (:meth:`larnn_jax.LARNN.initialize_carries`).

        Needs no variables: call it on the model (or with ``model.apply(variables, batch_shape,
        method="initialize_carries")``).
        """
        stack = LARNN(self.cell, num_layers=self.num_layers, parent=None)
        return stack.initialize_carries(batch_shape)

    def step(self, carries: tuple[Carry, ...], x: jax.Array) -> tuple[tuple[Carry, ...], jax.Array]:
        """One time step of the whole network in evaluation mode (running statistics, no
        dropout): ``x`` ``(*batch, D)`` at step ``t`` → (the carries after it, logits
        ``(*batch, C)`` of the sequence that ends at ``t``).

        The input projection, the stack's step (:meth:`larnn_jax.LARNN.step`) and the classifier
        on the last layer's ``h_t``: stepping a sequence from :meth:`initialize_carries` gives, at
        its last step, the logits of ``__call__(x, deterministic=True)`` to float rounding. Apply
        it with ``model.apply(variables, carries, x, method="step")``; ``jax.jit`` and
        ``jax.vmap`` work through it.
        """
        carries, sequence = self.recurrent.step(carries, nn.elu(self.input_projection(x)))
        return carries, self.classifier(sequence)
