"""The LARNN cell and its attention-free twin, the BN-LSTM cell (``docs/model.md``, section 1).

Both are Flax ``nn.RNNCellBase`` cells: ``cell(carry, x) -> (carry, h)`` for one time step, with
``initialize_carry(rng, input_shape)``. Shapes: batch ``B`` (any number of leading axes), input
features ``D``, hidden features ``H``, window ``k``.

This module is the readable definition that every faster path (``larnn_jax.scans``) is tested
against: :meth:`LARNNCell.step` is the step's equations, in their order.

Batch normalisation inside a recurrence: the statistics live in the ``batch_stats`` collection and
are updated at every step, so a scan over the cell must carry that collection in training. Use
:class:`larnn_jax.LARNNLayer`, which sets the scan up, or see its docstring for the ``nn.RNN``
arguments.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype
from flax.typing import Dtype, PRNGKey

from larnn_jax import window as fifo
from larnn_jax.attention import multi_head_attention
from larnn_jax.normalization import FeatureNorm, NormKind, check_norm_kind, statistics_dtype
from larnn_jax.window import WindowLayers, WindowScheme, WindowState, WindowView

Mode = Literal["residual", "layer"]
MODES: tuple[str, ...] = get_args(Mode)
CellNormPlacement = Literal["output", "carried"]
CELL_NORM_PLACEMENTS: tuple[str, ...] = get_args(CellNormPlacement)


def check_cell_norm_placement(placement: str) -> None:
    """Raises ``ValueError`` naming ``placement`` unless it is one of :data:`CELL_NORM_PLACEMENTS`."""
    if placement not in CELL_NORM_PLACEMENTS:
        raise ValueError(
            f"cell_norm_placement must be one of {CELL_NORM_PLACEMENTS}, got {placement!r}"
        )


#: Resolution of the dropout decisions: 16 random bits each.
DROPOUT_LEVELS = 1 << 16


def dropout_keep_threshold(rate: float) -> int:
    """A dropout decision keeps its element when its 16 random bits are below this threshold
    (:data:`DROPOUT_LEVELS` at rate 0: always)."""
    return round((1.0 - rate) * DROPOUT_LEVELS)


def dropout_keep_mask(
    key: jax.Array, rate: float, shape: tuple[int, ...]
) -> tuple[jax.Array, float]:
    """Which elements of an array of ``shape`` dropout keeps, and the probability of keeping one.

    Each decision takes 16 random bits, two from every 32-bit random word: half the random
    numbers of ``jax.random.bernoulli``, whose generation is a large part of a training step on a
    CPU. The keep probability ``1 - rate`` is therefore a multiple of ``2^-16`` (rounded).

    Returns:
      A boolean mask of ``shape`` and the keep probability it was drawn with.
    """
    levels = dropout_keep_threshold(rate)
    size = math.prod(shape)
    words = jax.random.bits(key, ((size + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size]
    return (halves < levels).reshape(shape), levels / DROPOUT_LEVELS


def dropout_factors(
    module: nn.Module, rate: float, shape: tuple[int, ...], dtype: Dtype
) -> jax.Array | None:
    """Inverted dropout's factors for an array of ``shape``: 0 where dropped, ``1 / keep
    probability`` where kept, drawn from ``module``'s rng stream ``'dropout'``; ``None`` at rate 0
    (no dropout). Dropout is ``x * factors``."""
    if rate == 0.0:
        return None
    keep, keep_probability = dropout_keep_mask(module.make_rng("dropout"), rate, shape)
    return jnp.where(keep, 1.0 / keep_probability, 0.0).astype(dtype)


def apply_dropout(x: jax.Array, factors: jax.Array | None) -> jax.Array:
    """``x`` dropped with :func:`dropout_factors` (``x`` itself where they are ``None``)."""
    return x if factors is None else x * factors


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
    norm_scale_init: float = 1.0
    deterministic: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        def make_norm(size: int, name: str, scale_init: float = 1.0) -> FeatureNorm:
            return FeatureNorm(
                self.norm,
                size,
                scale_init=scale_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        self.gate_norm = make_norm(4 * self.features, "gate_norm", self.norm_scale_init)
        self.cell_norm = make_norm(self.features, "cell_norm", self.norm_scale_init)
        self.hidden_norm = make_norm(self.features, "hidden_norm")

    def create_variables(self) -> None:
        for norm in (self.gate_norm, self.cell_norm, self.hidden_norm):
            norm.create_variables()

    def output_dropout(self, batch_shape: tuple[int, ...], dtype: Dtype) -> jax.Array | None:
        """The dropout factors of ``h_t`` ``(*batch, H)`` for one step (``None``: no dropout)."""
        rate = 0.0 if self.deterministic else self.dropout_rate
        return dropout_factors(self, rate, (*batch_shape, self.features), dtype)

    def __call__(
        self, z: jax.Array, c_prev: jax.Array, output_dropout: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """``z``: ``(B, 4H)``; ``c_prev``: ``(B, H)``; ``output_dropout``: the factors of
        :meth:`output_dropout`. Returns ``c_t, h_t``, both ``(B, H)``."""
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
        return c, apply_dropout(h, output_dropout)


def gated_update(cell: BNLSTMCell | LARNNCell) -> GatedUpdate:
    """The :class:`GatedUpdate` of ``cell``, configured by the cell's fields of the same names."""
    return GatedUpdate(
        features=cell.features,
        norm=cell.norm,
        cell_norm_placement=cell.cell_norm_placement,
        dropout_rate=cell.dropout_rate,
        norm_scale_init=cell.norm_scale_init,
        deterministic=cell.deterministic,
        dtype=cell.dtype,
        param_dtype=cell.param_dtype,
    )


def _check_common(features: int, dropout_rates: dict[str, float]) -> None:
    if features < 1:
        raise ValueError(f"features must be >= 1, got {features}")
    for name, rate in dropout_rates.items():
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")


def _check_input(x: jax.Array, h: jax.Array, input_projection: nn.Module, other: int) -> None:
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
    """The LARNN cell without attention: a batch-normalised LSTM with ELU output.

    ``z = W_x x_t + W_h h_{t-1} + b``, then :class:`GatedUpdate` (``norm``,
    ``cell_norm_placement``, ``dropout_rate`` and ``norm_scale_init`` are its attributes). Isolates what attention
    adds. Carry: ``(c, h)``, both ``(B, H)``, as Flax's ``LSTMCell``.
    """

    features: int
    norm: NormKind = "batch"
    cell_norm_placement: CellNormPlacement = "output"
    dropout_rate: float = 0.0
    norm_scale_init: float = 1.0
    deterministic: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check_norm_kind(self.norm)
        check_cell_norm_placement(self.cell_norm_placement)
        _check_common(self.features, {"dropout_rate": self.dropout_rate})
        super().__post_init__()

    def setup(self) -> None:
        dense: dict[str, Any] = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.input_gates = nn.Dense(4 * self.features, **dense)
        self.hidden_gates = nn.Dense(4 * self.features, use_bias=False, **dense)
        self.update = gated_update(self)

    def __call__(
        self, carry: tuple[jax.Array, jax.Array], x: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        """One step. ``carry = (c, h)``, each ``(B, H)``; ``x``: ``(B, D)``. Returns ``(c, h), h``."""
        c_prev, h_prev = carry
        _check_input(x, h_prev, self.input_gates, other=0)
        z = self.input_gates(x) + self.hidden_gates(h_prev)
        c, h = self.update(z, c_prev, self.update.output_dropout(h_prev.shape[:-1], h_prev.dtype))
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


class ConcatDense(nn.Module):
    """``W [x ; r] + b``: one dense layer on the concatenation of an input ``x`` and the rest ``r``.

    Computed part by part, so that ``x``'s part can be applied to a whole sequence before a scan
    (:meth:`LARNNCell.input_terms`). Its parameters and their initialisation are those of
    ``nn.Dense`` on the concatenation: ``kernel`` ``(D + rest_features, features)``, ``bias``.

    Attributes:
      features: output features ``F``.
      rest_features: features of ``r``; ``D`` comes from the first ``x`` seen.
    """

    features: int
    rest_features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array | None, rest: jax.Array | None) -> jax.Array:
        """``W_x x + b`` (``rest`` None), ``W_r r`` (``x`` None) or ``W [x ; r] + b``.

        ``x``: ``(..., D)``; ``rest``: ``(..., rest_features)``. Returns ``(..., F)``.
        """
        if self.has_variable("params", "kernel"):
            shape: tuple[int, ...] = self.get_variable("params", "kernel").shape
        elif x is None:
            raise ValueError(f"{self.name}: the first call must include the input x")
        else:
            shape = (x.shape[-1] + self.rest_features, self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        input_features = shape[0] - self.rest_features
        if x is not None and x.shape[-1] != input_features:
            raise ValueError(
                f"{type(self.parent).__name__}: input has {x.shape[-1]} features (shape "
                f"{x.shape}) but the parameters were initialised for {input_features}"
            )
        terms = []
        if x is not None:
            x, input_kernel, bias = promote_dtype(
                x, kernel[:input_features], bias, dtype=self.dtype
            )
            terms.append(x @ input_kernel + bias)
        if rest is not None:
            rest, rest_kernel = promote_dtype(rest, kernel[input_features:], dtype=self.dtype)
            terms.append(rest @ rest_kernel)
        return sum(terms[1:], terms[0])


class LARNNCarry(NamedTuple):
    """The state a :class:`LARNNCell` carries from one step to the next.

    Attributes:
      h: ``(B, H)`` previous output ``h_{t-1}``.
      c: ``(B, H)`` previous cell state ``c_{t-1}`` (it enters the window at step ``t``).
      window: the entries of ``c_{t-2} … c_{t-k}`` (:class:`larnn_jax.window.WindowState`).
    """

    h: jax.Array
    c: jax.Array
    window: WindowState


class StepDropout(NamedTuple):
    """The dropout factors of one step (``None`` where that dropout is off).

    Attributes:
      attention: ``(B, k, n)``, on the attention weights.
      output: ``(B, H)``, on ``h_t``.
    """

    attention: jax.Array | None
    output: jax.Array | None


class InputTerms(NamedTuple):
    """The parts of a step that depend on its input ``x_t`` only (no recurrence).

    Attributes:
      query: ``(B, H)``, ``W_q^x x_t + b_q``.
      gates: ``(B, 4H)``, ``W_x x_t + b``.
    """

    query: jax.Array
    gates: jax.Array


class LARNNCell(nn.RNNCellBase):
    """Linear Attention Recurrent Neural Network cell (``docs/model.md``, section 1).

    A BN-LSTM whose gates also see ``a_t``, the multi-head attention of a query built from
    ``[x_t ; h_{t-1}]`` over a first-in-first-out window of the ``k`` most recent cell states.

    Each window entry is projected to a key and a value once, when it enters the window, and the
    window's batch normalisation is folded into the query and the attention output
    (``docs/model.md``, section 2), so a step costs ``O(H² + k·H)`` per sample and gives the
    naive definition's result.

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
      norm_scale_init: the initial scale γ of the gate and cell-state norms ``BN_z`` and
        ``BN_c`` (1; Cooijmans et al. use 0.1, which keeps the gates out of saturation early on).
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
    norm_scale_init: float = 1.0
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
    def draws_dropout(self) -> bool:
        """Whether a step draws dropout masks: in training, with a non-zero rate."""
        rates = (self.dropout_rate, self.kv_dropout_rate, self.attention_dropout_rate)
        return not self.deterministic and max(rates) > 0

    @property
    def scheme(self) -> WindowScheme:
        """How this cell keeps its window and takes the window's statistics."""
        return WindowScheme.for_cell(
            activation_on_keys_and_values=self.activation_on_keys_and_values,
            use_positional_encoding=self.use_positional_encoding,
            norm=self.norm,
            num_heads=self.num_heads,
        )

    @property
    def window_layers(self) -> WindowLayers:
        """The layers that make the window's keys and values (bound: inside ``apply``)."""
        positions = self.use_positional_encoding
        return WindowLayers(
            self.key,
            self.value,
            self.key_position if positions else None,
            self.value_position if positions else None,
            self.key_norm,
            self.value_norm,
        )

    def setup(self) -> None:
        dense: dict[str, Any] = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        features = self.features
        self.query = ConcatDense(features, rest_features=features, **dense)
        # Terms that add the same amount to every score of a head cancel in the softmax, so the
        # keys get no bias where it would be such a term (it could never be learned).
        self.key = nn.Dense(features, use_bias=self.activation_on_keys_and_values, **dense)
        self.value = nn.Dense(features, **dense)
        if self.use_positional_encoding:
            self.key_position = nn.Dense(features, use_bias=False, **dense)
            self.value_position = nn.Dense(features, use_bias=False, **dense)
        window_norm = self.norm if self.activation_on_keys_and_values else "none"
        self.key_norm = FeatureNorm(window_norm, features, use_bias=False, **dense)
        self.value_norm = FeatureNorm(window_norm, features, **dense)
        self.attention_output = nn.Dense(features, **dense)
        self.attention_norm = FeatureNorm(self.norm, features, **dense)
        if self.mode == "residual":
            self.input_gates = nn.Dense(4 * features, **dense)
            self.hidden_gates = nn.Dense(4 * features, use_bias=False, **dense)
            self.attention_gates = nn.Dense(4 * features, use_bias=False, **dense)
        else:
            self.gates = ConcatDense(4 * features, rest_features=2 * features, **dense)
        self.update = gated_update(self)

    def initialize_carry(self, rng: PRNGKey, input_shape: tuple[int, ...]) -> LARNNCarry:
        """The initial carry for inputs of shape ``(*batch, D)``: ``c_{-1} = h_{-1} = 0``.

        Also creates the normalisation statistics, so that a scan carrying ``batch_stats`` finds
        them (``docs/model.md``, section 4). To start from another ``c_{-1}``, replace ``c``.
        """
        del rng
        if self.scope is not None:  # bound (inside init/apply): make the statistics exist
            for norm in (self.key_norm, self.value_norm, self.attention_norm):
                norm.create_variables()
            self.update.create_variables()
        batch = tuple(input_shape[:-1])
        dtype = _carry_dtype(self.dtype, self.param_dtype)
        state = jnp.zeros((*batch, self.features), dtype)
        window = fifo.empty_state(
            batch,
            self.window_size,
            self.features,
            dtype,
            statistics_dtype(dtype, self.param_dtype),
            self.scheme.carries_moments,
        )
        return LARNNCarry(state, state, window)

    @property
    def num_feature_axes(self) -> int:
        return 1

    def __call__(self, carry: LARNNCarry, x: jax.Array) -> tuple[LARNNCarry, jax.Array]:
        """One time step: ``x`` ``(B, D)`` at step ``t`` → (the carry after it, ``h_t`` ``(B, H)``)."""
        if x.ndim != carry.h.ndim or x.shape[:-1] != carry.h.shape[:-1]:
            raise ValueError(
                f"LARNNCell: input of shape {x.shape} does not match the carry's batch shape "
                f"{carry.h.shape[:-1]}; a step takes x of shape (*batch, features) - for whole "
                "sequences (batch, time, features) use LARNNLayer or nn.RNN"
            )
        return self.step(carry, self.input_terms(x))

    def input_terms(self, x: jax.Array) -> InputTerms:
        """The terms of a step that need ``x_t`` only: ``x`` ``(..., D)`` → :class:`InputTerms`.

        ``x`` may hold a whole sequence: one matrix product for all steps.
        """
        query = self.query(x, None)  # first: it names a wrong number of input features
        gates = self.input_gates(x) if self.mode == "residual" else self.gates(x, None)
        return InputTerms(query, gates)

    def step(self, carry: LARNNCarry, terms: InputTerms) -> tuple[LARNNCarry, jax.Array]:
        """One time step from its :class:`InputTerms`; the equations of ``docs/model.md``, section 1.

        Returns the carry after step ``t`` and ``h_t`` ``(B, H)``.
        """
        # c_{t-1} enters the window, in front: W_k c_{t-1} (+ b_k), W_v c_{t-1} + b_v  (B, H) each
        key_entry, value_entry = self.enter(carry.c)
        window = fifo.push(carry.window, key_entry, value_entry)  # (B, k, H) each, newest first
        h, c, moment_sums = self.step_over_window(
            carry.h, carry.c, window, carry.window.moment_sums, terms
        )
        dtype = carry.h.dtype
        return LARNNCarry(h.astype(dtype), c.astype(dtype), fifo.pop(window, moment_sums)), h

    def enter(self, c_prev: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The key and value entries ``(B, H)`` with which ``c_{t-1}`` ``(B, H)`` enters the window.

        Key/value dropout drops features of ``c_{t-1}`` here, once: the entries keep that mask
        while they stay.
        """
        dropped = apply_dropout(c_prev, self.entry_dropout(c_prev.shape[:-1], c_prev.dtype))
        return self.entries(dropped)

    def step_over_window(
        self,
        h_prev: jax.Array,
        c_prev: jax.Array,
        window: WindowView,
        moment_sums: jax.Array,
        terms: InputTerms,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The rest of step ``t`` once ``c_{t-1}`` has entered ``window``.

        Args:
          h_prev, c_prev: ``(B, H)``, ``h_{t-1}`` and ``c_{t-1}``.
          window: the ``k`` entries attended over, newest first.
          moment_sums: the sums over the window's entries before ``c_{t-1}`` entered (see
            :class:`~larnn_jax.window.WindowState`).
          terms: the step's :class:`InputTerms`.

        Returns:
          ``h_t``, ``c_t`` ``(B, H)`` and the moment sums for the next step's window state.
        """
        dropout = self.step_dropout(h_prev.shape[:-1], h_prev.dtype)
        # q = elu(W_q [x_t ; h_{t-1}] + b_q)                                         (B, H)
        query = jax.nn.elu(terms.query + self.query(None, h_prev))
        # a_t = BN_a(elu(W_o concat_h(Σ_j α_j V_j) + b_o))                          (B, H)
        a, moment_sums = self.attend(query, window, moment_sums, dropout.attention)
        # z = W_x x_t + W_h h_{t-1} + W_a a_t + b   (or W [x_t ; h_{t-1} ; a_t] + b)  (B, 4H)
        z = terms.gates + self.recurrent_gate_terms(h_prev, a)
        # c_t = f ⊙ c_{t-1} + i ⊙ g,  h_t = BN_h(o ⊙ elu(BN_c(c_t)))                  (B, H) each
        c, h = self.update(z, c_prev, dropout.output)
        return h, c, moment_sums

    def entry_dropout(self, batch_shape: tuple[int, ...], dtype: Dtype) -> jax.Array | None:
        """The key/value dropout factors ``(*batch, H)`` of an entering cell state (``None``: no
        dropout)."""
        rate = 0.0 if self.deterministic else self.kv_dropout_rate
        return dropout_factors(self, rate, (*batch_shape, self.features), dtype)

    def step_dropout(self, batch_shape: tuple[int, ...], dtype: Dtype) -> StepDropout:
        """The dropout factors that :meth:`step_over_window` draws, in the order it draws them."""
        rate = 0.0 if self.deterministic else self.attention_dropout_rate
        shape = (*batch_shape, self.window_size, self.num_heads)
        return StepDropout(
            attention=dropout_factors(self, rate, shape, dtype),
            output=self.update.output_dropout(batch_shape, dtype),
        )

    def entries(self, c: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What the window stores for cell state ``c`` ``(B, H)``: its key and value entries
        (:func:`larnn_jax.window.stored_entries`)."""
        return fifo.stored_entries(self.window_layers, c, self.scheme)

    def recurrent_gate_terms(self, h_prev: jax.Array, a: jax.Array) -> jax.Array:
        """``W_h h_{t-1} + W_a a_t`` ``(B, 4H)`` (``'layer'`` mode: the same with one matrix)."""
        if self.mode == "residual":
            return self.hidden_gates(h_prev) + self.attention_gates(a)
        return self.gates(None, jnp.concatenate([h_prev, a], axis=-1))

    def attend(
        self,
        query: jax.Array,
        window: WindowView,
        moment_sums: jax.Array,
        weight_dropout: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        """``a_t`` ``(B, H)``: the query ``(B, H)`` attending over ``window``.

        ``moment_sums``: the state's carried sums (see :class:`~larnn_jax.window.WindowState`);
        ``weight_dropout``: the ``(B, k, n)`` dropout factors of the attention weights.
        Returns ``a_t`` and the sums for the next step's state.
        """
        # K_j = BN_K(elu(E_K,j)), V_j = BN_V(elu(E_V,j)) over the valid entries     (B, k, H)
        keys, values, moment_sums = fifo.normalised_keys_and_values(
            self.window_layers, window, moment_sums, self.scheme, running=self.deterministic
        )
        # concat_h Σ_j α_j V_j,  α = softmax_j(<q_h, K_j,h> / √d_k) per head h          (B, H)
        context = multi_head_attention(
            query, keys, values, window.mask, weight_dropout, self.num_heads
        )
        # a_t = BN_a(elu(W_o context + b_o))                                          (B, H)
        return self.attention_norm(
            jax.nn.elu(self.attention_output(context.astype(keys.entries.dtype))),
            use_running_average=self.deterministic,
        ), moment_sums
