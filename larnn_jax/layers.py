"""Recurrent layers: a cell scanned over a sequence, and stacks of them (``docs/model.md``, §3).

Shapes: batch ``B``, time ``T``, input features ``D``, hidden features ``H``.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import PRNGKey

from larnn_jax.cell import LARNNCell
from larnn_jax.ops.fused_rnn import FusedRNN
from larnn_jax.ops.remat_rnn import remat_rnn

Carry = Any
Scan = Literal["fused", "plain", "remat"]
SCANS: tuple[str, ...] = ("fused", "plain", "remat")


def _with_mode(cell: nn.RNNCellBase, deterministic: bool | None) -> nn.RNNCellBase:
    """A fresh, unbound copy of ``cell``, switched to ``deterministic`` where it has that switch."""
    overrides: dict[str, Any] = {"parent": None, "name": None}
    if deterministic is not None and hasattr(cell, "deterministic"):
        overrides["deterministic"] = deterministic
    return cell.clone(**overrides)


class LARNNLayer(nn.Module):
    """Runs a recurrent cell over a sequence, with the scan set up for batch norm in the loop.

    A bare ``nn.RNN(LARNNCell(...))`` does not carry the ``batch_stats`` collection through its
    scan, so cells with ``norm='batch'`` cannot update (nor even read) their statistics in it.
    This layer picks the scan's arguments from the cell's mode:

    * training (``deterministic=False``): the statistics are carried through the scan and
      updated at every step, a fresh dropout rng at every step; apply the model with
      ``mutable=['batch_stats']``.
    * evaluation (``deterministic=True``): the statistics are read-only.

    It accepts the same call arguments as ``nn.RNN``, so it also fits ``nn.Bidirectional``.

    How the sequence is scanned (``scan``; every strategy has the same variables and gives the
    same results to float rounding, except that dropout masks are other draws):

    * ``'fused'`` (default): for a :class:`~larnn_jax.LARNNCell`,
      :class:`~larnn_jax.ops.fused_rnn.FusedRNN`: the input projections of all steps in one
      product, the window in buffers written once per step, and a gradient that keeps ``O(T·H)``
      per sample instead of every step's ``(B, k-1, H)`` window. Other cells run as ``'plain'``.
    * ``'plain'``: ``nn.RNN`` over the cell. Differentiating it stores every step's carry: for
      a LARNN cell, ``T·k`` window entries per sample.
    * ``'remat'``: training scans in chunks of ``remat_chunk_length`` steps, keeping only each
      chunk's first carry and recomputing the chunk in the backward pass
      (:func:`~larnn_jax.ops.remat_rnn.remat_rnn`): ``T/N + N`` carries for about one more
      forward pass of time. Evaluation runs as ``'plain'``.

    Attributes:
      cell: the cell to scan: :class:`~larnn_jax.LARNNCell`, :class:`~larnn_jax.BNLSTMCell` or
        any Flax ``RNNCellBase`` (cells without a ``deterministic`` attribute are used as is).
      scan: ``'fused'``, ``'plain'`` or ``'remat'`` (see above).
      remat_chunk_length: ``N`` for ``scan='remat'``; ``T`` must be a multiple of it.
      reverse, keep_order, return_carry: defaults for the call arguments of the same names.
    """

    cell: nn.RNNCellBase
    scan: Scan = "fused"
    remat_chunk_length: int | None = None
    reverse: bool = False
    keep_order: bool = False
    return_carry: bool = False

    def __post_init__(self) -> None:
        check_scan(self.scan, self.remat_chunk_length)
        super().__post_init__()

    @nn.compact
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
          return_carry: also return the final carry.
          time_major, reverse, keep_order: as for ``nn.RNN``.

        Returns:
          Outputs ``(B, T, H)`` (or ``(T, B, H)``), preceded by the final carry when
          ``return_carry``.
        """
        cell = _with_mode(self.cell, deterministic)
        if inputs.ndim != 3:
            raise ValueError(
                f"{type(self).__name__} expects inputs of rank 3, (batch, time, features) or "
                f"(time, batch, features) with time_major=True; got shape {inputs.shape}"
            )
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
        call = dict(
            initial_carry=initial_carry,
            init_key=init_key,
            seq_lengths=seq_lengths,
            return_carry=self.return_carry if return_carry is None else return_carry,
            time_major=bool(time_major),
            reverse=self.reverse if reverse is None else reverse,
            keep_order=self.keep_order if keep_order is None else keep_order,
        )
        if self.is_initializing():  # the plain scan creates every variable
            strategy = "plain"
        elif self.scan == "fused" and isinstance(cell, LARNNCell):
            return FusedRNN(cell, name="rnn")(inputs, **call)
        elif self.scan == "remat" and training:
            strategy = "remat"
        else:
            strategy = "plain"
        if training:
            scan_options: dict[str, Any] = dict(
                variable_broadcast="params",
                variable_carry="batch_stats",
                split_rngs={"params": False, "dropout": True},
            )
        else:
            scan_options = dict(
                variable_broadcast=("params", "batch_stats"), split_rngs={"params": False}
            )
        if strategy == "remat":
            return remat_rnn(
                cell, self.remat_chunk_length, scan_options, inputs, name="rnn", **call
            )
        return nn.RNN(cell, name="rnn", **scan_options)(inputs, **call)


def check_scan(scan: str, remat_chunk_length: int | None) -> None:
    """Raises ``ValueError`` naming the problem unless ``scan`` is one of :data:`SCANS` and
    ``remat_chunk_length`` is a positive integer exactly when ``scan == 'remat'``."""
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
    if scan == "remat" and (remat_chunk_length is None or remat_chunk_length < 1):
        raise ValueError(f"scan='remat' needs remat_chunk_length >= 1, got {remat_chunk_length}")
    if scan != "remat" and remat_chunk_length is not None:
        raise ValueError(
            f"remat_chunk_length={remat_chunk_length} is only used with scan='remat', not {scan!r}"
        )


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
    scan: Scan = "fused"
    remat_chunk_length: int | None = None

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        check_scan(self.scan, self.remat_chunk_length)
        super().__post_init__()

    @nn.compact
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
        if initial_carries is not None and len(initial_carries) != self.num_layers:
            raise ValueError(
                f"initial_carries has {len(initial_carries)} entries for {self.num_layers} layers"
            )
        sequence = inputs
        carries = []
        for index in range(self.num_layers):
            layer = LARNNLayer(
                self.cell,
                scan=self.scan,
                remat_chunk_length=self.remat_chunk_length,
                name=f"layer_{index}",
            )
            carry, outputs = layer(
                sequence,
                deterministic=deterministic,
                initial_carry=None if initial_carries is None else initial_carries[index],
                seq_lengths=seq_lengths,
                return_carry=True,
            )
            carries.append(carry)
            if self.residual_stacking and outputs.shape[-1] == sequence.shape[-1]:
                outputs = sequence + outputs.astype(sequence.dtype)
            sequence = outputs
        if return_carries:
            return tuple(carries), sequence
        return sequence


def last_valid_step(sequence: jax.Array, seq_lengths: jax.Array | None) -> jax.Array:
    """``(B, T, F)`` → ``(B, F)``: the last step of each sequence (``seq_lengths - 1``)."""
    if seq_lengths is None:
        return sequence[:, -1]
    return jnp.take_along_axis(sequence, (seq_lengths - 1)[:, None, None], axis=1)[:, 0]
