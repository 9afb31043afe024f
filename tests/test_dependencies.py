"""The library needs only JAX, Flax and NumPy: the training pipeline's packages are an extra.

A fresh interpreter in which those packages cannot be imported imports ``larnn_jax``, builds and
applies a LARNN cell, layer and classifier, and loads a ``.npz`` dataset with
``experiments.data``, the pipeline's dataset code, which needs only NumPy (downloading UCI HAR
needs pooch).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: What ``setup.cfg`` puts in the ``train`` and ``tune`` extras, as imported.
PIPELINE_MODULES = (
    "optax",
    "orbax",
    "orbax.checkpoint",
    "pooch",
    "tqdm",
    "matplotlib",
    "sklearn",
    "ray",
    "hyperopt",
    "pandas",
)

SCRIPT = """
import sys

for name in {modules!r}:
    sys.modules[name] = None  # importing it now raises ImportError

import jax
import jax.numpy as jnp

import larnn_jax
from larnn_jax import LARNNCell, LARNNLayer
from experiments.data import load_dataset
from larnn_jax.models import SequenceClassifier

x = jnp.ones((2, 5, 3))
cell = LARNNCell(features=4, num_heads=2, window_size=3)
variables = LARNNLayer(cell).init(jax.random.key(0), x)
assert LARNNLayer(cell).apply(variables, x).shape == (2, 5, 4)
model = SequenceClassifier(6, cell, num_layers=2)
logits = model.apply(model.init(jax.random.key(0), x, deterministic=True), x, deterministic=True)
assert logits.shape == (2, 6)
assert load_dataset({dataset!r}).num_classes == 2
loaded = sorted(name for name in {modules!r} if sys.modules.get(name) is not None)
assert not loaded, loaded
print("ok")
"""


def test_the_library_imports_and_runs_without_the_pipelines_packages(
    tmp_path: pathlib.Path,
) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5, 3)).astype(np.float32), np.arange(8) % 2
    data = tmp_path / "toy.npz"
    np.savez(data, X_train=x, y_train=y, X_test=x, y_test=y)
    script = SCRIPT.format(modules=PIPELINE_MODULES, dataset=f"npz:{data}")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
