"""A naive float64 NumPy reference of the LARNN cell, written straight from docs/model.md §1.

Nothing here is optimised: the window is a Python list of the raw cell states (newest first), and
at every step every entry is concatenated with its positional encoding, projected to a key and a
value, activated and normalised again. Batch-norm statistics over the window are taken over the
entries that are actually in the list, so masking holds by construction. It shares no code with
``larnn_jax`` and reads the parameters from the same tree layout (``variables["params"]["cell"]``
and ``variables["batch_stats"]["cell"]``), converted to float64 NumPy arrays.

Conventions (the parameter layout of ``larnn_jax.LARNNCell``):

- Dense layers compute ``x @ kernel + bias``; ``query`` reads ``[x_t ; h_{t-1}]``.
- ``key`` has a bias only with ``activation_on_keys_and_values`` (else ``b_k = 0``); ``key_norm``
  has a scale but no bias (``β_k = 0``). Both omitted terms would add a per-head constant to every
  score, which the softmax cancels.
- With positional encoding, ``key_position`` / ``value_position`` (``(2b, H)``, no bias) hold the
  rows of ``W_k`` / ``W_v`` that multiply ``pe(p)`` in ``W_k [c_j ; pe(p_j)]``.
- Heads are contiguous blocks of ``d_k = H / n`` features.
- ``residual`` mode: ``z = x @ input_gates.kernel + input_gates.bias + h @ hidden_gates.kernel +
  a @ attention_gates.kernel``; ``layer`` mode: ``z = [x ; h ; a] @ gates.kernel + gates.bias``.
  Gate order in ``z``: ``g, f, i, o``.
- Norms: ``"batch"`` normalises over every axis but the last with the biased variance (batch
  statistics in training, updating the running averages as ``r <- 0.99 r + 0.01 batch``; running
  averages in evaluation), ``"layer"`` over the last axis of each entry, ``"none"`` is the
  identity. ``eps = 1e-5``.
- Dropout draws nothing here: a training run's masks are given explicitly (``dropout_masks``,
  e.g. those the cell drew), as the factors inverted dropout multiplies by.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

EPS = 1e-5
MOMENTUM = 0.99

Tree = Mapping[str, Any]


def positional_encoding(window_size: int) -> np.ndarray:
    """docs/model.md §1's positional encoding, computed term by term in float64.

    Args:
      window_size: ``k >= 1``.

    Returns:
      ``(k, 2b)`` float64 array, ``b = ceil(log2(4k))``; row ``p - 1`` is ``pe(p)`` =
      ``[cos(2πp/2^i) for i = 1..b] ++ [sin(2πp/2^i) for i = 2..b+1]``.
    """
    b = math.ceil(math.log2(4 * window_size))
    rows = []
    for p in range(1, window_size + 1):
        cos = [math.cos(2.0 * math.pi * p / 2.0**i) for i in range(1, b + 1)]
        sin = [math.sin(2.0 * math.pi * p / 2.0**i) for i in range(2, b + 2)]
        rows.append(cos + sin)
    return np.array(rows, dtype=np.float64).reshape(window_size, 2 * b)


def elu(x: np.ndarray) -> np.ndarray:
    """ELU with ``alpha = 1``, any shape."""
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic sigmoid, any shape."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def softmax(s: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, any shape."""
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class _Norms:
    """The cell's normalisations, each looked up by its path in the parameter tree.

    In training with ``"batch"``, every call also records the updated running averages in
    ``self.stats`` (a deep copy of the given statistics).
    """

    def __init__(self, kind: str, params: Tree, batch_stats: Tree, train: bool):
        self.kind = kind
        self.params = params
        self.stats = copy.deepcopy(dict(batch_stats))
        self.train = train

    def __call__(self, path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
        """Normalises ``x`` (``(..., F)``) with the parameters at ``path``; returns ``(..., F)``."""
        if self.kind == "none":
            return x
        p = self.params
        for name in path:
            p = p[name]
        scale = p["scale"]
        bias = p.get("bias", 0.0)
        if self.kind == "layer":
            mean = x.mean(axis=-1, keepdims=True)
            var = x.var(axis=-1, keepdims=True)
        elif self.kind == "batch":
            stats = self.stats
            for name in path:
                stats = stats[name]
            if self.train:
                axes = tuple(range(x.ndim - 1))
                mean = x.mean(axis=axes)
                var = x.var(axis=axes)  # biased
                stats["mean"] = MOMENTUM * stats["mean"] + (1.0 - MOMENTUM) * mean
                stats["var"] = MOMENTUM * stats["var"] + (1.0 - MOMENTUM) * var
            else:
                mean, var = stats["mean"], stats["var"]
        else:
            raise ValueError(f"unknown norm {self.kind!r}")
        return (x - mean) / np.sqrt(var + EPS) * scale + bias


def _as_float64(tree: Tree) -> dict:
    """Deep copy of a nested mapping of arrays, as float64 NumPy arrays."""
    return {
        k: _as_float64(v) if isinstance(v, Mapping) else np.asarray(v, dtype=np.float64)
        for k, v in tree.items()
    }


def larnn_reference(
    params: Tree,
    batch_stats: Tree,
    x: np.ndarray,
    *,
    num_heads: int,
    window_size: int,
    mode: str,
    use_positional_encoding: bool,
    activation_on_keys_and_values: bool,
    norm: str,
    train: bool,
    cell_norm_placement: str = "output",
    dropout_masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Runs the LARNN cell naively over a sequence, from the zero carry.

    Args:
      params: the cell's parameters, ``variables["params"]["cell"]``.
      batch_stats: the cell's running statistics, ``variables["batch_stats"]["cell"]`` (``{}``
        without batch norm).
      x: ``(B, T, D)`` inputs.
      num_heads, window_size, mode, use_positional_encoding, activation_on_keys_and_values,
        norm: as in ``LARNNCell``.
      train: batch statistics (and running-average updates) if ``True``, running averages if
        ``False``.
      cell_norm_placement: ``"output"``: the cell state is carried (and enters the window) as
        ``c_t = f*c + i*g`` and ``h_t = BN_h(o * elu(BN_c(c_t)))``; ``"carried"`` (the paper's
        formula): ``c_t = BN_c(f*c + i*g)`` is carried and ``h_t = BN_h(o * elu(c_t))``.
      dropout_masks: the dropout of a training run, as the factors that inverted dropout
        multiplies by (``0`` where dropped, ``1 / (1 - rate)`` where kept), per step ``t``:
        ``"key_value"`` ``(T, B, H)`` multiplies ``c_{t-1}`` as it enters the window at step ``t``
        (the entry keeps it while it stays); ``"attention"`` ``(T, B, k, n)`` multiplies the
        attention weights after the softmax (window entries newest first, then heads; entries not
        yet filled are ignored); ``"output"`` ``(T, B, H)`` multiplies ``h_t`` after ``BN_h``
        (what the step returns and carries). Absent masks (or ``None``): no dropout there.

      ``(ys, h, c, stats)``: ``ys`` ``(B, T, H)`` the outputs ``h_t`` of every step; ``h``, ``c``
      ``(B, H)`` the final carry; ``stats`` the running statistics after the sequence (the input
      ones in evaluation), same tree as ``batch_stats``. All float64.
    """
    params = _as_float64(params)
    norms = _Norms(norm, params, _as_float64(batch_stats), train)
    x = np.asarray(x, dtype=np.float64)
    batch, steps, _ = x.shape
    hidden = params["value"]["kernel"].shape[1]
    d_k = hidden // num_heads
    assert d_k * num_heads == hidden

    w_key = params["key"]["kernel"]  # (H [+ 2b], H) after stacking
    w_value = params["value"]["kernel"]
    if use_positional_encoding:
        w_key = np.concatenate([w_key, params["key_position"]["kernel"]], axis=0)
        w_value = np.concatenate([w_value, params["value_position"]["kernel"]], axis=0)
        pe = positional_encoding(window_size)  # (k, 2b)
    b_key = params["key"].get("bias", 0.0)  # absent (b_k = 0) without the activation
    b_value = params["value"]["bias"]

    masks = _as_float64(dropout_masks or {})
    no_mask = np.ones(steps)  # broadcasts as the factor 1 at every step

    h = np.zeros((batch, hidden))
    c = np.zeros((batch, hidden))
    # Cell states (after key/value dropout), newest first: window[p - 1] ~ position p.
    window = [np.zeros((batch, hidden)) * masks.get("key_value", no_mask)[0]]
    outputs = []
    for t in range(steps):
        x_t = x[:, t]
        q = elu(
            np.concatenate([x_t, h], axis=-1) @ params["query"]["kernel"] + params["query"]["bias"]
        )

        # Every entry, re-built and re-projected: e_j = [c_j ; pe(p_j)].
        entries = np.stack(window, axis=1)  # (B, m, H), m = min(t + 1, k)
        m = entries.shape[1]
        assert m == min(t + 1, window_size)
        if use_positional_encoding:
            positions = np.broadcast_to(pe[:m], (batch, m, pe.shape[1]))
            entries = np.concatenate([entries, positions], axis=-1)  # (B, m, H + 2b)
        keys = entries @ w_key + b_key  # (B, m, H)
        values = entries @ w_value + b_value  # (B, m, H)
        if activation_on_keys_and_values:
            keys = norms(("key_norm",), elu(keys))  # stats over B x m valid entries
            values = norms(("value_norm",), elu(values))

        q_h = q.reshape(batch, num_heads, d_k)  # (B, n, d_k)
        k_h = keys.reshape(batch, m, num_heads, d_k)  # (B, m, n, d_k)
        v_h = values.reshape(batch, m, num_heads, d_k)
        scores = np.einsum("bnd,bmnd->bnm", q_h, k_h) / math.sqrt(d_k)  # (B, n, m)
        alpha = softmax(scores)
        if "attention" in masks:  # (B, k, n) -> the valid entries, as (B, n, m)
            alpha = alpha * np.swapaxes(masks["attention"][t][:, :m, :], 1, 2)
        attended = np.einsum("bnm,bmnd->bnd", alpha, v_h).reshape(batch, hidden)  # (B, H)
        a = norms(
            ("attention_norm",),
            elu(
                attended @ params["attention_output"]["kernel"] + params["attention_output"]["bias"]
            ),
        )

        if mode == "residual":
            z = (
                x_t @ params["input_gates"]["kernel"]
                + params["input_gates"]["bias"]
                + h @ params["hidden_gates"]["kernel"]
                + a @ params["attention_gates"]["kernel"]
            )
        elif mode == "layer":
            z = (
                np.concatenate([x_t, h, a], axis=-1) @ params["gates"]["kernel"]
                + params["gates"]["bias"]
            )
        else:
            raise ValueError(f"unknown mode {mode!r}")
        z = norms(("update", "gate_norm"), z)  # (B, 4H)
        g = np.tanh(z[:, 0:hidden])
        f = sigmoid(z[:, hidden : 2 * hidden])
        i = sigmoid(z[:, 2 * hidden : 3 * hidden])
        o = sigmoid(z[:, 3 * hidden : 4 * hidden])
        c = f * c + i * g
        if cell_norm_placement == "carried":
            c = norms(("update", "cell_norm"), c)
            h = norms(("update", "hidden_norm"), o * elu(c))
        elif cell_norm_placement == "output":
            h = norms(("update", "hidden_norm"), o * elu(norms(("update", "cell_norm"), c)))
        else:
            raise ValueError(f"unknown cell_norm_placement {cell_norm_placement!r}")
        h = h * masks.get("output", no_mask)[t]
        outputs.append(h)

        if t + 1 < steps:  # FIFO: c_t enters as position 1 at step t + 1 ...
            window.insert(0, c * masks.get("key_value", no_mask)[t + 1])
        if len(window) > window_size:
            window.pop()  # ... and the oldest leaves once k are held.

    return np.stack(outputs, axis=1), h, c, norms.stats
