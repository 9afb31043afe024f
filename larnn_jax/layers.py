"""Recurrent layers: a cell scanned over a sequence, and stacks of them (SPEC §3).

Shapes: batch ``B``, time ``T``, input features ``D``, hidden features ``H``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import PRNGKey

Carry = Any


class _ChunkRNN(nn.RNN):
    """``nn.RNN`` over one chunk of a sequence, in the ``(carry, x) -> (carry, y)`` form of a scan."""

    def __call__(self, carry: Carry, chunk: jax.Array) -> tuple[Carry, jax.Array]:  # type: ignore[override]
        return super().__call__(chunk, initial_carry=carry, return_carry=True)


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

    * training (``deterministic=False``): ``variable_carry='batch_stats'``, a fresh dropout rng
      at every step; apply the model with ``mutable=['batch_stats']``.
    * evaluation (``deterministic=True``): ``variable_broadcast=('params', 'batch_stats')``, the
      statistics read-only.

    It accepts the same call arguments as ``nn.RNN``, so it also fits ``nn.Bidirectional``.

    Memory: differentiating a scan stores every step's carry, and a LARNN carry holds the whole
    ``(B, k-1, H)`` window: ``T·k`` entries per sample. With ``checkpoint_every=N`` the training
    scan runs in chunks of ``N`` steps, keeps only each chunk's first carry and recomputes the
    chunk during the backward pass: ``T/N + N`` windows instead of ``T`` (``N ≈ sqrt(T)`` is
    best), for about one more forward pass of time. Without dropout the results are the plain
    scan's (to float rounding); with dropout the masks come from the same rng stream split per
    chunk, so they are different draws of the same distribution.

    Attributes:
      cell: the cell to scan: :class:`~larnn_jax.LARNNCell`, :class:`~larnn_jax.BNLSTMCell` or
        any Flax ``RNNCellBase`` (cells without a ``deterministic`` attribute are used as is).
      checkpoint_every: ``N``, chunk length of the rematerialised training scan (``None``: no
        rematerialisation). ``T`` must be a multiple of it; not with ``seq_lengths``. Applies
        in training mode only (see ``__call__``'s ``deterministic``).
      reverse, keep_order, return_carry: defaults for the call arguments of the same names.
    """

    cell: nn.RNNCellBase
    checkpoint_every: int | None = None
    reverse: bool = False
    keep_order: bool = False
    return_carry: bool = False

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
        if training and self.checkpoint_every is not None and not self.is_initializing():
            return _chunked_scan(
                self,
                cell,
                inputs,
                scan_options,
                initial_carry,
                init_key,
                seq_lengths,
                return_carry,
                time_major,
                reverse,
                keep_order,
            )
        rnn = nn.RNN(
            cell,
            return_carry=self.return_carry,
            reverse=self.reverse,
            keep_order=self.keep_order,
            name="rnn",
            **scan_options,
        )
        return rnn(
            inputs,
            initial_carry=initial_carry,
            init_key=init_key,
            seq_lengths=seq_lengths,
            return_carry=return_carry,
            time_major=time_major,
            reverse=reverse,
            keep_order=keep_order,
        )


class LARNN(nn.Module):
    """A stack of recurrent layers, each with its own parameters and carry (SPEC §3).

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
      checkpoint_every: rematerialise every layer's training scan in chunks of this many steps
        (see :class:`LARNNLayer`); ``None``: off.
    """

    cell: nn.RNNCellBase
    num_layers: int = 1
    residual_stacking: bool = True
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
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
                self.cell, checkpoint_every=self.checkpoint_every, name=f"layer_{index}"
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


def _chunked_scan(
    layer: LARNNLayer,
    cell: nn.RNNCellBase,
    inputs: jax.Array,
    scan_options: dict[str, Any],
    initial_carry: Carry | None,
    init_key: PRNGKey | None,
    seq_lengths: jax.Array | None,
    return_carry: bool | None,
    time_major: bool | None,
    reverse: bool | None,
    keep_order: bool | None,
) -> jax.Array | tuple[Carry, jax.Array]:
    """The training scan of ``layer`` in rematerialised chunks (see ``checkpoint_every``)."""
    every = layer.checkpoint_every
    steps = inputs.shape[0 if time_major else 1]
    if seq_lengths is not None or (reverse if reverse is not None else layer.reverse):
        raise ValueError("checkpoint_every does not support seq_lengths or reverse")
    if every < 1 or steps % every:
        raise ValueError(
            f"checkpoint_every={every} must be >= 1 and divide the sequence length {steps}"
        )
    batch_major = jnp.swapaxes(inputs, 0, 1) if time_major else inputs
    if initial_carry is None:
        shape = batch_major.shape[:1] + batch_major.shape[2:]
        initial_carry = cell.initialize_carry(init_key or jax.random.key(0), shape)
    chunks = batch_major.reshape(
        batch_major.shape[0], steps // every, every, *batch_major.shape[2:]
    )
    scan_chunks = nn.scan(
        nn.remat(_ChunkRNN), in_axes=1, out_axes=1, length=steps // every, **scan_options
    )
    carry, outputs = scan_chunks(cell, name="rnn", **scan_options)(initial_carry, chunks)
    outputs = outputs.reshape(outputs.shape[0], steps, *outputs.shape[3:])
    if time_major:
        outputs = jnp.swapaxes(outputs, 0, 1)
    del keep_order  # only meaningful with reverse
    want_carry = return_carry if return_carry is not None else layer.return_carry
    return (carry, outputs) if want_carry else outputs


def last_valid_step(sequence: jax.Array, seq_lengths: jax.Array | None) -> jax.Array:
    """``(B, T, F)`` → ``(B, F)``: the last step of each sequence (``seq_lengths - 1``)."""
    if seq_lengths is None:
        return sequence[:, -1]
    return jnp.take_along_axis(sequence, (seq_lengths - 1)[:, None, None], axis=1)[:, 0]
