"""The LARNN cell and its attention-free twin, the BN-LSTM cell (SPEC §1).

Both are Flax ``nn.RNNCellBase`` cells: ``cell(carry, x) -> (carry, h)`` for one time step, with
``initialize_carry(rng, input_shape)``. Shapes: batch ``B`` (any number of leading axes), input
features ``D``, hidden features ``H``, window ``k``.

Batch normalisation inside a recurrence: the statistics live in the ``batch_stats`` collection and
are updated at every step, so a scan over the cell must carry that collection in training. Use
:class:`larnn_jax.LARNNLayer`, which sets the scan up, or see its docstring for the ``nn.RNN``
arguments.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, PRNGKey

from larnn_jax.attention import positional_encoding, window_attention
from larnn_jax.normalization import FeatureNorm, NormKind, check_norm_kind, statistics_dtype

Mode = Literal["residual", "layer"]
MODES: tuple[str, ...] = ("residual", "layer")
CellNormPlacement = Literal["output", "carried"]
CELL_NORM_PLACEMENTS: tuple[str, ...] = ("output", "carried")


def check_cell_norm_placement(placement: str) -> None:
    """Raises ``ValueError`` naming ``placement`` unless it is one of :data:`CELL_NORM_PLACEMENTS`."""
    if placement not in CELL_NORM_PLACEMENTS:
        raise ValueError(
            f"cell_norm_placement must be one of {CELL_NORM_PLACEMENTS}, got {placement!r}"
        )


class LARNNCarry(NamedTuple):
    """The state a :class:`LARNNCell` carries from one step to the next.

    Before step ``t``, the window ``W_t = [c_{t-1}, …, c_{t-k}]`` is held as ``c = c_{t-1}``
    (not yet projected) plus the projected keys and values of the ``k - 1`` older entries,
    newest first. Step ``t`` projects ``c_{t-1}`` once, pushes it in front and drops the oldest.

    Attributes:
      h: ``(B, H)`` previous output ``h_{t-1}``.
      c: ``(B, H)`` previous cell state ``c_{t-1}``.
      keys: ``(B, k-1, H)`` stored key entries for ``c_{t-2} … c_{t-k}`` (see
        :meth:`LARNNCell.stored_entry`); zeros where not yet filled.
      values: ``(B, k-1, H)`` stored value entries, likewise.
      length: ``(B,)`` int32, how many of ``keys``/``values`` are filled (0 … k-1).
      moment_sums: ``(B, 4, H)`` per-sample sums over the filled entries of ``d_key``,
        ``d_value``, ``d_key²`` and ``d_value²``, where ``d`` is an entry minus the entry of a
        zero cell state; the window's batch statistics come from them (see
        :meth:`LARNNCell.window_moments`). ``(B, 0, H)`` where the cell does not use them.
    """

    h: jax.Array
    c: jax.Array
    keys: jax.Array
    values: jax.Array
    length: jax.Array
    moment_sums: jax.Array


def _dropout(module: nn.Module, rate: float, x: jax.Array, deterministic: bool) -> jax.Array:
    """Inverted dropout with rng stream ``'dropout'``; the identity when off or in eval mode."""
    if rate == 0.0 or deterministic:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _carry_dtype(dtype: Dtype | None, param_dtype: Dtype) -> Dtype:
    return dtype if dtype is not None else param_dtype


class GatedUpdate(nn.Module):
    """The BN-LSTM update shared by both cells: gate pre-activation ``z`` → ``(c_t, h_t)``.

    ``z = BN_z(z)``; ``g, f, i, o = tanh, σ, σ, σ`` of its four ``H``-wide blocks; then, with
    ``cell_norm_placement``:

    * ``'output'`` (default): ``c_t = f ⊙ c_{t-1} + i ⊙ g`` is carried unnormalised and
      ``h_t = dropout(BN_h(o ⊙ elu(BN_c(c_t))))``. Every path of the recurrence passes through a
      bounded gate, so ``|c_t| ≤ |c_{t-1}| + 1`` whatever the statistics.
    * ``'carried'`` (the paper's formula): ``c_t = BN_c(f ⊙ c_{t-1} + i ⊙ g)`` is carried and
      ``h_t = dropout(BN_h(o ⊙ elu(c_t)))``. In evaluation ``BN_c`` is a fixed affine map whose gain
      compounds at every step: some sequences' states grow exponentially.
    """

    features: int
    norm: NormKind = "batch"
    cell_norm_placement: CellNormPlacement = "output"
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        def make_norm(size: int, name: str) -> FeatureNorm:
            return FeatureNorm(
                self.norm, size, dtype=self.dtype, param_dtype=self.param_dtype, name=name
            )

        self.gate_norm = make_norm(4 * self.features, "gate_norm")
        self.cell_norm = make_norm(self.features, "cell_norm")
        self.hidden_norm = make_norm(self.features, "hidden_norm")

    def create_variables(self) -> None:
        for norm in (self.gate_norm, self.cell_norm, self.hidden_norm):
            norm.create_variables()

    def __call__(self, z: jax.Array, c_prev: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``z``: ``(B, 4H)``; ``c_prev``: ``(B, H)``. Returns ``c_t, h_t``, both ``(B, H)``."""
        running = self.deterministic
        z = self.gate_norm(z, use_running_average=running)
        g, f, i, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c_prev + jax.nn.sigmoid(i) * jnp.tanh(g)
        if self.cell_norm_placement == "carried":
            c = normalised = self.cell_norm(c, use_running_average=running)
        else:
            normalised = self.cell_norm(c, use_running_average=running)
        h = self.hidden_norm(
            jax.nn.sigmoid(o) * jax.nn.elu(normalised), use_running_average=running
        )
        return c, _dropout(self, self.dropout_rate, h, self.deterministic)


def _check_common(features: int, dropout_rates: dict[str, float]) -> None:
    if features < 1:
        raise ValueError(f"features must be >= 1, got {features}")
    for name, rate in dropout_rates.items():
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")


def _check_input(x: jax.Array, h: jax.Array, input_projection: nn.Dense, other: int) -> None:
    """Checks a step's input ``x`` ``(B, D)`` against the carry ``h`` ``(B, H)`` and the weights.

    ``input_projection`` is the first dense layer that reads ``x``, with ``other`` more input
    features after ``x``'s; once it has weights they fix ``D``.
    """
    cell = type(input_projection.parent).__name__
    if x.ndim != h.ndim or x.shape[:-1] != h.shape[:-1]:
        raise ValueError(
            f"{cell}: input of shape {x.shape} does not match the carry's batch shape "
            f"{h.shape[:-1]}; a step takes x of shape (*batch, features) - for whole sequences "
            "(batch, time, features) use LARNNLayer or nn.RNN"
        )
    if input_projection.has_variable("params", "kernel"):
        expected = input_projection.variables["params"]["kernel"].shape[0] - other
        if x.shape[-1] != expected:
            raise ValueError(
                f"{cell}: input has {x.shape[-1]} features (shape {x.shape}) but the parameters "
                f"were initialised for {expected}"
            )


class BNLSTMCell(nn.RNNCellBase):
    """The LARNN cell without attention: a batch-normalised LSTM with ELU output (SPEC §1).

    ``z = W_x x_t + W_h h_{t-1} + b``, then :class:`GatedUpdate` (``norm``,
    ``cell_norm_placement`` and ``dropout_rate`` are its attributes). Isolates what attention
    adds. Carry: ``(c, h)``, both ``(B, H)``, as Flax's ``LSTMCell``.
    """

    features: int
    norm: NormKind = "batch"
    cell_norm_placement: CellNormPlacement = "output"
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check_norm_kind(self.norm)
        check_cell_norm_placement(self.cell_norm_placement)
        _check_common(self.features, {"dropout_rate": self.dropout_rate})
        super().__post_init__()

    def setup(self) -> None:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.input_gates = nn.Dense(4 * self.features, **dense)
        self.hidden_gates = nn.Dense(4 * self.features, use_bias=False, **dense)
        self.update = GatedUpdate(
            self.features,
            self.norm,
            self.cell_norm_placement,
            self.dropout_rate,
            self.deterministic,
            **dense,
        )

    def __call__(
        self, carry: tuple[jax.Array, jax.Array], x: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        """One step. ``carry = (c, h)``, each ``(B, H)``; ``x``: ``(B, D)``. Returns ``(c, h), h``."""
        c_prev, h_prev = carry
        _check_input(x, h_prev, self.input_gates, other=0)
        z = self.input_gates(x) + self.hidden_gates(h_prev)
        c, h = self.update(z, c_prev)
        dtype = c_prev.dtype
        return (c.astype(dtype), h.astype(dtype)), h

    def initialize_carry(
        self, rng: PRNGKey, input_shape: tuple[int, ...]
    ) -> tuple[jax.Array, jax.Array]:
        """Zero ``(c, h)`` for inputs of shape ``(*batch, D)``; creates the norm statistics."""
        del rng
        if self.scope is not None:  # bound (inside init/apply): make the statistics exist
            self.update.create_variables()
        zeros = jnp.zeros(
            (*input_shape[:-1], self.features), _carry_dtype(self.dtype, self.param_dtype)
        )
        return zeros, zeros

    @property
    def num_feature_axes(self) -> int:
        return 1


class LARNNCell(nn.RNNCellBase):
    """Linear Attention Recurrent Neural Network cell (SPEC §1).

    A BN-LSTM whose gates also see ``a_t``, the multi-head attention of a query built from
    ``[x_t ; h_{t-1}]`` over a first-in-first-out window of the ``k`` most recent cell states.

    Each window entry is projected to a key and a value once, when it enters the window, and the
    window's batch normalisation is folded into the query and the attention output (SPEC §2), so
    a step costs ``O(H² + k·H)`` per sample and gives the naive definition's result.

    Attributes:
      features: hidden size ``H``; must be divisible by ``num_heads``.
      num_heads: number of attention heads ``n``.
      window_size: ``k >= 1``, how many past cell states are attended to.
      mode: how ``a_t`` enters the gates: ``'residual'`` (``W_x x + W_h h + W_a a + b``, three
        matrices) or ``'layer'`` (one matrix on ``[x ; h ; a]``).
      use_positional_encoding: concatenate :func:`positional_encoding` to each window entry.
      activation_on_keys_and_values: ``norm ∘ elu`` on keys and values (else the identity).
      norm: ``'batch'`` (the paper), ``'layer'`` or ``'none'``, used everywhere in the cell.
        ``'layer'`` and ``'none'`` work with batch size 1 and need no statistics.
      cell_norm_placement: where the cell state's norm ``BN_c`` sits (see :class:`GatedUpdate`):
        ``'output'`` (default; ``c_t`` is carried and enters the window unnormalised) or
        ``'carried'`` (the paper's literal formula; unstable in evaluation).
      dropout_rate: dropout on ``h_t``.
      kv_dropout_rate: dropout on a cell state's features when it enters the window; the entry
        keeps that mask while it stays.
      attention_dropout_rate: dropout on the attention weights.
      deterministic: ``True``: running averages and no dropout (evaluation); ``False``: batch
        statistics (updating ``batch_stats``) and dropout (rng stream ``'dropout'``).
      dtype: compute dtype (``None``: from the inputs and parameters); statistics and softmax are
        computed in float32 or wider.
      param_dtype: parameter dtype.
    """

    features: int
    num_heads: int
    window_size: int
    mode: Mode = "residual"
    use_positional_encoding: bool = False
    activation_on_keys_and_values: bool = True
    norm: NormKind = "batch"
    cell_norm_placement: CellNormPlacement = "output"
    dropout_rate: float = 0.0
    kv_dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        _check_common(
            self.features,
            {
                "dropout_rate": self.dropout_rate,
                "kv_dropout_rate": self.kv_dropout_rate,
                "attention_dropout_rate": self.attention_dropout_rate,
            },
        )
        if self.num_heads < 1 or self.features % self.num_heads != 0:
            raise ValueError(
                f"features ({self.features}) must be a multiple of num_heads ({self.num_heads} "
                "given, must be >= 1); the hidden size is never rounded silently"
            )
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        check_norm_kind(self.norm)
        check_cell_norm_placement(self.cell_norm_placement)
        super().__post_init__()

    @property
    def _normalises_window(self) -> bool:
        return self.activation_on_keys_and_values and self.norm != "none"

    @property
    def _caches_activation(self) -> bool:
        """Whether the stored entries can already hold ``elu`` of the projection.

        Without positional encoding an entry's pre-activation never changes while it stays in
        the window; with it, the position term changes at every step.
        """
        return self.activation_on_keys_and_values and not self.use_positional_encoding

    @property
    def _slides_window_moments(self) -> bool:
        """Whether the window's batch statistics come from the carry's ``moment_sums``.

        When the entries never change while they stay in the window (they hold their final
        keys and values) and are batch-normalised, a sample's sums over its window change only
        by the entry that enters and the one that leaves: the statistics cost ``O(B·H)`` per
        step instead of ``O(B·k·H)``, and the training scan keeps nothing window-sized for them.
        """
        return self._caches_activation and self.norm == "batch"

    def setup(self) -> None:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        features = self.features
        self.query = nn.Dense(features, **dense)
        # Terms that add the same amount to every score of a head cancel in the softmax, so the
        # keys get no bias where it would be such a term (it could never be learned).
        self.key = nn.Dense(features, use_bias=self.activation_on_keys_and_values, **dense)
        self.value = nn.Dense(features, **dense)
        if self.use_positional_encoding:
            self.key_position = nn.Dense(features, use_bias=False, **dense)
            self.value_position = nn.Dense(features, use_bias=False, **dense)
        window_norm = "none" if not self._normalises_window else self.norm
        self.key_norm = FeatureNorm(window_norm, features, use_bias=False, **dense)
        self.value_norm = FeatureNorm(window_norm, features, **dense)
        self.attention_output = nn.Dense(features, **dense)
        self.attention_norm = FeatureNorm(self.norm, features, **dense)
        if self.mode == "residual":
            self.input_gates = nn.Dense(4 * features, **dense)
            self.hidden_gates = nn.Dense(4 * features, use_bias=False, **dense)
            self.attention_gates = nn.Dense(4 * features, use_bias=False, **dense)
        else:
            self.gates = nn.Dense(4 * features, **dense)
        self.update = GatedUpdate(
            features,
            self.norm,
            self.cell_norm_placement,
            self.dropout_rate,
            self.deterministic,
            **dense,
        )

    def initialize_carry(self, rng: PRNGKey, input_shape: tuple[int, ...]) -> LARNNCarry:
        """The initial carry for inputs of shape ``(*batch, D)``: ``c_{-1} = h_{-1} = 0``.

        Also creates the normalisation statistics, so that a scan carrying ``batch_stats`` finds
        them (SPEC §2b). To start from another ``c_{-1}``, replace ``c`` in the result.
        """
        del rng
        if self.scope is not None:  # bound (inside init/apply): make the statistics exist
            for norm in (self.key_norm, self.value_norm, self.attention_norm):
                norm.create_variables()
            self.update.create_variables()
        batch = tuple(input_shape[:-1])
        dtype = _carry_dtype(self.dtype, self.param_dtype)
        state = jnp.zeros((*batch, self.features), dtype)
        window = jnp.zeros((*batch, self.window_size - 1, self.features), dtype)
        sums = jnp.zeros(
            (*batch, 4 if self._slides_window_moments else 0, self.features),
            statistics_dtype(dtype, self.param_dtype),
        )
        return LARNNCarry(state, state, window, window, jnp.zeros(batch, jnp.int32), sums)

    @property
    def num_feature_axes(self) -> int:
        return 1

    def stored_entry(self, projection: nn.Dense, c: jax.Array) -> jax.Array:
        """What the window stores for cell state ``c`` (``(B, H)`` → ``(B, H)``).

        ``W c + b``, and ``elu`` of it when that can be cached (see ``_caches_activation``).
        """
        entry = projection(c)
        return jax.nn.elu(entry) if self._caches_activation else entry

    def window_features(self, stored: jax.Array, position: nn.Dense | None) -> jax.Array:
        """Stored entries ``(B, k, H)`` → the keys or values before normalisation ``(B, k, H)``.

        Adds the projected positional encoding (entry ``j`` is at position ``j + 1``) and the
        activation where the stored entries do not hold them yet.
        """
        if position is None:
            return stored
        table = positional_encoding(
            self.window_size, jnp.result_type(stored.dtype, self.param_dtype)
        )
        pre_activation = stored + position(jnp.asarray(table))
        return jax.nn.elu(pre_activation) if self.activation_on_keys_and_values else pre_activation

    def deviation_sums(self, keys: jax.Array, values: jax.Array, shift: jax.Array) -> jax.Array:
        """One entry's terms of ``moment_sums``: stored entries ``(B, H)`` → ``(B, 4, H)``.

        ``shift``: ``(2, H)``, :meth:`window_shift`.
        """
        deviation = jnp.stack([keys, values], axis=-2).astype(shift.dtype) - shift
        return jnp.concatenate([deviation, jnp.square(deviation)], axis=-2)

    def window_shift(self, dtype: Dtype) -> jax.Array:
        """``(2, H)``: the stored key and value entries of a zero cell state.

        The moment sums count deviations from it: a constant (no gradient flows through it)
        that keeps ``E[d²] − E[d]²`` from cancelling; at the first step every entry equals it.
        """
        zero = jnp.zeros((self.features,), dtype)
        shift = jnp.stack([self.stored_entry(self.key, zero), self.stored_entry(self.value, zero)])
        return jax.lax.stop_gradient(shift.astype(dtype))

    def window_moments(
        self, moment_sums: jax.Array, length: jax.Array, shift: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        """Batch mean and biased variance ``(H,)`` of the keys and of the values in the window.

        Args:
          moment_sums: ``(B, 4, H)`` sums over every sample's valid entries (see
            :class:`LARNNCarry`).
          length: ``(B,)`` how many entries each sample's window holds.
          shift: ``(2, H)``, :meth:`window_shift`.

        Returns:
          ``((key_mean, key_var), (value_mean, value_var))``.
        """
        totals = jnp.sum(moment_sums, axis=tuple(range(moment_sums.ndim - 2)))  # (4, H)
        means = totals / jnp.sum(length).astype(totals.dtype)
        deviation_mean, square_mean = means[:2], means[2:]
        variance = jnp.maximum(square_mean - jnp.square(deviation_mean), 0.0)
        mean = shift + deviation_mean
        return (mean[0], variance[0]), (mean[1], variance[1])

    def attend(
        self,
        h_prev: jax.Array,
        x: jax.Array,
        keys: jax.Array,
        values: jax.Array,
        mask: jax.Array,
        window_moments: tuple[tuple[jax.Array, jax.Array], ...] | None = None,
    ) -> jax.Array:
        """``a_t``: ``(B, H)`` from ``x``: ``(B, D)``, ``h_prev``: ``(B, H)`` and the full window.

        ``keys``/``values``: stored entries ``(B, k, H)``; ``mask``: ``(B, k)`` valid entries;
        ``window_moments``: their batch statistics where :meth:`window_moments` gave them (else
        they are computed from the window).
        """
        running = self.deterministic
        key_position = self.key_position if self.use_positional_encoding else None
        value_position = self.value_position if self.use_positional_encoding else None
        keys = self.window_features(keys, key_position)
        values = self.window_features(values, value_position)
        query = jax.nn.elu(self.query(jnp.concatenate([x, h_prev], axis=-1)))
        if self._normalises_window and self.norm == "batch":
            # K = E_k·s_k + t_k: <q, K_j> = <q·s_k, E_k,j> + a per-head constant the softmax
            # cancels. V = E_v·s_v + t_v: Σ α_j V_j = (Σ α_j E_v,j)·s_v + (Σ α_j)·t_v.
            key_moments, value_moments = window_moments or (None, None)
            key_scale, _ = self.key_norm.scale_and_shift(
                keys, mask, use_running_average=running, moments=key_moments
            )
            value_scale, value_shift = self.value_norm.scale_and_shift(
                values, mask, use_running_average=running, moments=value_moments
            )
            query = query * key_scale.astype(query.dtype)
        else:
            keys = self.key_norm(keys, mask, use_running_average=running)
            values = self.value_norm(values, mask, use_running_average=running)
            value_scale, value_shift = 1.0, 0.0

        dropping = self.attention_dropout_rate > 0 and not self.deterministic
        weights_shape = (*mask.shape, self.num_heads) if dropping else ()  # () broadcasts
        weights_scale = _dropout(
            self, self.attention_dropout_rate, jnp.ones(weights_shape, keys.dtype), not dropping
        )
        context, weight_total = window_attention(
            query, keys, values, mask, weights_scale, self.num_heads
        )
        attended = context * value_scale + weight_total * value_shift
        return self.attention_norm(
            jax.nn.elu(self.attention_output(attended.astype(keys.dtype))),
            use_running_average=running,
        )

    def gate_preactivation(self, x: jax.Array, h_prev: jax.Array, a: jax.Array) -> jax.Array:
        """``z``: ``(B, 4H)`` from ``x``: ``(B, D)``, ``h_prev`` and ``a``: ``(B, H)``."""
        if self.mode == "residual":
            return self.input_gates(x) + self.hidden_gates(h_prev) + self.attention_gates(a)
        return self.gates(jnp.concatenate([x, h_prev, a], axis=-1))

    def __call__(self, carry: LARNNCarry, x: jax.Array) -> tuple[LARNNCarry, jax.Array]:
        """One time step.

        Args:
          carry: :class:`LARNNCarry` before step ``t``.
          x: ``(B, D)`` input at step ``t``.

        Returns:
          The carry after step ``t`` and the output ``h_t``, ``(B, H)``.
        """
        _check_input(x, carry.h, self.query, other=self.features)
        # Push c_{t-1}: project it once (after key/value dropout) and put it in front.
        entering = _dropout(self, self.kv_dropout_rate, carry.c, self.deterministic)
        dtype = carry.h.dtype
        keys = jnp.concatenate(
            [self.stored_entry(self.key, entering)[..., None, :].astype(dtype), carry.keys], axis=-2
        )
        values = jnp.concatenate(
            [self.stored_entry(self.value, entering)[..., None, :].astype(dtype), carry.values],
            axis=-2,
        )
        length = jnp.minimum(carry.length + 1, self.window_size)
        mask = jnp.arange(self.window_size) < length[..., None]  # (B, k)

        moment_sums, window_moments = carry.moment_sums, None
        if self._slides_window_moments:
            shift = self.window_shift(moment_sums.dtype)
            moment_sums += self.deviation_sums(keys[..., 0, :], values[..., 0, :], shift)
            if not self.deterministic:
                window_moments = self.window_moments(moment_sums, length, shift)
            leaving = (length == self.window_size)[..., None, None]  # the oldest entry drops
            oldest = self.deviation_sums(keys[..., -1, :], values[..., -1, :], shift)
            moment_sums -= jnp.where(leaving, oldest, jnp.zeros_like(oldest))

        a = self.attend(carry.h, x, keys, values, mask, window_moments)
        c, h = self.update(self.gate_preactivation(x, carry.h, a), carry.c)
        new_carry = LARNNCarry(
            h=h.astype(dtype),
            c=c.astype(dtype),
            keys=keys[..., :-1, :],
            values=values[..., :-1, :],
            length=jnp.minimum(length, self.window_size - 1),
            moment_sums=moment_sums,
        )
        return new_carry, h
