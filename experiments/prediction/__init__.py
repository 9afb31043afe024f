"""Predictions of a trained run's model on new data, as a library.

* ``predictor.py``: :class:`Predictor` (a run's model, classifying raw sequences) and
  :class:`StreamPredictor` (a stream of samples, one time step at a time);
* ``inputs.py``: the input files and lines, each problem an :class:`InputError` naming the file
  and line;
* ``writers.py``: the predictions as CSV or JSON lines.

The command line over them is ``python -m experiments.predict``.
"""

from experiments.prediction.inputs import InputError, Sequences, read_input, sliding_windows
from experiments.prediction.predictor import Predictor, StreamPredictor
from experiments.prediction.writers import PredictionWriter
from larnn_jax.inference import Prediction

__all__ = [
    "InputError",
    "Prediction",
    "PredictionWriter",
    "Predictor",
    "Sequences",
    "StreamPredictor",
    "read_input",
    "sliding_windows",
]
