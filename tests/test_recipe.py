"""The training recipe's options: learning-rate schedules, label smoothing, weight averaging."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_augmentation import AUGMENTED
from test_train import assert_states_equal, make_dataset, read_lines, tiny_config, without_timing

from experiments import restore, steps
from experiments import train as train_module
from experiments.config import (
    DEFAULT_RECIPE,
    RECIPES,
    ConfigError,
    TrainConfig,
    check_same_config,
)
from experiments.data import Split


def test_cosine_schedule_spans_the_run_and_fixes_its_epochs_on_resume(
    tmp_path: pathlib.Path,
) -> None:
    config = TrainConfig(schedule="cosine", learning_rate=0.01, epochs=10)
    schedule = steps.learning_rate_schedule(config, steps_per_epoch=20)
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(100)) == pytest.approx(0.005)
    assert float(schedule(150)) == pytest.approx(0.005 * (1 + math.cos(0.75 * math.pi)))
    assert float(schedule(200)) == pytest.approx(0.0, abs=1e-9)
    step = steps.learning_rate_schedule(TrainConfig(decay_every=5, decay_factor=0.5), 20)
    assert [float(step(s)) for s in (99, 100, 200)] == pytest.approx(
        [0.006026, 0.003013, 0.0015065]
    )
    with pytest.raises(ConfigError, match="schedule must be one of step, cosine"):
        TrainConfig(schedule="linear")
    saved = TrainConfig(schedule="cosine", epochs=10).to_dict()
    with pytest.raises(ConfigError, match="epochs: 10 in the run, 20 now"):
        check_same_config(saved, TrainConfig(schedule="cosine", epochs=20), tmp_path)
    step_saved = TrainConfig(epochs=10).to_dict()
    check_same_config(step_saved, TrainConfig(epochs=20), tmp_path)  # allowed


def test_label_smoothing_smooths_the_training_targets_only() -> None:
    logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = jnp.array([0, 1])
    smoothing = 0.1
    log_p = np.asarray(jax.nn.log_softmax(logits))
    targets = np.full((2, 3), smoothing / 3)
    targets[[0, 1], [0, 1]] += 1 - smoothing
    np.testing.assert_allclose(
        steps.per_example_loss(logits, labels, smoothing), -(targets * log_p).sum(-1), rtol=1e-6
    )
    np.testing.assert_allclose(
        steps.per_example_loss(logits, labels), -log_p[[0, 1], [0, 1]], rtol=1e-6
    )
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\)"):
        TrainConfig(label_smoothing=1.0)


def test_the_average_follows_the_updated_weights_and_gets_its_own_statistics() -> None:
    config = TrainConfig(model="bnlstm", features=4, num_layers=1, ema_decay=0.9)
    model = steps.build_model(config, 3)
    tx = steps.make_optimizer(config, steps_per_epoch=1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 6, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16))
    state = steps.init_state(model, tx, x[:1], seed=0, average=True)
    np.testing.assert_array_equal(
        *(
            np.concatenate([leaf.ravel() for leaf in jax.tree.leaves(tree)])
            for tree in (state["params"], state["average"]["params"])
        )
    )
    before = jax.tree.map(np.asarray, state)
    train_step = steps.make_train_step(model, tx, ema_decay=0.9)
    state, _, _ = train_step(state, x, y, jnp.arange(8), 0)
    expected = jax.tree.map(
        lambda a, p: 0.9 * a + 0.1 * np.asarray(p), before["average"]["params"], state["params"]
    )
    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7),
        state["average"]["params"],
        expected,
    )
    # The step leaves the average's statistics alone; the estimator sets them from the raw
    # weights' statistics and forward passes of the averaged weights.
    assert_states_equal(state["average"]["batch_stats"], before["average"]["batch_stats"])
    estimate = steps.make_statistics_estimator(model)
    raw_stats = jax.tree.map(np.asarray, state["batch_stats"])
    estimated = estimate(state, x, y, np.arange(16).reshape(2, 8), epoch=1)
    assert_states_equal(estimated["batch_stats"], raw_stats)
    differs = jax.tree.map(
        lambda a, b: not np.allclose(a, b), estimated["average"]["batch_stats"], raw_stats
    )
    assert all(jax.tree.leaves(differs))
    assert_states_equal(estimate(state, x, y, np.arange(16).reshape(2, 8), epoch=1), estimated)
    assert steps.model_variables(estimated)["params"] is estimated["average"]["params"]
    assert steps.model_variables(estimated, raw=True)["params"] is estimated["params"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "toy.npz", train_rows=96)


@pytest.mark.slow
def test_a_run_with_every_option_reports_both_models_and_resumes_bit_for_bit(
    data: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Every recipe option at once. With ema_decay, the checkpoint keeps the average, which is
    the model evaluated, selected and restored; the raw weights' accuracies are recorded; a run
    interrupted after its first epoch and resumed equals the uninterrupted one; the
    augmentation changes the training, not the evaluation (the restored model gives the
    recorded validation accuracy)."""
    recipe = {"ema_decay": 0.8, "label_smoothing": 0.1, "schedule": "cosine", **AUGMENTED}
    config = tiny_config(data, tmp_path / "whole", model="bnlstm", epochs=2, **recipe)
    train_module.train(config)
    interrupted = dataclasses.replace(config, out=str(tmp_path / "resumed"))

    class Interrupted(Exception):
        pass

    def stop_after_the_first_epoch(metrics: dict, checkpoint_dir: pathlib.Path) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        train_module.train(interrupted, epoch_callback=stop_after_the_first_epoch)
    train_module.train(interrupted, resume=True)
    whole = read_lines(tmp_path / "whole" / "metrics.jsonl")
    assert without_timing(read_lines(tmp_path / "resumed" / "metrics.jsonl")) == without_timing(
        whole
    )
    assert {"raw_val_accuracy", "raw_test_accuracy"} <= set(whole[0])
    run = restore.restore_run(tmp_path / "whole", step=2)
    assert "average" in run.state
    variables = steps.model_variables(run.state)
    val = steps.make_evaluator(run.model, config.batch_size)(variables, run.dataset.val)
    assert val.accuracy == whole[1]["val_accuracy"]
    raw = steps.make_evaluator(run.model, config.batch_size)(
        steps.model_variables(run.state, raw=True), run.dataset.val
    )
    assert raw.accuracy == whole[1]["raw_val_accuracy"]
    plain = {**recipe, **dict.fromkeys(AUGMENTED, 0)}
    train_module.train(tiny_config(data, tmp_path / "plain", model="bnlstm", epochs=2, **plain))
    assert (
        read_lines(tmp_path / "plain" / "metrics.jsonl")[0]["train_loss"] != whole[0]["train_loss"]
    )


def test_metrics_give_the_validation_accuracy_of_each_subject() -> None:
    val_split = Split(
        np.zeros((5, 2, 1), np.float32), np.array([0, 1, 1, 0, 1]), np.array([7, 7, 3, 3, 3])
    )
    predictions = np.array([0, 0, 1, 1, 1])
    val = steps.SplitResult(0.5, 0.6, predictions, 0, np.eye(2)[predictions])
    test = steps.SplitResult(0.5, 0.6, predictions, 0, np.eye(2)[predictions])
    line = train_module._epoch_metrics(1, (1.0, 0.5), val, test, 0.1, 2.0, val_split=val_split)
    assert line["val_subject_accuracy"] == {"3": pytest.approx(2 / 3), "7": 0.5}
    assert "raw_val_accuracy" not in line
    raw_predictions = np.array([1, 0, 0, 0, 0])
    raw = steps.SplitResult(0.5, 0.2, raw_predictions, 0, np.eye(2)[raw_predictions])
    line = train_module._epoch_metrics(
        1, (1.0, 0.5), val, test, 0.1, 2.0, val_split=val_split, raw=(raw, test)
    )
    assert (line["raw_val_accuracy"], line["raw_test_accuracy"]) == (0.2, 0.6)
    assert line["raw_val_subject_accuracy"] == {"3": pytest.approx(1 / 3), "7": 0.0}
    no_subjects = dataclasses.replace(val_split, subjects=None)
    assert "val_subject_accuracy" not in train_module._epoch_metrics(
        1, (1.0, 0.5), val, test, 0.1, 2.0, val_split=no_subjects
    )


def test_the_command_line_trains_the_recommended_recipe_and_the_papers_on_request(
    tmp_path: pathlib.Path,
) -> None:
    for name, settings in RECIPES.items():
        assert set(settings) <= set(TrainConfig().to_dict()), name
    assert DEFAULT_RECIPE == "recommended"
    config, _ = train_module.config_from_args([])
    assert config == TrainConfig(**RECIPES["recommended"])
    assert config.epochs == 25 and (config.decay_every, config.decay_factor) == (5, 0.5)
    assert (config.ema_decay, config.label_smoothing) == (0.98, 0.1)
    config, _ = train_module.config_from_args(["--recipe", "paper"])
    assert config == TrainConfig()
    assert (config.ema_decay, config.label_smoothing) == (0.0, 0.0)
    assert (config.epochs, config.decay_every, config.decay_factor) == (100, 26, 0.75)
    # Flags > config file > recipe > defaults.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"epochs": 7, "decay_factor": 0.9}))
    config, _ = train_module.config_from_args(["--config", str(path), "--decay-factor", "0.8"])
    assert (config.epochs, config.decay_every, config.decay_factor) == (7, 5, 0.8)
    with pytest.raises(SystemExit):
        train_module.config_from_args(["--recipe", "fast"])


@pytest.mark.parametrize("model", ["bnlstm", "larnn"])
def test_norm_scale_init_sets_the_initial_gamma_of_the_gate_and_cell_norms(model: str) -> None:
    config = TrainConfig(model=model, features=4, num_heads=2, num_layers=1, norm_scale_init=0.1)
    params = steps.init_state(
        steps.build_model(config, 3), steps.make_optimizer(config, 1), jnp.ones((2, 5, 3)), 0
    )["params"]
    scales = {
        "/".join(str(getattr(key, "key", key)) for key in path[:-1]): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if getattr(path[-1], "key", None) == "scale"
    }
    gates = [name for name in scales if name.endswith(("gate_norm", "cell_norm"))]
    assert gates and all(np.all(scales[name] == np.float32(0.1)) for name in gates)
    others = [name for name in scales if name not in gates]
    assert others and all(np.all(scales[name] == 1.0) for name in others)
    with pytest.raises(ConfigError, match="norm_scale_init must be > 0"):
        TrainConfig(norm_scale_init=0.0)


def test_the_screening_script_resumes_only_the_runs_it_started(tmp_path: pathlib.Path) -> None:
    """``scripts/screen.sh`` asks ``--resume`` only of a run folder that holds a run (training
    refuses to resume a folder without one), and copies each finished run's files."""
    calls = tmp_path / "calls.txt"
    trainer = tmp_path / "python"  # stands in for the interpreter: records, makes a run's files
    trainer.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {calls}\n'
        'while [ "$1" != --out ]; do shift; done\n'
        'mkdir -p "$2" && for f in config.json metrics.jsonl report.json; do echo {} > "$2/$f"; done\n'
    )
    trainer.chmod(0o755)
    script = pathlib.Path(__file__).parents[1] / "scripts" / "screen.sh"
    env = {**os.environ, "PYTHON": str(trainer), "SEEDS": "0", "RESULTS": str(tmp_path / "results")}
    for _ in range(2):
        subprocess.run(["bash", str(script), str(tmp_path / "runs"), "warp02"], env=env, check=True)
    first, second = calls.read_text().splitlines()
    assert "--time-warp-sigma 0.2 --seed 0" in first and "--resume" not in first
    assert second.endswith(f"--out {tmp_path / 'runs' / 'warp02-seed0'} --resume")
    assert sorted(p.name for p in (tmp_path / "results" / "warp02-seed0").iterdir()) == [
        "config.json",
        "metrics.jsonl",
        "report.json",
    ]
