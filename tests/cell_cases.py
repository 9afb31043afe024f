"""Small ``LARNNCell`` configurations, random variables and a tree comparison, shared by the
comparison tests.

``tests/test_exactness.py`` compares the cell with the float64 reference of docs/model.md §1 and
``tests/test_reference_cell.py`` with ``larnn_jax.reference``'s cell; both run these cases.
``tests/test_fused_scan.py`` and ``tests/test_native.py`` compare scans' gradients with
:func:`assert_close_trees`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from larnn_jax import LARNNCell


@dataclasses.dataclass(frozen=True)
class CellCase:
    """One cell configuration and input shape: ``x`` is ``(batch, steps, inputs)``."""

    mode: str = "residual"
    pe: bool = True
    act: bool = True
    norm: str = "batch"
    cell_norm_placement: str = "output"
    batch: int = 3
    inputs: int = 5
    features: int = 6
    heads: int = 2
    window: int = 3
    dropout_rate: float = 0.0
    kv_dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0

    @property
    def steps(self) -> int:
        """``T = 2k + 5``: the window fills up and slides for ``k + 5`` steps."""
        return 2 * self.window + 5

    def cell(self, dtype: np.typing.DTypeLike, deterministic: bool = True) -> LARNNCell:
        """The cell under test (its dropout rates are the case's, 0 unless given)."""
        return LARNNCell(
            features=self.features,
            num_heads=self.heads,
            window_size=self.window,
            mode=self.mode,
            use_positional_encoding=self.pe,
            activation_on_keys_and_values=self.act,
            norm=self.norm,
            cell_norm_placement=self.cell_norm_placement,
            dropout_rate=self.dropout_rate,
            kv_dropout_rate=self.kv_dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            deterministic=deterministic,
            param_dtype=dtype,
        )


def randomised(variables: dict, seed: int = 0) -> dict:
    """Every leaf of a cell's variables (arrays or shapes) replaced by seeded random values.

    Kernels ``(fan_in, fan_out)`` ~ N(0, 1/fan_in) (the scale of the LeCun-normal initialiser),
    scales 1 ± 0.3, biases ± 0.2, running means ± 0.3, running variances in [0.5, 1.5]: the
    initial values (ones, zeros) would hide a term that is missing or applied twice.

    Returns:
      The same tree of NumPy arrays, each of its leaf's dtype.
    """
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: jax.Array) -> np.ndarray:
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.normal(size=shape) / math.sqrt(shape[0])
        elif name == "scale":
            value = 1.0 + rng.uniform(-0.3, 0.3, shape)
        elif name == "bias":
            value = rng.uniform(-0.2, 0.2, shape)
        elif name == "mean":
            value = rng.uniform(-0.3, 0.3, shape)
        elif name == "var":
            value = rng.uniform(0.5, 1.5, shape)
        else:
            raise AssertionError(f"unexpected variable {jax.tree_util.keystr(path)}")
        return np.asarray(value, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


def assert_close_trees(got, want, rtol: float, zero_floor: float) -> None:
    """Every leaf of ``got`` within ``rtol`` of the largest value of ``want``'s leaf, or, for a
    leaf that is zero but for rounding (such as the gradient of a bias just before a batch norm),
    of ``zero_floor`` times the largest value of all leaves. Integer cotangents (``float0``) and
    empty leaves are skipped."""
    leaves = [b for b in jax.tree.leaves(want) if b.dtype != jax.dtypes.float0 and b.size]
    overall = max(float(np.abs(b).max()) for b in leaves)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        if a.dtype == jax.dtypes.float0 or a.size == 0:
            continue
        scale = max(float(np.abs(b).max()), zero_floor * overall)
        error = float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale
        assert error <= rtol, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"
