"""Augmentation of the training rows: the transformations themselves, and how training uses them."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import augmentation as aug
from experiments import steps
from experiments.augmentation import Augmentation
from experiments.config import ConfigError, TrainConfig
from experiments.data import Dataset, Split

BATCH, STEPS, CHANNELS = 64, 40, 9
#: Labels of the batch (6 classes); only ``rotation_classes`` reads them.
LABELS = jnp.arange(BATCH) % 6


def physical_inputs(seed: int = 0) -> np.ndarray:
    """``(BATCH, STEPS, CHANNELS)`` values as sensors give them: three vector triplets around
    different means (total_acc carries gravity along x)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.3, (BATCH, STEPS, CHANNELS))
    x[..., 6] += 1.0
    return x.astype(np.float32)


def standardised(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = raw.mean(axis=(0, 1))
    std = raw.std(axis=(0, 1))
    return (raw - mean) / std, mean, std


def angle_of(rotation: np.ndarray) -> np.ndarray:
    """Rotation angle (radians) of ``(..., 3, 3)`` rotations."""
    trace = np.trace(rotation, axis1=-2, axis2=-1)
    return np.arccos(np.clip((trace - 1) / 2, -1, 1))


@pytest.mark.parametrize("about_x", [False, True])
def test_rotations_are_orthogonal_proper_and_within_their_angle(about_x: bool) -> None:
    draw = aug.random_rotations_about_x if about_x else aug.random_rotations
    rotations = np.asarray(draw(jax.random.key(3), 2000, 25.0), np.float64)
    identity = np.broadcast_to(np.eye(3), rotations.shape)
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), identity, atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-6)
    angles = angle_of(rotations)
    assert angles.max() <= math.radians(25.0) + 1e-3
    # Uniform in [-25°, 25°]: |angle| uniform in [0, 25°], mean 12.5°.
    assert abs(np.degrees(angles.mean()) - 12.5) < 0.5
    if about_x:
        np.testing.assert_allclose(rotations[:, :, 0], np.tile([1.0, 0, 0], (2000, 1)), atol=1e-6)
    else:
        # Axes uniform on the sphere: no direction preferred.
        axes = np.stack(
            [rotations[:, 2, 1] - rotations[:, 1, 2], rotations[:, 0, 2] - rotations[:, 2, 0]], 1
        )
        assert np.abs(axes.mean(axis=0)).max() < 0.02


def test_rotation_matrices_turn_the_right_way() -> None:
    quarter_turn_about_z = aug.rotation_matrices(
        jnp.array([[0.0, 0.0, 1.0]]), jnp.array([np.pi / 2])
    )
    np.testing.assert_allclose(
        quarter_turn_about_z[0] @ np.array([1.0, 0, 0]), [0, 1, 0], atol=1e-6
    )


def test_one_rotation_turns_the_three_triplets_of_the_raw_vectors() -> None:
    raw = physical_inputs()
    x, mean, std = standardised(raw)
    augmentation = Augmentation(mean, std, rotation_degrees=40.0, rotation_about_x_degrees=180.0)
    out = (
        np.asarray(augmentation(jax.random.key(7), jnp.asarray(x), LABELS), np.float64) * std + mean
    )
    triplets_in = raw.reshape(BATCH, STEPS, 3, 3).astype(np.float64)
    triplets_out = out.reshape(BATCH, STEPS, 3, 3)
    # Each sequence: one matrix R with out = R · in for every triplet and every step.
    for row in range(BATCH):
        vectors_in = triplets_in[row].reshape(-1, 3)
        vectors_out = triplets_out[row].reshape(-1, 3)
        solution, *_ = np.linalg.lstsq(vectors_in, vectors_out, rcond=None)
        rotation = solution.T
        np.testing.assert_allclose(vectors_in @ rotation.T, vectors_out, atol=2e-5)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=2e-5)
        assert np.linalg.det(rotation) == pytest.approx(1.0, abs=2e-5)
    # Lengths of the physical vectors are kept; the standardised coordinates would not be.
    np.testing.assert_allclose(
        np.linalg.norm(triplets_out, axis=-1), np.linalg.norm(triplets_in, axis=-1), rtol=1e-5
    )
    # Different sequences get different rotations.
    assert not np.allclose(
        triplets_out[0, 0, 2] / np.linalg.norm(triplets_out[0, 0, 2]),
        triplets_out[1, 0, 2] / np.linalg.norm(triplets_out[1, 0, 2]),
    )


def test_rotation_classes_turn_only_the_sequences_of_those_classes() -> None:
    raw = physical_inputs()
    x, mean, std = standardised(raw)
    only_5 = Augmentation(mean, std, rotation_about_x_degrees=180.0, rotation_classes=(5,))
    every = dataclasses.replace(only_5, rotation_classes=())
    out = np.asarray(only_5(jax.random.key(3), jnp.asarray(x), LABELS))
    turned = np.asarray(LABELS) == 5
    assert turned.sum() == 10
    # Class 5: the rotation every class would get (the same draw); the others: unchanged.
    np.testing.assert_allclose(
        out[turned], np.asarray(every(jax.random.key(3), jnp.asarray(x), LABELS))[turned], atol=1e-6
    )
    np.testing.assert_allclose(out[~turned], x[~turned], atol=1e-5)
    # About x: the x components stay, the (y, z) plane turns (gravity's y-z direction changes).
    triplets_in = raw.reshape(BATCH, STEPS, 3, 3)
    triplets_out = (out * std + mean).reshape(BATCH, STEPS, 3, 3)
    np.testing.assert_allclose(triplets_out[..., 0], triplets_in[..., 0], atol=2e-5)
    assert np.abs(triplets_out[turned][..., 1:] - triplets_in[turned][..., 1:]).mean() > 0.1
    with pytest.raises(ValueError, match="no rotation is on"):
        Augmentation(mean, std, scaling_sigma=0.1, rotation_classes=(5,))


def test_augmentation_is_reproducible_from_its_key_and_options_draw_independently() -> None:
    x, mean, std = standardised(physical_inputs())
    everything = Augmentation(
        mean,
        std,
        rotation_degrees=10.0,
        rotation_about_x_degrees=90.0,
        scaling_sigma=0.1,
        shift_steps=3,
        time_warp_sigma=0.2,
        jitter_sigma=0.05,
    )

    def apply(augmentation: Augmentation, seed: int) -> np.ndarray:
        return np.asarray(jax.jit(augmentation)(jax.random.key(seed), jnp.asarray(x), LABELS))

    first = apply(everything, 1)
    np.testing.assert_array_equal(apply(everything, 1), first)
    assert np.abs(first - apply(everything, 2)).mean() > 0.1
    # The jitter alone, with and without the other options: the same noise.
    noise = apply(Augmentation(mean, std, jitter_sigma=0.05), 1) - x
    noise_with_all = first - apply(dataclasses.replace(everything, jitter_sigma=0.0), 1)
    np.testing.assert_allclose(noise_with_all, noise, atol=1e-5)
    assert noise.std() == pytest.approx(0.05, rel=0.05)


def test_scaling_multiplies_each_raw_channel_by_its_own_gain() -> None:
    raw = physical_inputs()
    x, mean, std = standardised(raw)
    out = np.asarray(
        Augmentation(mean, std, scaling_sigma=0.2)(jax.random.key(0), jnp.asarray(x), LABELS)
    )
    gains = (out * std + mean) / raw
    np.testing.assert_allclose(gains, np.broadcast_to(gains[:, :1], gains.shape), rtol=1e-3)
    assert gains[:, 0].std() == pytest.approx(0.2, rel=0.15)
    assert gains[:, 0].mean() == pytest.approx(1.0, abs=0.02)


def test_time_warps_are_increasing_and_keep_both_ends() -> None:
    times = np.asarray(aug.time_warp_times(jax.random.key(0), 500, STEPS, 0.3))
    assert times.shape == (500, STEPS)
    assert np.all(np.diff(times, axis=1) > 0)
    np.testing.assert_allclose(times[:, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(times[:, -1], STEPS - 1, rtol=1e-6)
    # Not the identity: the steps' spacing varies around 1.
    assert 0.05 < np.diff(times, axis=1).std() < 0.5
    np.testing.assert_allclose(
        aug.time_warp_times(jax.random.key(0), 3, STEPS, 0.0),
        np.tile(np.arange(STEPS), (3, 1)),
        atol=1e-4,
    )


def test_resampling_interpolates_linearly_and_shifts_repeat_the_edges() -> None:
    ramp = jnp.broadcast_to(jnp.arange(STEPS, dtype=jnp.float32)[None, :, None], (2, STEPS, 1))
    times = jnp.stack([jnp.linspace(0.0, STEPS - 1.0, STEPS) * 0.5, jnp.arange(STEPS) - 5.0])
    np.testing.assert_allclose(
        aug.resample(ramp, times)[..., 0], np.clip(np.asarray(times), 0, STEPS - 1), atol=1e-5
    )
    x, mean, std = standardised(physical_inputs())
    out = np.asarray(
        Augmentation(mean, std, shift_steps=4)(jax.random.key(5), jnp.asarray(x), LABELS)
    )
    for row in range(BATCH):
        shift = next(
            d
            for d in range(-4, 5)
            if np.allclose(out[row], x[row, np.clip(np.arange(STEPS) - d, 0, STEPS - 1)])
        )
        assert -4 <= shift <= 4


def test_rotations_need_channel_triplets_and_options_are_checked() -> None:
    with pytest.raises(ValueError, match="multiple of 3"):
        Augmentation(np.zeros(4), np.ones(4), rotation_degrees=5.0)
    Augmentation(np.zeros(4), np.ones(4), jitter_sigma=0.1)  # no rotation: any channels
    with pytest.raises(ConfigError, match="rotation_degrees must be >= 0"):
        TrainConfig(rotation_degrees=-1.0)
    dataset = Dataset(
        train=Split(np.zeros((4, 5, 4), np.float32), np.zeros(4, np.int32), None),
        val=None,
        test=Split(np.zeros((4, 5, 4), np.float32), np.zeros(4, np.int32), None),
        num_classes=1,
        class_names=("a",),
        name="four_channels",
        channel_mean=None,
        channel_std=None,
    )
    with pytest.raises(ConfigError, match="four_channels: rotations need"):
        steps.build_augmentation(TrainConfig(rotation_about_x_degrees=180.0), dataset)
    assert steps.build_augmentation(TrainConfig(), dataset) is None
    triplets = dataclasses.replace(
        dataset,
        train=Split(np.zeros((4, 5, 3), np.float32), np.array([0, 1, 1, 0], np.int32), None),
        num_classes=2,
        class_names=("SITTING", "LAYING"),
    )
    config = TrainConfig(rotation_about_x_degrees=180.0, rotation_classes=" LAYING")
    augmentation = steps.build_augmentation(config, triplets)
    assert augmentation is not None and augmentation.rotation_classes == (1,)
    with pytest.raises(ConfigError, match="has no class 'LYING'; its classes: SITTING, LAYING"):
        steps.build_augmentation(dataclasses.replace(config, rotation_classes="LYING"), triplets)
    with pytest.raises(ConfigError, match="no rotation is on"):
        steps.build_augmentation(TrainConfig(rotation_classes="LAYING"), triplets)


# ------------------------------------------------------------------------------------------------
# In training


#: Every option on, strongly.
AUGMENTED = {
    "rotation_degrees": 30.0,
    "rotation_about_x_degrees": 180.0,
    "scaling_sigma": 0.2,
    "shift_steps": 2,
    "time_warp_sigma": 0.3,
    "jitter_sigma": 0.3,
}


def test_the_train_step_augments_with_keys_from_the_seed_and_the_step() -> None:
    """Two steps from the same state: the same result for the same step number, another for
    another step or without augmentation (whose dropout keys are unchanged)."""
    config = TrainConfig(model="lstm", features=4, num_layers=1)
    model = steps.build_model(config, 3)
    tx = steps.make_optimizer(config, steps_per_epoch=1)
    x, mean, std = standardised(physical_inputs())
    y = jnp.arange(BATCH) % 3
    rows = jnp.arange(8)
    augmentation = Augmentation(mean, std, **AUGMENTED)
    augmented = steps.make_train_step(model, tx, augmentation=augmentation)
    plain = steps.make_train_step(model, tx)

    initial = steps.init_state(model, tx, jnp.asarray(x[:1]), seed=0)

    def loss(train_step, step: int) -> float:
        state = jax.tree.map(jnp.copy, initial)  # the step donates the state it is given
        return float(train_step(state, jnp.asarray(x), y, rows, step)[1])

    assert loss(augmented, 5) == loss(augmented, 5)
    assert loss(augmented, 5) != loss(augmented, 6)
    assert loss(plain, 5) == loss(plain, 6)  # this LSTM has no dropout: the step is unused
    assert loss(augmented, 5) != loss(plain, 5)
