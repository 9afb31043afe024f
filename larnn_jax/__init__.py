"""larnn_jax: the Linear Attention Recurrent Neural Network (LARNN) in JAX/Flax."""

from larnn_jax import models
from larnn_jax.cell import BNLSTMCell, LARNNCarry, LARNNCell
from larnn_jax.layers import LARNN, LARNNLayer
from larnn_jax.window import positional_encoding

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
