"""The paper's sequence classifier (``docs/model.md``, section 3) around any recurrent cell.

    x (B, T, D) → elu(Dense_H(x)) → L stacked recurrent layers → h at the last step → Dense_C

The cell is a :class:`~larnn_jax.LARNNCell`, a :class:`~larnn_jax.BNLSTMCell` (the same cell
without attention, to isolate what attention adds) or any Flax ``RNNCellBase`` with a
``features`` attribute, such as ``nn.LSTMCell`` (the vanilla baseline).

For streaming, :meth:`SequenceClassifier.initialize_carries` and :meth:`SequenceClassifier.step`
run the same network one time step at a time (evaluation mode).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
from flax import linen as nn

from larnn_jax.layers import LARNN, Scan, _with_mode, check_scan, last_valid_step

Carry = Any

#: Where layer ``l``'s cell keeps its variables in every collection: under ``recurrent`` (the
#: :class:`~larnn_jax.LARNN` stack), ``layer_l`` (its :class:`~larnn_jax.LARNNLayer`), ``rnn``
#: (the scan, ``nn.RNN`` or the fused scan) and ``cell``.
CELL_PATH = ("recurrent", "layer_{index}", "rnn", "cell")


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
    scan: Scan = "fused"
    remat_chunk_length: int | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        check_scan(self.scan, self.remat_chunk_length)
        super().__post_init__()

    @nn.compact
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
        dtype = getattr(self.cell, "dtype", None)
        hidden = nn.elu(nn.Dense(self.cell.features, dtype=dtype, name="input_projection")(x))
        stack = LARNN(
            self.cell,
            num_layers=self.num_layers,
            residual_stacking=self.residual_stacking,
            scan=self.scan,
            remat_chunk_length=self.remat_chunk_length,
            name="recurrent",
        )
        sequence = stack(hidden, deterministic=deterministic, seq_lengths=seq_lengths)
        last = last_valid_step(sequence, seq_lengths)
        return nn.Dense(self.num_classes, dtype=dtype, name="classifier")(last)

    def initialize_carries(self, batch_shape: tuple[int, ...]) -> tuple[Carry, ...]:
        """The initial carry of every layer (a tuple of ``num_layers``) for a batch of shape
        ``batch_shape``, as :meth:`step` takes them: each cell's ``initialize_carry``.

        Needs no variables: call it on the model (or with ``model.apply(variables, batch_shape,
        method="initialize_carries")``).
        """
        cell = self.cell.clone(parent=None, name=None)
        input_shape = (*batch_shape, self.cell.features)  # what every layer reads
        return tuple(
            cell.initialize_carry(jax.random.key(0), input_shape) for _ in range(self.num_layers)
        )

    def step(self, carries: tuple[Carry, ...], x: jax.Array) -> tuple[tuple[Carry, ...], jax.Array]:
        """One time step of the whole network in evaluation mode (running statistics, no
        dropout): ``x`` ``(*batch, D)`` at step ``t`` → (the carries after it, logits
        ``(*batch, C)`` of the sequence that ends at ``t``).

        The input projection, every layer's cell with residual stacking, and the classifier on
        the last layer's ``h_t``: stepping a sequence from :meth:`initialize_carries` gives, at its
        last step, the logits of ``__call__(x, deterministic=True)`` to float rounding. Apply it
        with ``model.apply(variables, carries, x, method="step")``; ``jax.jit`` and ``jax.vmap``
        work through it.
        """
        if len(carries) != self.num_layers:
            raise ValueError(f"carries has {len(carries)} entries for {self.num_layers} layers")
        variables = self.variables
        dtype = getattr(self.cell, "dtype", None)
        projection = nn.Dense(self.cell.features, dtype=dtype, parent=None)
        hidden = nn.elu(projection.apply({"params": variables["params"]["input_projection"]}, x))
        cell = _with_mode(self.cell, deterministic=True)
        new_carries = []
        for index, carry in enumerate(carries):
            path = [part.format(index=index) for part in CELL_PATH]
            cell_variables = {
                collection: functools.reduce(operator.getitem, path, tree)
                for collection, tree in variables.items()
            }
            carry, output = cell.apply(cell_variables, carry, hidden)
            new_carries.append(carry)
            if self.residual_stacking and output.shape[-1] == hidden.shape[-1]:
                output = hidden + output.astype(hidden.dtype)  # as the LARNN stack sums
            hidden = output
        classifier = nn.Dense(self.num_classes, dtype=dtype, parent=None)
        logits = classifier.apply({"params": variables["params"]["classifier"]}, hidden)
        return tuple(new_carries), logits
