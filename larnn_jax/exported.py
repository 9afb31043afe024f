"""A trained classifier as one self-contained file, run with JAX and NumPy alone.

:func:`export_classifier` writes a :class:`~larnn_jax.models.SequenceClassifier` and its variables
as ``jax.export`` serialisations (StableHLO, versioned, with symbolic shapes), beside what
prediction needs: the input standardisation, the class names, the window length, and whatever
the caller records of where the model comes from. :func:`load` reads such a file back, needing
only JAX (with ``flatbuffers``, which ``jax.export`` reads its serialisations with) and NumPy:
neither Flax nor this library's models are imported.

Example::

    model = load("har.larnn")
    probabilities = model.predict(x)          # x: (N, T', C) raw → (N, K)
    stream = model.stream(stride=32)
    for sample in sensor:                     # (C,) raw values per time step
        prediction = stream.push(sample)      # a Prediction every 32 samples, else None

The file is a zip archive (stored, not compressed) of:

* ``metadata.json``: ``format`` (:data:`FORMAT`), ``format_version`` (:data:`FORMAT_VERSION`),
  ``created_with`` (the versions of larnn_jax and JAX that wrote it), ``platforms`` (those the
  functions were lowered for), ``window_length`` ``T``, ``channels`` ``C``, ``channel_mean`` and
  ``channel_std`` (``C`` numbers each, or null: no standardisation), ``class_names`` (``K``),
  ``batch_size`` (``predict``'s default), ``variables`` (the path of each variable in the Flax
  tree, e.g. ``params/classifier/kernel``), ``members`` (the SHA-256 of each other member) and
  ``source`` (free-form: the run's configuration, its checkpoint's digest, ...);
* ``variables.npz``: the model's variables ``arr_0``, ``arr_1``, ... in the order of
  ``variables``: the functions take them as their first argument (``W`` below), so that they
  compute as the training pipeline's jitted functions do, to the last bit;
* ``classifier.jaxexport``: ``(W, x (B, T', C) float32 standardised, lengths (B,) int32)`` →
  logits ``(B, K)`` in evaluation mode, ``B`` and ``T'`` symbolic: one file serves every batch
  size and sequence length;
* ``step.jaxexport``: ``(W, carries, x (B, C))`` → ``(carries, logits (B, K))``, one time step
  of the network (:meth:`~larnn_jax.models.SequenceClassifier.step`), ``B`` symbolic;
  ``carries`` is a tuple of arrays, batch axis first;
* ``initial_carries.npz``: those arrays for one fresh sequence (batch 1), ``arr_0``, ``arr_1``...

The functions run the XLA scans (``scan='fused'`` for LARNN cells, ``'plain'`` otherwise), never
the native step (:mod:`larnn_jax.native`), whose compiled library a loading machine need not
have.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

import larnn_jax
from larnn_jax.inference import WindowStream, predict_in_batches, standardize

if TYPE_CHECKING:
    from larnn_jax.models import SequenceClassifier
    from larnn_jax.typing import PyTree

#: What ``metadata.json``'s ``format`` says.
FORMAT = "larnn_jax.exported"
#: The version of the file's layout that this module writes and reads.
FORMAT_VERSION = 1
METADATA = "metadata.json"
CLASSIFIER = "classifier.jaxexport"
STEP = "step.jaxexport"
INITIAL_CARRIES = "initial_carries.npz"
VARIABLES = "variables.npz"
#: Where the functions are lowered for by default: any CPU and NVIDIA GPU.
PLATFORMS = ("cpu", "cuda")


class ExportFormatError(ValueError):
    """A file that :func:`load` cannot use; the message names the file, what is wrong and why."""


def export_classifier(
    file: str | os.PathLike[str] | IO[bytes],
    model: SequenceClassifier,
    variables: PyTree,
    *,
    window_length: int,
    channels: int,
    class_names: Sequence[str],
    channel_mean: np.ndarray | None = None,
    channel_std: np.ndarray | None = None,
    batch_size: int = 256,
    source: dict[str, Any] | None = None,
    platforms: Sequence[str] = PLATFORMS,
) -> dict[str, Any]:
    """Writes ``model`` with ``variables`` to ``file`` (a path or a binary file open for
    writing) in evaluation mode; returns the metadata written.

    Args:
        file: where to write.
        model: the classifier (needs Flax); it is exported with an XLA scan whatever its
            ``scan``.
        variables: its variables (``params``, ``batch_stats``).
        window_length: ``T``, the length of the training sequences (the window a stream
            classifies).
        channels: ``C``.
        class_names: the name of each class, index = class (``K`` names).
        channel_mean, channel_std: ``(C,)`` the standardisation of raw inputs, or None.
        batch_size: the sequences per call that the loaded model's ``predict`` uses by default
            (the training's, for the same float rounding as the training pipeline's
            predictions: XLA's products round by their shapes).
        source: recorded as ``metadata.json``'s ``source`` (JSON-serialisable).
        platforms: where the functions may run (``jax.export`` platforms).
    """
    from larnn_jax.native.build import TARGETS  # Flax only where a model is exported
    from larnn_jax.scans import runs_the_larnn_step

    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for {model.num_classes} classes")
    xla = model.clone(scan="fused" if runs_the_larnn_step(model.cell) else "plain")

    paths_and_weights, tree = jax.tree_util.tree_flatten_with_path(variables)
    weights = tuple(np.asarray(weight) for _, weight in paths_and_weights)

    def classifier(weights: tuple[jax.Array, ...], x: jax.Array, lengths: jax.Array) -> jax.Array:
        return cast(
            jax.Array,
            xla.apply(
                jax.tree.unflatten(tree, weights), x, deterministic=True, seq_lengths=lengths
            ),
        )

    initial = xla.initialize_carries((1,))
    leaves, structure = jax.tree.flatten(initial)

    def step(
        weights: tuple[jax.Array, ...], carries: tuple[jax.Array, ...], x: jax.Array
    ) -> tuple[tuple, jax.Array]:
        after, logits = xla.apply(
            jax.tree.unflatten(tree, weights),
            jax.tree.unflatten(structure, carries),
            x,
            method="step",
        )
        return tuple(jax.tree.leaves(after)), cast(jax.Array, logits)

    batch, steps = export.symbolic_shape("B, T")
    weight_specs = tuple(jax.ShapeDtypeStruct(weight.shape, weight.dtype) for weight in weights)
    functions = {
        CLASSIFIER: export.export(jax.jit(classifier), platforms=platforms)(
            weight_specs,
            jax.ShapeDtypeStruct((batch, steps, channels), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
        ),
        STEP: export.export(jax.jit(step), platforms=platforms)(
            weight_specs,
            tuple(jax.ShapeDtypeStruct((batch, *leaf.shape[1:]), leaf.dtype) for leaf in leaves),
            jax.ShapeDtypeStruct((batch, channels), jnp.float32),
        ),
    }
    members = {}
    for name, exported in functions.items():
        text = exported.mlir_module()
        assert not any(target in text for target in TARGETS), f"{name} calls the native step"
        members[name] = bytes(exported.serialize())
    members[VARIABLES] = _npz(weights)
    members[INITIAL_CARRIES] = _npz(np.asarray(leaf) for leaf in leaves)

    def numbers(array: np.ndarray | None) -> list[float] | None:
        return None if array is None else [float(value) for value in np.asarray(array, np.float32)]

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_with": {"larnn_jax": larnn_jax.__version__, "jax": jax.__version__},
        "platforms": list(platforms),
        "window_length": int(window_length),
        "channels": int(channels),
        "channel_mean": numbers(channel_mean),
        "channel_std": numbers(channel_std),
        "class_names": [str(name) for name in class_names],
        "batch_size": int(batch_size),
        "variables": [
            jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in paths_and_weights
        ],
        "members": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
        "source": source or {},
    }
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(METADATA, json.dumps(metadata, indent=2) + "\n")
        for name, data in members.items():
            archive.writestr(name, data)
    return metadata


def _npz(arrays: Any) -> bytes:
    """``arrays`` as the bytes of an ``.npz`` file: ``arr_0``, ``arr_1``, ..."""
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    return buffer.getvalue()


def _arrays(data: bytes) -> tuple[np.ndarray, ...]:
    """The arrays of :func:`_npz`'s bytes, in order."""
    with np.load(io.BytesIO(data)) as arrays:
        return tuple(arrays[f"arr_{index}"] for index in range(len(arrays.files)))


class ExportedClassifier:
    """A classifier read from an exported file (:func:`load`).

    Attributes:
        path: the file.
        metadata: its ``metadata.json``.
        window_length: ``T``.
        channels: ``C``.
        class_names: the name of each class, index = class.
        channel_mean, channel_std: ``(C,)`` float32, or None (no standardisation).
        batch_size: the sequences per call of :meth:`predict` by default.
        source: where the model comes from, as its exporter recorded it.
    """

    def __init__(
        self,
        path: str,
        metadata: dict[str, Any],
        classifier: export.Exported,
        step: export.Exported,
        weights: tuple[np.ndarray, ...],
        initial_carries: tuple[np.ndarray, ...],
    ):
        self.path = path
        self.metadata = metadata
        self.window_length = int(metadata["window_length"])
        self.channels = int(metadata["channels"])
        self.class_names = tuple(metadata["class_names"])
        self.channel_mean, self.channel_std = (
            None if metadata[key] is None else np.asarray(metadata[key], np.float32)
            for key in ("channel_mean", "channel_std")
        )
        self.batch_size = int(metadata["batch_size"])
        self.source: dict[str, Any] = metadata["source"]
        self._step = step
        self._weights = weights
        self._initial_carries = initial_carries

        def probabilities(
            weights: tuple[jax.Array, ...], x: jax.Array, lengths: jax.Array
        ) -> jax.Array:
            logits = classifier.call(weights, x, lengths)
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        self._probabilities = jax.jit(probabilities)

    def standardize(self, x: Any) -> np.ndarray:
        """Raw inputs ``(..., C)`` → what the model reads (:func:`larnn_jax.inference.standardize`
        with the training's statistics)."""
        return standardize(x, self.channel_mean, self.channel_std)

    def predict(
        self, x: np.ndarray, lengths: np.ndarray | None = None, *, batch_size: int | None = None
    ) -> np.ndarray:
        """Class probabilities ``(N, K)`` float32 of raw sequences ``x`` ``(N, T', C)``, any
        ``T'``.

        Args:
            x: sequences as the sensor gives them: the standardisation is applied here.
            lengths: ``(N,)`` valid steps of each sequence (default: all ``T'``).
            batch_size: sequences per call of the model (default: :attr:`batch_size`).

        Raises:
            ValueError: ``x`` is not ``(N, T', C)``.
            larnn_jax.inference.InputRangeError: a value the model cannot read, or a sequence
                whose output is NaN or infinite (its largest value named).
        """
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[-1] != self.channels:
            raise ValueError(
                f"expected sequences of shape (N, T, {self.channels}), got shape {x.shape}"
            )

        def probabilities(batch: np.ndarray, valid: np.ndarray | None) -> jax.Array:
            if valid is None:
                valid = np.full(len(batch), batch.shape[1], np.int32)
            return self._probabilities(self._weights, batch, valid)

        return predict_in_batches(
            probabilities,
            self.standardize(x),
            lengths,
            batch_size or self.batch_size,
            len(self.class_names),
            raw=x,
        )

    def step(
        self, carries: tuple[jax.Array, ...], x: jax.Array
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """One time step of the network: ``carries`` (batch ``B``) and ``x`` ``(B, C)``
        standardised → the carries after it and the logits ``(B, K)``."""
        carries, logits = self._step.call(self._weights, tuple(carries), x)
        return tuple(carries), logits

    def initial_carries(self, batch: int) -> tuple[np.ndarray, ...]:
        """The carries of ``batch`` fresh sequences, as :meth:`step` takes them."""
        return tuple(
            np.broadcast_to(leaf, (batch, *leaf.shape[1:])) for leaf in self._initial_carries
        )

    def stream(self, stride: int) -> WindowStream:
        """A :class:`~larnn_jax.inference.WindowStream` that classifies the last ``T`` samples
        every ``stride``."""
        return WindowStream(
            self.step,
            self.initial_carries,
            window_length=self.window_length,
            stride=stride,
            standardize=self.standardize,
            channels=self.channels,
        )


def load(path: str | os.PathLike[str]) -> ExportedClassifier:
    """Reads a file written by :func:`export_classifier`.

    Raises:
        ExportFormatError: ``"<path>: ..."``: no such file; not an exported model; a format
            version other than :data:`FORMAT_VERSION`; a damaged member (a failed CRC or
            SHA-256 check); a function that this JAX cannot read.
    """
    where = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ExportFormatError(f"{where}: no such file") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise ExportFormatError(
            f"{where}: not an exported model: not a zip archive ({err}); the file is damaged, "
            "cut short, or of another kind"
        ) from None
    with archive:
        metadata = _read_metadata(archive, where)
        blobs = {name: _read_member(archive, name, metadata, where) for name in metadata["members"]}
    functions = {}
    for name in (CLASSIFIER, STEP):
        try:
            functions[name] = export.deserialize(bytearray(blobs[name]))
        except Exception as err:  # what jax.export raises differs by version and damage
            raise ExportFormatError(
                f"{where}: {name} cannot be read by JAX {jax.__version__} (written by JAX "
                f"{metadata['created_with'].get('jax')}): {type(err).__name__}: {err}"
            ) from err
    weights = _arrays(blobs[VARIABLES])
    if len(weights) != len(metadata["variables"]):
        raise ExportFormatError(
            f"{where}: damaged: {VARIABLES} holds {len(weights)} arrays, {METADATA} names "
            f"{len(metadata['variables'])}"
        )
    return ExportedClassifier(
        where,
        metadata,
        functions[CLASSIFIER],
        functions[STEP],
        weights,
        _arrays(blobs[INITIAL_CARRIES]),
    )


def _read_metadata(archive: zipfile.ZipFile, where: str) -> dict[str, Any]:
    """``metadata.json``, once checked that it describes a file this module reads."""
    try:
        text = archive.read(METADATA)
    except KeyError:
        raise ExportFormatError(
            f"{where}: not an exported model: the zip archive has no {METADATA}"
        ) from None
    except (zipfile.BadZipFile, OSError) as err:
        raise ExportFormatError(f"{where}: damaged: {METADATA} cannot be read ({err})") from None
    try:
        metadata = json.loads(text)
    except ValueError as err:
        raise ExportFormatError(f"{where}: damaged: {METADATA} is not JSON ({err})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ExportFormatError(
            f"{where}: not an exported model: {METADATA} does not say format {FORMAT!r}"
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        written = metadata.get("created_with", {}).get("larnn_jax", "an unknown version")
        raise ExportFormatError(
            f"{where}: format version {version!r}, written by larnn_jax {written}; this "
            f"larnn_jax ({larnn_jax.__version__}) reads format version {FORMAT_VERSION} only: "
            "export the model again, or load it with the larnn_jax that wrote it"
        )
    expected = {
        "created_with": dict,
        "window_length": int,
        "channels": int,
        "class_names": list,
        "batch_size": int,
        "variables": list,
        "members": dict,
        "source": dict,
    }
    for key, kind in expected.items():
        if not isinstance(metadata.get(key), kind):
            raise ExportFormatError(
                f"{where}: damaged: {METADATA} has no {key} of type {kind.__name__}"
            )
    missing = {CLASSIFIER, STEP, VARIABLES, INITIAL_CARRIES} - set(metadata["members"])
    if missing:
        raise ExportFormatError(
            f"{where}: damaged: {METADATA} lists no {', '.join(sorted(missing))}"
        )
    return metadata


def _read_member(
    archive: zipfile.ZipFile, name: str, metadata: dict[str, Any], where: str
) -> bytes:
    """The bytes of member ``name``, checked against the archive's CRC and the metadata's
    SHA-256."""
    try:
        data = archive.read(name)
    except KeyError:
        raise ExportFormatError(f"{where}: damaged: the archive has no {name}") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise ExportFormatError(f"{where}: damaged: {name} cannot be read ({err})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != metadata["members"][name]:
        raise ExportFormatError(
            f"{where}: damaged: {name} has SHA-256 {digest}, {METADATA} records "
            f"{metadata['members'][name]}"
        )
    return data
