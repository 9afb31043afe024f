"""larnn_jax: the Linear Attention Recurrent Neural Network (LARNN) in JAX/Flax.

The names below are imported on first use, so that the modules that need only JAX and NumPy
(:mod:`larnn_jax.exported`, :mod:`larnn_jax.inference`) import without Flax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from larnn_jax import models
    from larnn_jax.cell import BNLSTMCell, LARNNCarry, LARNNCell
    from larnn_jax.layers import LARNN, LARNNLayer
    from larnn_jax.window import positional_encoding

#: Each public name → the module that defines it.
_MODULES = {
    "LARNN": "larnn_jax.layers",
    "BNLSTMCell": "larnn_jax.cell",
    "LARNNCarry": "larnn_jax.cell",
    "LARNNCell": "larnn_jax.cell",
    "LARNNLayer": "larnn_jax.layers",
    "models": "larnn_jax.models",
    "positional_encoding": "larnn_jax.window",
}

__all__ = [
    "LARNN",
    "BNLSTMCell",
    "LARNNCarry",
    "LARNNCell",
    "LARNNLayer",
    "models",
    "positional_encoding",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Imports a public name's module on first use (PEP 562)."""
    if name not in _MODULES:
        raise AttributeError(f"module 'larnn_jax' has no attribute {name!r}")
    module = importlib.import_module(_MODULES[name])
    value = module if name == "models" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES])
