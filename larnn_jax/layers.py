"""Recurrent layers: a cell scanned over a sequence, and stacks of them (``docs/model.md``, §3).

Shapes: batch ``B``, time ``T``, input features ``D``, hidden features ``H``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.recurrent import flip_sequences
from flax.typing import PRNGKey

from larnn_jax.cell import LARNNCell
from larnn_jax.scans import Scan, ScanKind, check_scan, choose_scan
from larnn_jax.scans.fused import FusedScan
from larnn_jax.scans.plain import PlainScan, scan_options
from larnn_jax.scans.remat import RematScan
from larnn_jax.typing import Carry


class LARNNLayer(nn.Module):
    """Runs a recurrent cell over a sequence, with the scan set up for batch norm in the loop.

    A bare ``nn.RNN(LARNNCell(...))`` does not carry the ``batch_stats`` collection through its
    scan, so cells with ``norm='batch'`` cannot update (nor even read) their statistics in it.
    This layer sets the scan up from the cell's mode:

    * training (``deterministic=False``): the statistics are carried through the scan and
      updated at every step, a fresh dropout rng at every step; apply the model with
      ``mutable=['batch_stats']``.
    * evaluation (``deterministic=True``): the statistics are read-only.

    It accepts the same call arguments as ``nn.RNN``, so it also fits ``nn.Bidirectional``.
    ``scan`` chooses how the sequence is scanned (:mod:`larnn_jax.scans`: ``'auto'``,
    ``'native'``, ``'fused'``, ``'plain'``, ``'remat'``); every scan has the same variables and
    gives the same results to float rounding, except that dropout masks are other draws.

    Attributes:
      cell: the cell to scan: :class:`~larnn_jax.LARNNCell`, :class:`~larnn_jax.BNLSTMCell` or
        any Flax ``RNNCellBase`` (cells without a ``deterministic`` attribute are used as is).
      scan: how to scan (:func:`larnn_jax.scans.choose_scan` decides what ``'auto'`` runs).
      remat_chunk_length: ``N`` for ``scan='remat'``; ``T`` must be a multiple of it.
      reverse, keep_order, return_carry: defaults for the call arguments of the same names.
    """

    cell: nn.RNNCellBase
    scan: Scan = "auto"
    remat_chunk_length: int | None = None
    reverse: bool = False
    keep_order: bool = False
    return_carry: bool = False

    def __post_init__(self) -> None:
        check_scan(self.scan, self.remat_chunk_length)
        super().__post_init__()

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        initial_carry: Carry | None = None,
        init_key: PRNGKey | None = None,
        seq_lengths: jax.Array | None = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
    ) -> jax.Array | tuple[Carry, jax.Array]:
        """Runs the cell over ``inputs``.

        Args:
          inputs: ``(B, T, D)`` (``(T, B, D)`` with ``time_major=True``).
          deterministic: overrides the cell's ``deterministic`` for this call. Training mode
            is ``deterministic=False`` (the cell's own attribute when this is None); for cells
            without that attribute, such as ``nn.LSTMCell``, only this argument selects it.
          initial_carry: the carry to start from (default: the cell's ``initialize_carry``).
          init_key: rng for ``initialize_carry``.
          seq_lengths: ``(B,)`` int, length of each sequence; later steps are padding.
          return_carry: also return the final carry (after each sequence's last valid step).
          time_major, reverse, keep_order: as for ``nn.RNN``.

        Returns:
          Outputs ``(B, T, H)`` (or ``(T, B, H)``), preceded by the final carry when
          ``return_carry``.
        """
        if inputs.ndim != 3:
            raise ValueError(
                f"{type(self).__name__} expects inputs of rank 3, (batch, time, features) or "
                f"(time, batch, features) with time_major=True; got shape {inputs.shape}"
            )
        cell = self._cell_in_mode(deterministic)
        training = (
            not cell.deterministic if hasattr(cell, "deterministic") else deterministic is False
        )
        if training and self.variables.get("batch_stats"):
            if not self.is_mutable_collection("batch_stats"):
                raise ValueError(
                    "training mode (deterministic=False) updates the batch-norm statistics: "
                    "apply the model with mutable=['batch_stats'] (or pass deterministic=True "
                    "for evaluation)"
                )
        kind = choose_scan(self.scan, cell, training=training, dtype=inputs.dtype)
        time_major = bool(time_major)
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        x = inputs if time_major else jnp.swapaxes(inputs, 0, 1)  # (T, B, D)
        if reverse:
            x = flip_sequences(x, seq_lengths, num_batch_dims=1, time_major=True)
        scan = self._scan(kind, cell, training)
        carry, outputs = scan(x, initial_carry, init_key, seq_lengths)
        if reverse and keep_order:
            outputs = flip_sequences(outputs, seq_lengths, num_batch_dims=1, time_major=True)
        if not time_major:
            outputs = jnp.swapaxes(outputs, 0, 1)
        if self.return_carry if return_carry is None else return_carry:
            return carry, outputs
        return outputs

    def step(self, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
        """One time step of the cell in evaluation mode: ``x`` ``(*batch, D)`` → (the carry after
        it, the output ``(*batch, H)``), with the variables of the whole-sequence call."""
        scan = self._scan("plain", self._cell_in_mode(True), training=False)
        assert isinstance(scan, PlainScan)
        return scan.step(carry, x)

    def _cell_in_mode(self, deterministic: bool | None) -> nn.RNNCellBase:
        """A fresh, unbound copy of the cell, switched to ``deterministic`` where it has that
        switch (the scan adopts it as its ``cell``)."""
        overrides: dict[str, Any] = {"parent": None, "name": None}
        if deterministic is not None and hasattr(self.cell, "deterministic"):
            overrides["deterministic"] = deterministic
        return self.cell.clone(**overrides)

    @nn.compact
    def _scan(self, kind: ScanKind, cell: nn.RNNCellBase, training: bool) -> PlainScan | FusedScan:
        """The scan ``kind`` over ``cell``: the submodule ``rnn``, with the cell under it as
        ``cell`` (as in ``nn.RNN``), so that every scan reads the same variables. Called as
        ``scan(inputs (T, B, D), initial_carry, init_key, seq_lengths)`` → the final carry and
        the outputs ``(T, B, H)``."""
        if kind in ("fused", "native"):
            assert isinstance(cell, LARNNCell)  # choose_scan
            return FusedScan(cell, native=kind == "native", name="rnn")
        options = scan_options(training)
        if kind == "remat":
            assert self.remat_chunk_length is not None  # check_scan
            return RematScan(cell, chunk_length=self.remat_chunk_length, name="rnn", **options)
        return PlainScan(cell, name="rnn", **options)


class LARNN(nn.Module):
    """A stack of recurrent layers, each with its own parameters and carry (``docs/model.md``, §3).

    Layer ``l`` reads the output sequence of layer ``l - 1``. With ``residual_stacking``,
    ``s_l = s_{l-1} + layer_l(s_{l-1})`` wherever the widths agree (the first layer's sum is
    skipped when the input does not have ``H`` features); otherwise ``s_l = layer_l(s_{l-1})``.

    Example::

        stack = LARNN(LARNNCell(features=81, num_heads=27, window_size=38), num_layers=3)
        variables = stack.init(jax.random.key(0), x)                        # x: (B, T, D)
        y, updates = stack.apply(variables, x, deterministic=False,
                                 rngs={"dropout": key}, mutable=["batch_stats"])

    Attributes:
      cell: the cell every layer uses (each layer gets its own copy and parameters).
      num_layers: ``L >= 1``.
      residual_stacking: sum each layer's input into its output.
      scan, remat_chunk_length: how every layer scans its sequence (see :class:`LARNNLayer`).
    """

    cell: nn.RNNCellBase
    num_layers: int = 1
    residual_stacking: bool = True
    scan: Scan = "auto"
    remat_chunk_length: int | None = None

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        check_scan(self.scan, self.remat_chunk_length)
        super().__post_init__()

    def setup(self) -> None:
        self.layers = [
            LARNNLayer(
                self.cell,
                scan=self.scan,
                remat_chunk_length=self.remat_chunk_length,
                name=f"layer_{index}",
            )
            for index in range(self.num_layers)
        ]

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        initial_carries: tuple[Carry, ...] | None = None,
        seq_lengths: jax.Array | None = None,
        return_carries: bool = False,
    ) -> jax.Array | tuple[tuple[Carry, ...], jax.Array]:
        """Runs the stack.

        Args:
          inputs: ``(B, T, D)``.
          deterministic: overrides the cells' ``deterministic`` for this call.
          initial_carries: one carry per layer (default: each cell's initial carry).
          seq_lengths: ``(B,)`` int, length of each sequence.
          return_carries: also return the final carry of every layer.

        Returns:
          The last layer's output sequence ``(B, T, H)``, preceded by the tuple of final carries
          when ``return_carries``.
        """
        self._check_carries(initial_carries)
        sequence = inputs
        carries = []
        for index, layer in enumerate(self.layers):
            carry, outputs = layer(
                sequence,
                deterministic=deterministic,
                initial_carry=None if initial_carries is None else initial_carries[index],
                seq_lengths=seq_lengths,
                return_carry=True,
            )
            carries.append(carry)
            sequence = self._stacked(sequence, outputs)
        if return_carries:
            return tuple(carries), sequence
        return sequence

    def initialize_carries(self, batch_shape: tuple[int, ...]) -> tuple[Carry, ...]:
        """Every layer's initial carry, for a batch of shape ``batch_shape`` (all layers read
        ``H`` features, the cell's ``features``), as :meth:`step` takes them. Needs no
        variables."""
        cell = self.cell.clone(parent=None, name=None)
        input_shape = (*batch_shape, self.cell.features)
        return tuple(
            cell.initialize_carry(jax.random.key(0), input_shape) for _ in range(self.num_layers)
        )

    def step(self, carries: tuple[Carry, ...], x: jax.Array) -> tuple[tuple[Carry, ...], jax.Array]:
        """One time step of the stack in evaluation mode: ``x`` ``(*batch, D)`` → (every layer's
        carry after it, the last layer's output ``(*batch, H)``).

        Stepping a sequence from :meth:`initialize_carries` gives, at every step, the outputs of
        ``__call__(x, deterministic=True)`` to float rounding.
        """
        self._check_carries(carries)
        new_carries = []
        for layer, carry in zip(self.layers, carries, strict=True):
            carry, output = layer.step(carry, x)
            new_carries.append(carry)
            x = self._stacked(x, output)
        return tuple(new_carries), x

    def _stacked(self, inputs: jax.Array, outputs: jax.Array) -> jax.Array:
        """A layer's result in the stack: ``inputs + outputs`` with ``residual_stacking`` where the
        widths agree, else ``outputs``."""
        if self.residual_stacking and outputs.shape[-1] == inputs.shape[-1]:
            return inputs + outputs.astype(inputs.dtype)
        return outputs

    def _check_carries(self, carries: tuple[Carry, ...] | None) -> None:
        if carries is not None and len(carries) != self.num_layers:
            raise ValueError(f"{len(carries)} carries given for {self.num_layers} layers")


def last_valid_step(sequence: jax.Array, seq_lengths: jax.Array | None) -> jax.Array:
    """``(B, T, F)`` → ``(B, F)``: the last step of each sequence (``seq_lengths - 1``)."""
    if seq_lengths is None:
        return sequence[:, -1]
    return jnp.take_along_axis(sequence, (seq_lengths - 1)[:, None, None], axis=1)[:, 0]
