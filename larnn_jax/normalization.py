"""Feature normalisation for the recurrent cells: batch, layer or none, with masking.

The cells normalise small ``(..., F)`` tensors at every time step (docs/model.md §1): the gate
pre-activation, the cell state, the output, the attention result, and - with masking - the
window's keys and values. One module, :class:`FeatureNorm`, does all of it, so that every norm
follows the same conventions:

* ``'batch'``: statistics over every axis but the last, restricted to the entries where ``mask``
  is true; biased variance; running averages ``r ← momentum · r + (1 − momentum) · batch`` in the
  ``batch_stats`` collection, updated once per call (never during ``init``).
* ``'layer'``: statistics over the last axis of each entry (no running averages).
* ``'none'``: the identity, with no parameters.

Statistics are computed in float32 or wider (float64 inputs keep float64), whatever the compute
dtype, and kept in ``promote_types(float32, param_dtype)``.
"""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.typing import Dtype
from jax.typing import DTypeLike

NormKind = Literal["batch", "layer", "none"]
NORM_KINDS: tuple[str, ...] = get_args(NormKind)

MISSING_STATISTICS = (
    "norm='batch' found no 'batch_stats' collection here. Inside a scan (nn.RNN, nn.scan) the "
    "statistics must travel with the loop: use larnn_jax.LARNNLayer, which sets this up, or "
    "nn.RNN(cell, variable_carry='batch_stats', split_rngs={'params': False, 'dropout': True}) "
    "in training (apply with mutable=['batch_stats']) and "
    "nn.RNN(cell, variable_broadcast=('params', 'batch_stats')) in evaluation. Outside a scan, "
    "pass the variables returned by init (they include 'batch_stats'). Or use norm='layer' or "
    "norm='none', which keep no statistics."
)


def check_norm_kind(norm: str) -> None:
    """Raises ``ValueError`` naming ``norm`` unless it is one of :data:`NORM_KINDS`."""
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")


class FeatureNorm(nn.Module):
    """Normalises the last axis of its input: ``y = (x − μ) / sqrt(σ² + ε) · scale + bias``.

    Attributes:
      kind: ``'batch'``, ``'layer'`` or ``'none'`` (see the module docstring).
      features: size ``F`` of the last axis.
      momentum: decay of the running averages (``'batch'`` only).
      epsilon: added to the variance.
      use_bias: learn a shift (the bias); without it the result is centred at zero.
      scale_init: the initial value of every entry of the scale (Cooijmans et al. use 0.1).
      dtype: dtype of the result (the input's dtype when ``None``).
      param_dtype: dtype of the scale and bias.
    """

    kind: NormKind
    features: int
    momentum: float = 0.99
    epsilon: float = 1e-5
    use_bias: bool = True
    scale_init: float = 1.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        check_norm_kind(self.kind)
        if self.kind == "none":
            return
        shape = (self.features,)
        self.scale = self.param(
            "scale", nn.initializers.constant(self.scale_init), shape, self.param_dtype
        )
        if self.use_bias:
            self.bias = self.param("bias", nn.initializers.zeros, shape, self.param_dtype)
        if self.kind == "batch":
            if not (
                self.has_variable("batch_stats", "mean")
                or self.is_mutable_collection("batch_stats")
            ):
                raise ValueError(MISSING_STATISTICS)
            stats_dtype = jnp.promote_types(jnp.float32, self.param_dtype)
            self.mean = self.variable("batch_stats", "mean", jnp.zeros, shape, stats_dtype)
            self.var = self.variable("batch_stats", "var", jnp.ones, shape, stats_dtype)

    def create_variables(self) -> None:
        """Creates the parameters and statistics now (they are otherwise created on first use).

        Recurrent cells call this from ``initialize_carry`` so that the ``batch_stats`` collection
        exists before a scan that carries it starts (docs/model.md §4).
        """
        if self.kind != "none":
            _ = self.scale

    def scale_and_shift(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        use_running_average: bool,
        moments: tuple[jax.Array, jax.Array] | None = None,
        feature_order: np.ndarray | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Batch norm as an affine map: ``BN(x) == x * scale + shift``.

        Lets a caller fold the normalisation into a neighbouring linear operation instead of
        normalising ``x`` itself (the LARNN window, docs/model.md §2).

        Args:
          x: ``(..., F)`` the values whose statistics are taken.
          mask: boolean, broadcastable to ``x.shape[:-1]``; only entries where it is true count.
            Every feature must have at least one valid entry.
          use_running_average: use the running averages instead of the statistics of ``x``
            (and leave them unchanged).
          moments: the batch mean and biased variance ``(F,)`` of ``x``'s valid entries, where
            the caller has them already (then ``x`` only gives the dtype and ``mask`` is unused).
          feature_order: ``x``'s last axis holds feature ``feature_order[i]`` at position ``i``
            (``None``: the natural order); parameters and statistics stay in the natural order.

        Returns:
          ``scale`` and ``shift``, both ``(F,)`` in ``x``'s order and :func:`statistics_dtype`.
        """
        if self.kind != "batch":
            raise ValueError(f"scale_and_shift is for norm='batch', this norm is {self.kind!r}")
        dtype = statistics_dtype(x.dtype, self.param_dtype)
        if use_running_average:
            mean, var = self.mean.value.astype(dtype), self.var.value.astype(dtype)
        else:
            if moments is None:
                moments = masked_moments(x.astype(dtype), mask)
            mean, var = (
                _in_natural_order(moment.astype(dtype), feature_order) for moment in moments
            )
            if not self.is_initializing():
                decay = self.momentum
                self.mean.value = (decay * self.mean.value + (1 - decay) * mean).astype(
                    self.mean.value.dtype
                )
                self.var.value = (decay * self.var.value + (1 - decay) * var).astype(
                    self.var.value.dtype
                )
        scale = self.scale.astype(dtype) * jax.lax.rsqrt(var + self.epsilon)
        shift = self._shift(dtype) - mean * scale
        return _in_order(scale, feature_order), _in_order(shift, feature_order)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        use_running_average: bool,
        feature_order: np.ndarray | None = None,
    ) -> jax.Array:
        """Normalises ``x`` of shape ``(..., F)``; see :meth:`scale_and_shift` for the arguments."""
        dtype = self.dtype or x.dtype
        if self.kind == "none":
            return x.astype(dtype)
        stats_dtype = statistics_dtype(x.dtype, self.param_dtype)
        if self.kind == "batch":
            scale, shift = self.scale_and_shift(
                x, mask, use_running_average=use_running_average, feature_order=feature_order
            )
            return (x.astype(stats_dtype) * scale + shift).astype(dtype)
        mean, var = _masked_moments(x.astype(stats_dtype), None, axes=(-1,))
        normalised = (x.astype(stats_dtype) - mean) * jax.lax.rsqrt(var + self.epsilon)
        scale = _in_order(self.scale.astype(stats_dtype), feature_order)
        shift = _in_order(self._shift(stats_dtype), feature_order)
        return (normalised * scale + shift).astype(dtype)

    def _shift(self, dtype: jnp.dtype) -> jax.Array:
        return self.bias.astype(dtype) if self.use_bias else jnp.zeros((), dtype)


def _in_order(x: jax.Array, feature_order: np.ndarray | None) -> jax.Array:
    """``(F,)`` or scalar in the natural order → in ``feature_order``."""
    return x if feature_order is None or x.ndim == 0 else x[feature_order]


def _in_natural_order(x: jax.Array, feature_order: np.ndarray | None) -> jax.Array:
    """``(F,)`` in ``feature_order`` → in the natural order."""
    return x if feature_order is None else x[np.argsort(feature_order)]


def masked_moments(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance ``(F,)`` of ``x`` ``(..., F)`` over every axis but the last,
    counting only the entries where ``mask`` (broadcastable to ``x.shape[:-1]``) is true."""
    return _masked_moments(x, mask, axes=tuple(range(x.ndim - 1)))


def statistics_dtype(*dtypes: DTypeLike) -> jnp.dtype:
    """float32, or wider where one of ``dtypes`` is wider (float64 stays float64)."""
    return jnp.result_type(jnp.float32, *dtypes)


def _masked_moments(
    x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance of ``x`` over ``axes``, counting only entries where ``mask``.

    ``mask`` (boolean, broadcastable to ``x.shape[:-1]``) selects whole entries of the last axis;
    with a mask, ``axes`` must be every axis but the last. Results keep the reduced axes only
    when they include the last one (layer statistics).
    """
    if mask is not None:
        weight = jnp.broadcast_to(mask, x.shape[:-1])[..., None].astype(x.dtype)
        return _weighted_moments(x, weight)
    keepdims = (x.ndim - 1) in {a % x.ndim for a in axes}
    mean = jnp.mean(x, axis=axes, keepdims=keepdims)
    return mean, jnp.mean(jnp.square(x - mean), axis=axes, keepdims=keepdims)


@jax.custom_vjp
def _weighted_moments(x: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance ``(F,)`` of the entries of ``x`` ``(..., F)`` with weight 1.

    ``weight``: ``(..., 1)`` of zeros and ones. Both moments come from one pass over ``x`` (the
    ``(B, k, H)`` window at every time step): sums of ``d`` and ``d²`` for ``d = x − s``. The
    shift ``s`` (the first entry: the newest of sample 0, for the window) leaves the result
    unchanged in exact arithmetic and keeps ``E[d²] − E[d]²`` from cancelling when the spread is
    tiny next to the mean (at step 0 every sample's single window entry is the same). The
    gradient is written by hand so that a differentiated scan keeps only ``x``, not temporaries
    of its size.
    """
    return _weighted_moments_forward(x, weight)[0]


def _weighted_moments_forward(x, weight):
    axes = tuple(range(x.ndim - 1))
    shift = x[(0,) * (x.ndim - 1)]
    deviation = x - shift
    count = jnp.sum(jnp.broadcast_to(weight, x.shape), axis=axes)
    weighted = deviation * weight
    mean_deviation = jnp.sum(weighted, axis=axes) / count
    mean_square = jnp.sum(weighted * deviation, axis=axes) / count
    mean = shift + mean_deviation
    variance = jnp.maximum(mean_square - jnp.square(mean_deviation), 0.0)
    return (mean, variance), (x, weight, mean, count)


def _weighted_moments_backward(residuals, cotangents):
    x, weight, mean, count = residuals
    d_mean, d_variance = cotangents
    d_x = weight * (d_mean + 2.0 * d_variance * (x - mean)) / count
    return d_x, None


_weighted_moments.defvjp(_weighted_moments_forward, _weighted_moments_backward)
