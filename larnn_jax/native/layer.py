"""A LARNN layer's scan as two native calls: the forward pass over the whole sequence, and its
backward pass, registered with XLA through its FFI and joined by a ``jax.custom_vjp``.

What runs natively is the recurrence (``csrc/forward.h``, ``csrc/backward.h``): every step's
products with the recurrent weights, the window's attention and statistics, the batch norms
(coupling the samples of the batch at every step), the LSTM update and the dropout masks (drawn
from the same keys, with the same Threefry bits as :func:`larnn_jax.cell.dropout_keep_mask`).
The input terms ``W_q^x x_t + b_q`` and ``W_x x_t + b`` are computed step by step with the
recurrent products, in the same pass. What does not depend on the previous step stays with XLA:
the weights' gradients and the input sequence's cotangent, one product over all ``T·B`` rows each,
from the activations and pre-activation cotangents that the native backward pass writes out.

Shapes: time ``T``, batch ``B``, input features ``D``, features ``H``, window ``k``; ``S`` is 4
where the window carries moment sums, else 0.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from larnn_jax.cell import LARNNCarry, LARNNCell, dropout_keep_threshold
from larnn_jax.native import build
from larnn_jax.typing import PyTree
from larnn_jax.window import WindowState, positional_encoding


class Config(NamedTuple):
    """The static attributes of a native call (see ``csrc/layout.h``, ``Options``)."""

    features: int
    num_heads: int
    window_size: int
    training: bool
    positional: bool
    activation: bool
    kv_levels: int
    attention_levels: int
    output_levels: int
    threads: int


class Weights(NamedTuple):
    """The cell's parameters the recurrence reads, natural order (differentiated).

    ``positions``: ``(2, k, H)``, the positional encoding projected by ``W_kp`` and ``W_vp``
    (zeros without it); ``norms``: the norms' scales and biases concatenated (``NormOffsets``).
    """

    query_input_kernel: jax.Array  # (D, H): W_q^x
    query_bias: jax.Array  # (H,)
    gate_input_kernel: jax.Array  # (D, 4H): W_x
    gate_bias: jax.Array  # (4H,)
    query_kernel: jax.Array
    hidden_kernel: jax.Array
    attention_kernel: jax.Array
    key_kernel: jax.Array
    key_bias: jax.Array
    value_kernel: jax.Array
    value_bias: jax.Array
    output_kernel: jax.Array
    output_bias: jax.Array
    positions: jax.Array
    norms: jax.Array


class Inputs(NamedTuple):
    """The layer's input sequence and the initial carry (differentiated)."""

    sequence: jax.Array  # (T, B, D)
    h: jax.Array  # (B, H)
    c: jax.Array  # (B, H)
    window_keys: jax.Array  # (B, k-1, H)
    window_values: jax.Array  # (B, k-1, H)
    moment_sums: jax.Array  # (B, S, H)


class Constants(NamedTuple):
    """What the call reads but is not differentiated."""

    window_count: jax.Array  # (B,) int32: the initial window's filled entries
    keys: jax.Array  # (T + 1, 3, 2) uint32: each step's entering, attention and output keys
    last: jax.Array  # (B,) int32: the step after which each sample's final carry is taken
    running: jax.Array  # (18 H,): the running averages (``RunningOffsets``)


class Results(NamedTuple):
    outputs: jax.Array  # (T, B, H)
    cells: jax.Array  # (T, B, H)
    final_keys: jax.Array  # (B, k-1, H)
    final_values: jax.Array  # (B, k-1, H)
    final_sums: jax.Array  # (B, S, H)
    running: jax.Array  # (18 H,)


def _attributes(config: Config, save_residuals: bool) -> dict[str, np.int64]:
    values = {**config._asdict(), "save_residuals": save_residuals}
    return {name: np.int64(value) for name, value in values.items()}


def _residual_size(config: Config, inputs: Inputs, full: bool) -> int:
    steps, batch, _ = inputs.sequence.shape
    return build.load().larnn_residual_size(
        batch,
        steps,
        config.features,
        config.num_heads,
        config.window_size,
        inputs.sequence.dtype == jnp.float64,
        config.positional,
        config.activation,
        full,
    )


def _forward_arguments(weights: Weights, inputs: Inputs, constants: Constants) -> list[jax.Array]:
    """The forward call's buffers, in ``larnn_ffi.cc``'s ``ForwardArgument`` order."""
    return [
        *inputs[:5],
        constants.window_count,
        inputs.moment_sums,
        constants.keys,
        constants.last,
        *weights,
        constants.running,
    ]


def _forward(
    config: Config, weights: Weights, inputs: Inputs, constants: Constants, save: bool
) -> tuple[Results, jax.Array]:
    steps, batch, _ = inputs.sequence.shape
    features = config.features
    dtype = inputs.sequence.dtype

    def shaped(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    kept = config.window_size - 1
    shapes = (  # the fields of Results, then the residual
        shaped(steps, batch, features),
        shaped(steps, batch, features),
        shaped(batch, kept, features),
        shaped(batch, kept, features),
        shaped(*inputs.moment_sums.shape),
        shaped(*constants.running.shape),
        shaped(_residual_size(config, inputs, save)),
    )
    call = jax.ffi.ffi_call("larnn_forward", shapes, vmap_method="sequential")
    *values, residual = call(
        *_forward_arguments(weights, inputs, constants), **_attributes(config, save)
    )
    return Results(*values), residual


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer(config: Config, weights: Weights, inputs: Inputs, constants: Constants) -> Results:
    return _forward(config, weights, inputs, constants, save=False)[0]


def _layer_forward(
    config: Config, weights: Weights, inputs: Inputs, constants: Constants
) -> tuple[Results, tuple]:
    results, residual = _forward(config, weights, inputs, constants, save=True)
    return results, (weights, inputs, constants, results.outputs, results.cells, residual)


def _layer_backward(
    config: Config, saved: tuple, d_results: Results
) -> tuple[Weights, Inputs, Constants]:
    weights, inputs, constants, outputs, cells, residual = saved
    steps, batch, _ = inputs.sequence.shape
    features = config.features
    dtype = inputs.sequence.dtype

    def shaped(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    rows = (steps, batch)
    kept = config.window_size - 1
    size = build.load().larnn_backward_scratch_size(
        batch, steps, features, config.num_heads, config.window_size, dtype == jnp.float64
    )
    call = jax.ffi.ffi_call(
        "larnn_backward",
        (
            shaped(*rows, features),  # d query (pre-activation)
            shaped(*rows, 4 * features),  # d gates (before their norm)
            shaped(*rows, features),  # d (W_o attended + b_o)
            shaped(*rows, 2 * features),  # d entries (pre-activation), keys then values
            # the weights' gradients' left operands, transposed: (H, T·B)
            shaped(features, steps * batch),  # a_t
            shaped(features, steps * batch),  # attended
            shaped(features, steps * batch),  # c_{t-1} after key/value dropout
            shaped(features, steps * batch),  # h_{t-1}
            shaped(*weights.norms.shape),
            shaped(*weights.positions.shape),
            shaped(batch, features),
            shaped(batch, features),
            shaped(batch, kept, features),
            shaped(batch, kept, features),
            shaped(*inputs.moment_sums.shape),
            shaped(size),
        ),
        vmap_method="sequential",
    )
    (
        d_query,
        d_gates,
        d_attention,
        d_entries,
        activated,
        attended,
        dropped,
        h_before,
        d_norms,
        d_positions,
        d_h,
        d_c,
        d_window_keys,
        d_window_values,
        d_sums,
        _,
    ) = call(
        *_forward_arguments(weights, inputs, constants),
        outputs,
        cells,
        residual,
        *d_results[:5],
        **_attributes(config, True),
    )

    # The weights' gradients: one product over all T·B rows each, the left operand laid out
    # (H, T·B) by the native pass so that XLA does not transpose either operand.
    def product(transposed: jax.Array, b: jax.Array) -> jax.Array:
        return transposed @ b.reshape(steps * batch, -1)

    d_keys, d_values = jnp.split(d_entries, 2, axis=-1)
    # The input terms' cotangents are those of the pre-activations they are part of.
    sequence = inputs.sequence
    d_sequence = d_query @ weights.query_input_kernel.T + d_gates @ weights.gate_input_kernel.T
    d_weights = Weights(
        query_input_kernel=jnp.einsum("tbd,tbh->dh", sequence, d_query),
        query_bias=jnp.sum(d_query, axis=(0, 1)),
        gate_input_kernel=jnp.einsum("tbd,tbh->dh", sequence, d_gates),
        gate_bias=jnp.sum(d_gates, axis=(0, 1)),
        query_kernel=product(h_before, d_query),
        hidden_kernel=product(h_before, d_gates),
        attention_kernel=product(activated, d_gates),
        key_kernel=product(dropped, d_keys),
        key_bias=jnp.sum(d_keys, axis=(0, 1)),
        value_kernel=product(dropped, d_values),
        value_bias=jnp.sum(d_values, axis=(0, 1)),
        output_kernel=product(attended, d_attention),
        output_bias=jnp.sum(d_attention, axis=(0, 1)),
        positions=d_positions,
        norms=d_norms,
    )
    d_inputs = Inputs(d_sequence, d_h, d_c, d_window_keys, d_window_values, d_sums)
    d_constants = Constants(
        window_count=_no_cotangent(constants.window_count),
        keys=_no_cotangent(constants.keys),
        last=_no_cotangent(constants.last),
        running=jnp.zeros_like(constants.running),
    )
    return d_weights, d_inputs, d_constants


def _no_cotangent(x: jax.Array) -> Any:
    """The cotangent of an integer input: zeros of dtype ``float0``."""
    return np.zeros(x.shape, jax.dtypes.float0)


_layer.defvjp(_layer_forward, _layer_backward)


# ---------------------------------------------------------------------------------------------
# From the cell's variables


def _norm_parts(
    cell: LARNNCell, params: PyTree, stats: PyTree, dtype: DTypeLike
) -> tuple[jax.Array, jax.Array]:
    """The norms' parameters (``NormOffsets``) and running averages (``RunningOffsets``)."""
    features = cell.features
    ones, zeros = jnp.ones(features, dtype), jnp.zeros(features, dtype)
    update, update_stats = params["update"], stats.get("update", {})

    def parameter(tree: PyTree, name: str, part: str, default: jax.Array) -> jax.Array:
        return tree[name][part] if name in tree else default

    norms = jnp.concatenate(
        [
            parameter(params, "key_norm", "scale", ones),
            parameter(params, "value_norm", "scale", ones),
            parameter(params, "value_norm", "bias", zeros),
            params["attention_norm"]["scale"],
            params["attention_norm"]["bias"],
            update["gate_norm"]["scale"],
            update["gate_norm"]["bias"],
            update["cell_norm"]["scale"],
            update["cell_norm"]["bias"],
            update["hidden_norm"]["scale"],
            update["hidden_norm"]["bias"],
        ]
    )
    running = jnp.concatenate(
        [
            parameter(stats, "key_norm", "mean", zeros),
            parameter(stats, "key_norm", "var", ones),
            parameter(stats, "value_norm", "mean", zeros),
            parameter(stats, "value_norm", "var", ones),
            stats["attention_norm"]["mean"],
            stats["attention_norm"]["var"],
            update_stats["gate_norm"]["mean"],
            update_stats["gate_norm"]["var"],
            update_stats["cell_norm"]["mean"],
            update_stats["cell_norm"]["var"],
            update_stats["hidden_norm"]["mean"],
            update_stats["hidden_norm"]["var"],
        ]
    ).astype(dtype)
    return norms, running


def _with_running(stats: PyTree, running: jax.Array, features: int) -> PyTree:
    """``stats`` with the running averages of ``running`` (``RunningOffsets`` order)."""
    sizes = {"gate_norm": 4 * features}
    order = ("key_norm", "value_norm", "attention_norm", "gate_norm", "cell_norm", "hidden_norm")
    offset, parts = 0, {}
    for name in order:
        size = sizes.get(name, features)
        parts[name] = {"mean": running[offset : offset + size]}
        parts[name]["var"] = running[offset + size : offset + 2 * size]
        offset += 2 * size

    def replace(tree: PyTree) -> PyTree:
        result = {}
        for name, value in tree.items():
            if name in parts and not isinstance(value.get("mean"), dict):
                result[name] = {k: parts[name][k].astype(v.dtype) for k, v in value.items()}
            else:
                result[name] = replace(value)
        return result

    return replace(stats)


def _weights(cell: LARNNCell, params: PyTree, norms: jax.Array, dtype: DTypeLike) -> Weights:
    features = cell.features
    if cell.mode == "residual":
        gate_input, gate_bias = params["input_gates"]["kernel"], params["input_gates"]["bias"]
        hidden = params["hidden_gates"]["kernel"]
        attention = params["attention_gates"]["kernel"]
    else:  # one kernel on [x ; h ; a]
        gates, gate_bias = params["gates"]["kernel"], params["gates"]["bias"]
        gate_input = gates[: -2 * features]
        hidden, attention = gates[-2 * features : -features], gates[-features:]
    query = params["query"]
    if cell.use_positional_encoding:
        table = jnp.asarray(positional_encoding(cell.window_size, dtype))
        positions = jnp.stack(
            [table @ params[name]["kernel"] for name in ("key_position", "value_position")]
        )
    else:
        positions = jnp.zeros((2, cell.window_size, features), dtype)
    key = params["key"]
    return Weights(
        query_input_kernel=query["kernel"][:-features],
        query_bias=query["bias"],
        gate_input_kernel=gate_input,
        gate_bias=gate_bias,
        query_kernel=query["kernel"][-features:],
        hidden_kernel=hidden,
        attention_kernel=attention,
        key_kernel=key["kernel"],
        key_bias=key["bias"] if "bias" in key else jnp.zeros(features, dtype),
        value_kernel=params["value"]["kernel"],
        value_bias=params["value"]["bias"],
        output_kernel=params["attention_output"]["kernel"],
        output_bias=params["attention_output"]["bias"],
        positions=positions,
        norms=norms,
    )


def dropout_levels(cell: LARNNCell) -> tuple[int, int, int]:
    """The keep thresholds of the key/value, attention and output dropouts (``2^16``: none)."""
    rates = (cell.kv_dropout_rate, cell.attention_dropout_rate, cell.dropout_rate)
    kv, attention, output = (
        dropout_keep_threshold(0.0 if cell.deterministic else r) for r in rates
    )
    return kv, attention, output


def _draw_entering_key(module: LARNNCell) -> jax.Array:
    return module.make_rng("dropout")


def _draw_step_keys(module: LARNNCell) -> tuple[jax.Array, jax.Array]:
    return module.make_rng("dropout"), module.update.make_rng("dropout")


def mask_keys(cell: LARNNCell, keys: jax.Array, impl: Any) -> jax.Array:
    """``(T + 1, 3, 2)`` uint32: the keys of the masks each step draws, derived from the scan's
    per-step keys ``(T + 1, 2, ...)`` (entering, advancing) as ``make_rng('dropout')`` derives
    them inside ``cell.apply(..., method='enter' / 'step_over_window')``: the key/value mask
    from the entering key in the cell's scope, the attention mask from the advancing key in the
    cell's scope and the output mask from it in the ``update`` submodule's."""
    cell = cell.clone(parent=None)

    def derive(data: jax.Array) -> jax.Array:
        entering, advancing = jax.random.wrap_key_data(data, impl=impl)
        kv = cast(jax.Array, cell.apply({}, method=_draw_entering_key, rngs={"dropout": entering}))
        attention, output = cast(
            tuple[jax.Array, jax.Array],
            cell.apply({}, method=_draw_step_keys, rngs={"dropout": advancing}),
        )
        return jnp.stack([jax.random.key_data(k) for k in (kv, attention, output)])

    return jax.vmap(derive)(keys)


def threads() -> int:
    """Threads per native call: ``$LARNN_JAX_NATIVE_THREADS``, else the cores this process may
    use (at most 8)."""
    explicit = os.environ.get("LARNN_JAX_NATIVE_THREADS")
    if explicit:
        return max(1, int(explicit))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def run(
    cell: LARNNCell,
    params: PyTree,
    stats: PyTree,
    carry: LARNNCarry,
    sequence: jax.Array,
    keys: jax.Array | None,
    last: jax.Array,
) -> tuple[jax.Array, LARNNCarry, PyTree]:
    """Runs ``cell`` (a covered configuration, see :func:`larnn_jax.native.why_not_covered`)
    over a sequence natively.

    Args:
      cell: the cell, in the mode to run (``deterministic``).
      params, stats: its ``params`` and ``batch_stats`` collections.
      carry: the initial carry.
      sequence: the inputs ``(T, B, D)`` (their number of features checked by the caller).
      keys: ``(T + 1, 3, 2)`` uint32 from :func:`mask_keys`, or None without dropout.
      last: ``(B,)`` int, the step after which each sample's final carry is taken.

    Returns:
      The outputs ``(T, B, H)``, the final carry and the running statistics after the sequence
      (``stats`` itself in evaluation).
    """
    dtype = sequence.dtype
    steps, batch, _ = sequence.shape
    features = cell.features
    training = not cell.deterministic
    kv_levels, attention_levels, output_levels = dropout_levels(cell)
    config = Config(
        features=features,
        num_heads=cell.num_heads,
        window_size=cell.window_size,
        training=training,
        positional=cell.use_positional_encoding,
        activation=cell.activation_on_keys_and_values,
        kv_levels=kv_levels,
        attention_levels=attention_levels,
        output_levels=output_levels,
        threads=threads(),
    )
    norms, running = _norm_parts(cell, params, stats, dtype)
    weights = _weights(cell, params, norms, dtype)
    if keys is None:
        keys = jnp.zeros((steps + 1, 3, 2), jnp.uint32)
    last = jnp.asarray(last, jnp.int32)
    last = jnp.clip(jnp.where(last < 0, last + steps, last), 0, steps - 1)
    window = carry.window
    inputs = Inputs(
        sequence,
        carry.h,
        carry.c,
        window.key_entries,
        window.value_entries,
        window.moment_sums,
    )
    constants = Constants(window.count.astype(jnp.int32), keys, last, running)
    results = _layer(config, weights, inputs, constants)
    rows = jnp.arange(batch)
    final = LARNNCarry(
        results.outputs[last, rows],
        results.cells[last, rows],
        WindowState(
            results.final_keys,
            results.final_values,
            jnp.minimum(window.count + last + 1, cell.window_size - 1),
            results.final_sums,
        ),
    )
    new_stats = _with_running(stats, results.running, features) if training and stats else stats
    return results.outputs, final, new_stats
