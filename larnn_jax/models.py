"""The paper's sequence classifier (SPEC §3) with the recurrent block chosen by name.

    x (B, T, D) → elu(Dense_H(x)) → L stacked recurrent layers → h at the last step → Dense_C

Blocks: ``'larnn'`` (:class:`~larnn_jax.LARNNCell`), ``'bnlstm'`` (the same cell without
attention, :class:`~larnn_jax.BNLSTMCell`, to isolate what attention adds) and ``'lstm'``
(Flax's own ``nn.LSTMCell``, no normalisation and no dropout: the vanilla baseline).
"""

from __future__ import annotations

from typing import Literal

import jax
from flax import linen as nn
from flax.typing import Dtype

from larnn_jax.cell import BNLSTMCell, CellNormPlacement, LARNNCell, Mode
from larnn_jax.layers import LARNN, last_valid_step
from larnn_jax.normalization import NormKind

Block = Literal["larnn", "bnlstm", "lstm"]
BLOCKS: tuple[str, ...] = ("larnn", "bnlstm", "lstm")


class SequenceClassifier(nn.Module):
    """Classifies sequences ``(B, T, D)`` into ``num_classes`` logits ``(B, C)`` (SPEC §3).

    The attributes after ``block`` configure the recurrent cells (see
    :class:`~larnn_jax.LARNNCell`); those a block does not have are ignored by it.
    ``checkpoint_every`` rematerialises the training scans to save memory on long sequences
    (see :class:`~larnn_jax.LARNNLayer`).
    """

    num_classes: int
    block: Block = "larnn"
    features: int = 81
    num_layers: int = 3
    residual_stacking: bool = True
    num_heads: int = 27
    window_size: int = 38
    mode: Mode = "residual"
    use_positional_encoding: bool = False
    activation_on_keys_and_values: bool = True
    norm: NormKind = "batch"
    cell_norm_placement: CellNormPlacement = "output"
    dropout_rate: float = 0.0
    kv_dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype | None = None
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        super().__post_init__()

    def make_cell(self) -> nn.RNNCellBase:
        """The recurrent cell that every layer of the stack copies."""
        if self.block == "lstm":
            return nn.LSTMCell(self.features, dtype=self.dtype)
        if self.block == "bnlstm":
            return BNLSTMCell(
                self.features,
                norm=self.norm,
                cell_norm_placement=self.cell_norm_placement,
                dropout_rate=self.dropout_rate,
                dtype=self.dtype,
            )
        return LARNNCell(
            self.features,
            num_heads=self.num_heads,
            window_size=self.window_size,
            mode=self.mode,
            use_positional_encoding=self.use_positional_encoding,
            activation_on_keys_and_values=self.activation_on_keys_and_values,
            norm=self.norm,
            cell_norm_placement=self.cell_norm_placement,
            dropout_rate=self.dropout_rate,
            kv_dropout_rate=self.kv_dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            dtype=self.dtype,
        )

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
        hidden = nn.elu(nn.Dense(self.features, dtype=self.dtype, name="input_projection")(x))
        stack = LARNN(
            self.make_cell(),
            num_layers=self.num_layers,
            residual_stacking=self.residual_stacking,
            checkpoint_every=self.checkpoint_every,
            name="recurrent",
        )
        sequence = stack(hidden, deterministic=deterministic, seq_lengths=seq_lengths)
        last = last_valid_step(sequence, seq_lengths)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(last)
