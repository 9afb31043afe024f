"""Random transformations of training sequences, drawn afresh at every training step.

Shapes: ``B`` sequences, ``T`` time steps, ``C`` channels; ``C`` is a multiple of 3 for the
rotations, whose channels are consecutive ``(x, y, z)`` triplets of vectors measured in the same
frame (UCI HAR: ``body_acc``, ``body_gyro``, ``total_acc``, :data:`experiments.data.UCI_HAR_CHANNELS`).

Each option is a field of :class:`Augmentation` and of :class:`~experiments.config.TrainConfig`,
under the same name; 0 turns it off, and all are off by default:

* ``rotation_degrees``: each sequence is rotated by one rotation about an axis drawn uniformly
  on the sphere, by an angle drawn uniformly in ``[-rotation_degrees, rotation_degrees]``. The
  same rotation turns every triplet (the phone turned, with all its sensors).
* ``rotation_about_x_degrees``: likewise about the phone's ``x`` axis only, by an angle uniform in
  ``[-rotation_about_x_degrees, rotation_about_x_degrees]`` (180: any turn). Applied after the
  rotation above when both are on.
* ``rotation_classes`` (label indices; empty: every class): the rotations above turn only the
  sequences of these classes, the others keep their orientation. Lying on one's back, side or
  front turns the phone about the body's long axis (the phone's ``x``) without changing the
  activity, while the tilt that tells sitting from standing is an orientation about that same
  axis: rotations about ``x`` of LAYING alone add the one kind of variety without erasing the
  other.
* ``scaling_sigma``: every channel of a sequence is multiplied by its own factor ``1 + σ·N(0, 1)``
  (sensor gains).
* ``shift_steps``: the sequence is delayed or advanced by a whole number of steps drawn uniformly
  in ``[-shift_steps, shift_steps]``; the steps that enter repeat the sequence's edge.
* ``time_warp_sigma``: the sequence is replayed at a smoothly varying speed: speeds
  ``1 + σ·N(0, 1)`` (at least 0.1) at :data:`TIME_WARP_KNOTS` evenly spaced knots, interpolated
  linearly between them, integrated into new sampling times that still start at step 0 and end
  at step ``T − 1``, where the sequence is interpolated linearly.
* ``jitter_sigma``: Gaussian noise of that standard deviation added to every value, in units of
  the standardised inputs (each channel's training standard deviation).

Rotations and scaling act on the physical values: :meth:`Augmentation.__call__` undoes the
per-channel standardisation (``x · std + mean``), applies them and standardises again, so that
a rotation is a rotation of the measured vectors, not of their standardised coordinates. Time
shifts and warps interpolate in time, which commutes with the standardisation.

Every draw comes from the key given, split once into one key per option, so that turning one
option on or off leaves the draws of the others unchanged. The training step derives that key
from the run's seed and the step number (:func:`experiments.steps.make_train_step`): a run is
reproducible and resumes bit for bit. Evaluation never augments.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

#: Number of speed knots of the time warp (including both ends of the sequence).
TIME_WARP_KNOTS = 6
#: The slowest speed a time warp's knot may take, in steps per step (speeds are clipped to it, so
#: that sampling times always increase).
TIME_WARP_MIN_SPEED = 0.1

#: The option fields of :class:`Augmentation`, which are also :class:`TrainConfig` fields.
OPTIONS: tuple[str, ...] = (
    "rotation_degrees",
    "rotation_about_x_degrees",
    "scaling_sigma",
    "shift_steps",
    "time_warp_sigma",
    "jitter_sigma",
)


def rotation_matrices(axes: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotations by ``angles`` ``(B,)`` (radians, right-handed) about unit ``axes`` ``(B, 3)``:
    ``(B, 3, 3)``, by Rodrigues' formula ``I + sin θ K + (1 − cos θ) K²``."""
    x, y, z = axes[:, 0], axes[:, 1], axes[:, 2]
    zero = jnp.zeros_like(x)
    cross = jnp.stack(
        [
            jnp.stack([zero, -z, y], -1),
            jnp.stack([z, zero, -x], -1),
            jnp.stack([-y, x, zero], -1),
        ],
        -2,
    )
    sin, cos = jnp.sin(angles)[:, None, None], jnp.cos(angles)[:, None, None]
    return jnp.eye(3, dtype=axes.dtype) + sin * cross + (1 - cos) * (cross @ cross)


def random_rotations(key: jax.Array, batch: int, max_degrees: float) -> jax.Array:
    """``(batch, 3, 3)`` rotations about axes uniform on the sphere, by angles uniform in
    ``[-max_degrees, max_degrees]``."""
    axis_key, angle_key = jax.random.split(key)
    axes = jax.random.normal(axis_key, (batch, 3))
    axes = axes / jnp.linalg.norm(axes, axis=-1, keepdims=True)
    return rotation_matrices(axes, _uniform_angles(angle_key, batch, max_degrees))


def random_rotations_about_x(key: jax.Array, batch: int, max_degrees: float) -> jax.Array:
    """``(batch, 3, 3)`` rotations about the ``x`` axis by angles uniform in
    ``[-max_degrees, max_degrees]``."""
    axes = jnp.broadcast_to(jnp.array([1.0, 0.0, 0.0]), (batch, 3))
    return rotation_matrices(axes, _uniform_angles(key, batch, max_degrees))


def _uniform_angles(key: jax.Array, batch: int, max_degrees: float) -> jax.Array:
    limit = math.radians(max_degrees)
    return jax.random.uniform(key, (batch,), minval=-limit, maxval=limit)


def rotate_triplets(x: jax.Array, rotations: jax.Array) -> jax.Array:
    """Every ``(x, y, z)`` triplet of channels of ``x`` ``(B, T, C)`` (``C = 3m``) turned by its
    sequence's rotation ``(B, 3, 3)``: ``v ← R v`` at every step."""
    batch, steps, channels = x.shape
    vectors = x.reshape(batch, steps, channels // 3, 3)
    return jnp.einsum("bij,btmj->btmi", rotations, vectors).reshape(x.shape)


def resample(x: jax.Array, times: jax.Array) -> jax.Array:
    """``x`` ``(B, T, C)`` interpolated linearly at ``times`` ``(B, T)`` (in steps, clipped to
    ``[0, T − 1]``): ``(B, T, C)``."""
    steps = x.shape[1]
    times = jnp.clip(times, 0.0, steps - 1.0)
    before = jnp.clip(jnp.floor(times).astype(jnp.int32), 0, steps - 2)
    weight = (times - before)[..., None]
    take = jax.vmap(lambda row, index: row[index])
    return (1 - weight) * take(x, before) + weight * take(x, before + 1)


def time_warp_times(key: jax.Array, batch: int, steps: int, sigma: float) -> jax.Array:
    """Sampling times ``(batch, steps)`` of random smooth time warps (see the module docstring):
    increasing, from 0 to ``steps − 1``."""
    knots = 1.0 + sigma * jax.random.normal(key, (batch, TIME_WARP_KNOTS))
    knots = jnp.maximum(knots, TIME_WARP_MIN_SPEED)
    positions = jnp.linspace(0.0, 1.0, steps)
    knot_positions = jnp.linspace(0.0, 1.0, TIME_WARP_KNOTS)
    speeds = jax.vmap(lambda k: jnp.interp(positions, knot_positions, k))(knots)
    # Time elapsed before each step: the speeds of the steps before it.
    elapsed = jnp.cumsum(speeds, axis=1) - speeds
    return elapsed * (steps - 1) / elapsed[:, -1:]


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity, as jit needs
class Augmentation:
    """The augmentation of a run: options (module docstring) and the inputs' standardisation.

    Call it as ``augmentation(key, x, y)`` on a batch of standardised training inputs
    ``(B, T, C)`` and their labels ``(B,)`` (used by ``rotation_classes`` only); it returns the
    augmented batch, same shape and dtype. Jittable; the options are static.

    Attributes:
        channel_mean: ``(C,)`` the standardisation's mean (zeros for raw inputs).
        channel_std: ``(C,)`` the standardisation's standard deviation (ones for raw inputs).
    """

    channel_mean: np.ndarray
    channel_std: np.ndarray
    rotation_degrees: float = 0.0
    rotation_about_x_degrees: float = 0.0
    scaling_sigma: float = 0.0
    shift_steps: int = 0
    time_warp_sigma: float = 0.0
    jitter_sigma: float = 0.0
    rotation_classes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in OPTIONS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.rotation_classes and not self.rotates:
            raise ValueError(
                "rotation_classes restricts the rotations, but no rotation is on "
                "(rotation_degrees, rotation_about_x_degrees)"
            )
        if self.rotates and len(self.channel_mean) % 3:
            raise ValueError(
                f"rotations need channels in (x, y, z) triplets; the inputs have "
                f"{len(self.channel_mean)} channels, not a multiple of 3"
            )

    @property
    def rotates(self) -> bool:
        """Whether a rotation option is on."""
        return self.rotation_degrees > 0 or self.rotation_about_x_degrees > 0

    @property
    def active(self) -> bool:
        """Whether any option is on (otherwise the call returns its input)."""
        return any(getattr(self, name) > 0 for name in OPTIONS)

    def __call__(self, key: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
        batch, steps, _ = x.shape
        keys = dict(zip(OPTIONS, jax.random.split(key, len(OPTIONS)), strict=True))
        mean = jnp.asarray(self.channel_mean, x.dtype)
        std = jnp.asarray(self.channel_std, x.dtype)
        if self.rotates or self.scaling_sigma > 0:
            raw = x * std + mean
            if self.rotates:
                rotation = jnp.broadcast_to(jnp.eye(3, dtype=x.dtype), (batch, 3, 3))
                if self.rotation_degrees > 0:
                    rotation = random_rotations(
                        keys["rotation_degrees"], batch, self.rotation_degrees
                    )
                if self.rotation_about_x_degrees > 0:
                    about_x = random_rotations_about_x(
                        keys["rotation_about_x_degrees"], batch, self.rotation_about_x_degrees
                    )
                    rotation = about_x @ rotation
                if self.rotation_classes:
                    turned = jnp.isin(y, jnp.asarray(self.rotation_classes))[:, None, None]
                    rotation = jnp.where(turned, rotation, jnp.eye(3, dtype=rotation.dtype))
                raw = rotate_triplets(raw, rotation.astype(x.dtype))
            if self.scaling_sigma > 0:
                gains = 1.0 + self.scaling_sigma * jax.random.normal(
                    keys["scaling_sigma"], (batch, 1, x.shape[2]), x.dtype
                )
                raw = raw * gains
            x = (raw - mean) / std
        if self.shift_steps > 0 or self.time_warp_sigma > 0:
            times = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.float32), (batch, steps))
            if self.time_warp_sigma > 0:
                times = time_warp_times(keys["time_warp_sigma"], batch, steps, self.time_warp_sigma)
            if self.shift_steps > 0:
                shift = jax.random.randint(
                    keys["shift_steps"], (batch, 1), -self.shift_steps, self.shift_steps + 1
                )
                times = times - shift
            x = resample(x, times).astype(x.dtype)
        if self.jitter_sigma > 0:
            x = x + self.jitter_sigma * jax.random.normal(keys["jitter_sigma"], x.shape, x.dtype)
        return x
