"""The native LARNN step (``larnn_jax.native``) against the XLA fused scan, and how it is set up.

In float64 the native scan must give the fused scan's outputs, final carry (``h``, ``c``, the
window's entries, count and moment sums), running statistics and gradients (parameters, inputs,
initial carry) to 1e-10 relative, for every option it covers, with the same dropout masks: it
draws them itself, from the same keys, and must reproduce ``dropout_keep_mask`` bit for bit. The
float64 comparisons with the NumPy reference run it too (``tests/test_exactness.py``, runner
``native``). In float32, a few Adam steps of a classifier give the fused scan's parameters to
float32 rounding.
"""

from __future__ import annotations

import concurrent.futures

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cell_cases import assert_close_trees

from larnn_jax import BNLSTMCell, LARNNCell, LARNNLayer, native, scans
from larnn_jax.cell import dropout_keep_mask
from larnn_jax.models import SequenceClassifier
from larnn_jax.native import build

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native step unavailable: {native.unavailable_reason()}"
)

B, T, D, H = 3, 9, 4, 6
#: float64: the native and fused scans differ by rounding only (measured: at most 4e-11).
RTOL = 1e-10


def make_cell(**options) -> LARNNCell:
    defaults = dict(features=H, num_heads=2, window_size=3, param_dtype=jnp.float64)
    return LARNNCell(**{**defaults, **options})


def random_initial_carry(cell: LARNNCell, batch: int):
    """A carry of random values, with partly filled windows (count 0, 1, ... up to k - 1)."""
    initial = cell.initialize_carry(jax.random.key(0), (batch, D))
    rng = np.random.default_rng(5)
    initial = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(size=a.shape)) if a.dtype == jnp.float64 else a, initial
    )
    stays = initial.window.key_entries.shape[-2]
    count = jnp.minimum(jnp.arange(batch, dtype=jnp.int32), stays)
    return initial._replace(window=initial.window._replace(count=count))


def run(scan: str, cell: LARNNCell, batch: int = B, train: bool = True, **call):
    """``(loss, gradients of (params, x, initial carry), batch_stats after)`` of ``scan``: a loss
    of every output and final-carry part."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (batch, T, D), jnp.float64)
        if call.get("time_major"):
            x = jnp.swapaxes(x, 0, 1)
        init_layer = LARNNLayer(cell, scan="plain")
        variables = init_layer.init(jax.random.key(2), x, time_major=bool(call.get("time_major")))
        variables = jax.tree.map(  # away from the trivial initial values
            lambda a: a + 0.2 * jax.random.normal(jax.random.key(3), a.shape, a.dtype), variables
        )
        layer = LARNNLayer(cell, scan=scan)

        def loss(params, x, initial):
            (carry, y), updates = layer.apply(
                {**variables, "params": params},
                x,
                initial_carry=initial,
                deterministic=not train,
                return_carry=True,
                rngs={"dropout": jax.random.key(7)},
                mutable=["batch_stats"],
                **call,
            )
            weights = jnp.linspace(0.5, 1.5, y.size).reshape(y.shape)
            parts = [jnp.sum(jnp.sin(y) * weights)]
            parts += [jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(carry) if a.dtype.kind == "f"]
            counts = carry.window.count
            return sum(parts), (updates, counts)

        gradient = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True, allow_int=True)
        (value, (updates, counts)), grads = jax.jit(gradient)(
            variables["params"], x, random_initial_carry(cell, batch)
        )
        return value, grads, updates, counts


def assert_same(got, want):
    """Within :data:`RTOL` (a gradient that is zero but for rounding, such as a bias's just before a
    batch norm: of 1e-2 of the largest gradient, i.e. within 1e-12 of it; both scans sum such a
    gradient's rounding noise in a different order)."""
    assert_close_trees(got, want, RTOL, zero_floor=1e-2)


def compare(cell: LARNNCell, batch: int = B, train: bool = True, **call) -> None:
    value, grads, updates, counts = run("native", cell, batch, train, **call)
    want_value, want_grads, want_updates, want_counts = run("fused", cell, batch, train, **call)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    assert_same(grads, want_grads)
    assert_same(updates, want_updates)
    np.testing.assert_array_equal(counts, want_counts)


ALL_DROPOUTS = dict(dropout_rate=0.3, kv_dropout_rate=0.3, attention_dropout_rate=0.3)
CELLS = {
    "residual": dict(),  # the paper's options: window statistics from carried moment sums
    "layer-pe": dict(mode="layer", use_positional_encoding=True),
    "noact": dict(activation_on_keys_and_values=False),
    "noact-pe": dict(activation_on_keys_and_values=False, use_positional_encoding=True),
    "window1": dict(window_size=1),
    "window1-pe": dict(window_size=1, use_positional_encoding=True),
    "one-head": dict(num_heads=1, window_size=4),
    "head-size-1": dict(num_heads=6, window_size=2),
    "dropouts": ALL_DROPOUTS,
    "dropouts-layer-pe": dict(mode="layer", use_positional_encoding=True, **ALL_DROPOUTS),
}
#: The cases of the default suite; the slow suite runs every cell in both modes.
FAST = {("residual", True), ("layer-pe", True), ("noact", False), ("dropouts", True)}


@pytest.mark.parametrize(
    ("name", "train"),
    [
        pytest.param(name, train, marks=() if (name, train) in FAST else pytest.mark.slow)
        for name in CELLS
        for train in (True, False)
    ],
)
def test_equals_the_fused_scan(name, train):
    compare(make_cell(**CELLS[name]), train=train)


@pytest.mark.parametrize(
    "call",
    [
        dict(reverse=True, keep_order=True, seq_lengths=jnp.array([2, T, 5])),
        pytest.param(dict(seq_lengths=jnp.array([T, 4, 1])), marks=pytest.mark.slow),
        pytest.param(dict(time_major=True), marks=pytest.mark.slow),
    ],
    ids=["reverse-keep_order-seq_lengths", "seq_lengths", "time_major"],
)
def test_equals_the_fused_scan_with_call_options(call):
    compare(make_cell(**ALL_DROPOUTS), **call)


def test_equals_the_fused_scan_with_the_batch_shared_by_threads(monkeypatch):
    """A batch of 40 (and 37: rows not a multiple of the products' row blocks) split among two
    threads, which meet at every batch norm."""
    monkeypatch.setenv("LARNN_JAX_NATIVE_THREADS", "2")
    compare(make_cell(**ALL_DROPOUTS), batch=40)
    compare(make_cell(use_positional_encoding=True), batch=37, train=False)


def test_a_training_call_gives_the_same_bits_whatever_runs_beside_it(monkeypatch):
    """A call's results depend on its inputs and its thread count only: the same training
    gradient (a batch of 64 shared by two threads), computed 8 times, 4 at a time from Python
    threads that keep XLA's own threads busy, is the same to the bit every time."""
    monkeypatch.setenv("LARNN_JAX_NATIVE_THREADS", "2")
    cell = make_cell(param_dtype=jnp.float32, **ALL_DROPOUTS)
    x = jax.random.normal(jax.random.key(1), (64, 24, D), jnp.float32)
    variables = LARNNLayer(cell, scan="plain").init(jax.random.key(2), x)
    layer = LARNNLayer(cell, scan="native")

    @jax.jit
    def gradient(params):
        def loss(params):
            y, updates = layer.apply(
                {**variables, "params": params},
                x,
                deterministic=False,
                rngs={"dropout": jax.random.key(7)},
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(y)), updates

        return jax.grad(loss, has_aux=True)(variables["params"])

    first = jax.block_until_ready(gradient(variables["params"]))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = list(pool.map(lambda _: gradient(variables["params"]), range(8)))
    for other in others:
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(other), jax.device_get(first))


def test_evaluation_in_blocks_of_rows():
    """Evaluation runs a few rows at a time through the whole sequence (``kEvaluationRows``, 8):
    a batch of 21 is three blocks, the last one partial, each row with its own last step."""
    lengths = jnp.array([T, 1, 4, T, 7, 2, T, 5, 3, T, 6, 1, T, 8, 2, 4, T, 9, 3, 1, T])
    compare(make_cell(), batch=21, train=False, seq_lengths=lengths)


@pytest.mark.slow
def test_bidirectional():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float64)

        def loss(scan: str):
            cell = make_cell(deterministic=False, **ALL_DROPOUTS)
            model = nn.Bidirectional(LARNNLayer(cell, scan=scan), LARNNLayer(cell, scan=scan))
            variables = nn.Bidirectional(
                LARNNLayer(cell, scan="plain"), LARNNLayer(cell, scan="plain")
            ).init(jax.random.key(2), x)

            def f(params):
                y, _ = model.apply(
                    {**variables, "params": params},
                    x,
                    rngs={"dropout": jax.random.key(7)},
                    mutable=["batch_stats"],
                )
                return jnp.sum(jnp.sin(y))

            return jax.jit(jax.value_and_grad(f))(variables["params"])

        got, want = loss("native"), loss("fused")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    assert_same(got[1], want[1])


@pytest.mark.parametrize("size", [1, 2, 3, 16, 17, 33, 1000, 1027])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_decisions_are_dropout_keep_mask(size, rate):
    """The native Threefry bits give ``dropout_keep_mask``'s decisions, element for element."""
    key = jax.random.key(size)
    want, _ = dropout_keep_mask(key, rate, (size,))
    levels = round((1.0 - rate) * 2**16)
    build.load()  # registers the FFI targets
    keep = jax.ffi.ffi_call("larnn_keep_mask", jax.ShapeDtypeStruct((size,), jnp.uint8))(
        jax.random.key_data(key), levels=np.int64(levels)
    )
    np.testing.assert_array_equal(np.asarray(keep).astype(bool), np.asarray(want))
    assert 0 < np.count_nonzero(want) < size or size < 17


def test_float32_training_steps_give_the_fused_scans_parameters_to_rounding():
    """Three Adam steps of a small classifier with every dropout, native against fused, in float32.

    Float32 rounding alone moves this training a long way: at the first step every sample's
    window holds the same entry (zero initial state), so the window's batch norm divides rounding
    noise by sqrt(eps), and Adam gives tiny gradients full-size steps. Inputs changed by one unit
    in the last place move the fused scan's parameters by about 0.6 % (L2, after three steps), as
    much as the native scan differs from it (measured: 0.70 % against 0.59-0.71 %). So the native
    parameters must be as close to the fused scan's as the fused scan is to itself when its
    rounding changes: within twice that spread.
    """
    cell = LARNNCell(8, num_heads=4, window_size=3, **ALL_DROPOUTS)
    x = jax.random.normal(jax.random.key(1), (32, 12, 5), jnp.float32)
    labels = jax.random.randint(jax.random.key(2), (32,), 0, 3)
    optimizer = optax.adam(1e-2)

    def trainer(scan: str):
        model = SequenceClassifier(3, cell, num_layers=2, scan=scan)

        @jax.jit
        def step(params, stats, state, x, key):
            def loss(params):
                logits, updates = model.apply(
                    {"params": params, "batch_stats": stats},
                    x,
                    deterministic=False,
                    rngs={"dropout": key},
                    mutable=["batch_stats"],
                )
                cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
                return cross_entropy.mean(), updates["batch_stats"]

            (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, state = optimizer.update(grads, state)
            return optax.apply_updates(params, updates), stats, state

        def train(x):
            variables = model.init(jax.random.key(0), x, deterministic=True)
            params, stats = variables["params"], variables["batch_stats"]
            state = optimizer.init(params)
            for index in range(3):
                params, stats, state = step(params, stats, state, x, jax.random.key(10 + index))
            return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(params)])

        return train

    fused, native_scan = trainer("fused"), trainer("native")
    want = fused(x)

    def distance(params):
        return float(jnp.linalg.norm(params - want) / jnp.linalg.norm(want))

    spread = max(distance(fused(x * (1 + sign * 2.0**-23))) for sign in (1, -1))
    assert 0 < spread < 0.05
    assert distance(native_scan(x)) <= 2 * spread


def test_auto_runs_the_native_step_and_the_switch_turns_it_off(monkeypatch):
    cell = make_cell()
    assert scans.choose_scan("auto", cell, training=True) == "native"
    monkeypatch.setenv("LARNN_JAX_NATIVE", "0")
    assert scans.choose_scan("auto", cell, training=True) == "fused"
    assert native.unavailable_reason() == "LARNN_JAX_NATIVE=0 switches the native LARNN step off"
    with pytest.raises(ValueError, match="scan='native' cannot run here: LARNN_JAX_NATIVE=0"):
        scans.choose_scan("native", cell, training=True)


@pytest.mark.parametrize(
    ("cell", "dtype", "reason"),
    [
        (make_cell(norm="layer"), None, "norm='layer' (the native step covers norm='batch')"),
        (make_cell(cell_norm_placement="carried"), None, "cell_norm_placement='carried'"),
        (make_cell(param_dtype=jnp.bfloat16), None, "float32 or all float64, not bfloat16"),
        (make_cell(param_dtype=jnp.float32), jnp.float64, "float64, not float32, float64"),
        (BNLSTMCell(4), None, "BNLSTMCell is not LARNNCell"),
    ],
    ids=["layer-norm", "carried", "bfloat16", "mixed", "bnlstm"],
)
def test_what_is_not_covered_is_named(cell, dtype, reason):
    assert reason in native.why_not_covered(cell, dtype)


def test_without_a_compiler_the_build_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("LARNN_JAX_CACHE_DIR", str(tmp_path))
    with pytest.raises(build.BuildError, match=r"no C\+\+ compiler found \('no-such-compiler'"):
        build.build()
    assert not any(tmp_path.iterdir())
