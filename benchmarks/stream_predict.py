"""Latency per sample of a classifier on a live stream: ``experiments.predict --stream``.

A :class:`experiments.prediction.StreamPredictor` over the whole classifier (input projection,
stacked layers, classifier head; evaluation mode) as the training builds it, at the paper's
configuration unless sizes are given: each sample advances ``ceil(T / stride)`` carries, one per
window in progress, by one jitted call, and every ``stride`` samples one of them completes its
window of ``T`` steps. Each push is timed on its own, from the raw sample to the probabilities
being ready (dispatch from Python included, text parsing not); the streams take turns, one push
each. The table gives the median, the 99th percentile and the mean of the wall-clock time, and
the median of this process's CPU time per push (all threads: what the push computes, which
other processes on the machine disturb much less than its wall-clock time).

For comparison, ``recompute`` classifies one whole window ``(1, T, C)`` with the batch path
(:meth:`experiments.prediction.Predictor.predict`, the layers' default scan): what a stream that
recomputed each window from scratch would pay per prediction, and per sample at that stride.

The parameters are a fresh initialisation (the latency does not depend on their values).

    python -m benchmarks.stream_predict
    python -m benchmarks.stream_predict --strides 64 --models larnn --samples 500
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks.harness.arguments import (
    add_run_arguments,
    add_subset_argument,
    add_workload_arguments,
    workload_from_args,
)
from benchmarks.harness.output import Column, print_and_write
from benchmarks.harness.timing import interleaved_timings, summarize
from benchmarks.harness.workloads import Workload
from experiments.prediction import Predictor
from experiments.preprocessing import Preprocessing
from larnn_jax.inference import Prediction, WindowStream

MODELS = ("larnn", "bnlstm", "lstm")


def make_predictor(workload: Workload, seed: int = 0) -> Predictor:
    """A :class:`Predictor` of ``workload``'s classifier, freshly initialised, whose
    preprocessing is the identity (mean 0, standard deviation 1)."""
    model = workload.model()
    sample = np.zeros((1, workload.steps, workload.inputs), np.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(seed), x, deterministic=True))(sample)
    preprocessing = Preprocessing(
        dataset="benchmark",
        steps=workload.steps,
        channels=workload.inputs,
        channel_mean=np.zeros(workload.inputs, np.float32),
        channel_std=np.ones(workload.inputs, np.float32),
        class_names=tuple(str(k) for k in range(workload.classes)),
    )
    return Predictor(
        model, variables, preprocessing, workload.config(), 0, pathlib.Path("<initialised>")
    )


def push_next(stream: WindowStream, samples: Iterator[np.ndarray]) -> Prediction | None:
    """Pushes the next of ``samples`` into ``stream``: one timed push."""
    return stream.push(next(samples))


def with_cpu_time(function: Callable[[], Any], seconds: list[float]) -> Callable[[], Any]:
    """``function``, appending the CPU time of this process (all threads) that each call takes
    to ``seconds``."""

    def timed() -> Any:
        start = time.process_time()
        result = function()
        seconds.append(time.process_time() - start)
        return result

    return timed


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints the table and returns (and writes) the JSON payload."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser, skip=("batch", "dropout_rate"))
    parser.add_argument(
        "--strides",
        type=lambda text: [int(s) for s in text.split(",")],
        default=[128, 64, 16, 1],
        help="comma-separated strides (default: 128,64,16,1; 64 is the command's default for "
        "T = 128)",
    )
    parser.add_argument("--samples", type=int, default=2000, help="timed pushes per stream")
    add_subset_argument(parser, "--models", MODELS)
    add_run_arguments(parser, "stream_predict", repeats=50, warmup=20, memory_budget=False)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    samples = rng.normal(size=(997, args.inputs)).astype(np.float32)
    pushes: dict[str, Callable[[], Any]] = {}
    recomputes: dict[str, Callable[[], Any]] = {}
    carries: dict[str, int] = {}
    cpu_times: dict[str, list[float]] = collections.defaultdict(list)
    for block in args.models:
        workload = workload_from_args(args, block, batch=1)
        predictor = make_predictor(workload)
        for stride in args.strides:
            stream = predictor.stream(stride)
            feed = itertools.cycle(samples)
            label = f"{block}/{stride}"
            pushes[label] = with_cpu_time(
                functools.partial(push_next, stream, feed), cpu_times[label]
            )
            carries[label] = stream.slots
        window = samples[None, : args.steps]
        recomputes[block] = functools.partial(predictor.predict, window)
    push_samples = interleaved_timings(pushes, repeats=args.samples, warmup=args.warmup)
    recompute_samples = interleaved_timings(recomputes, repeats=args.repeats, warmup=1)

    rows = []
    for label, timings in push_samples.items():
        block, stride = label.split("/")
        push = summarize(timings)
        cpu = cpu_times[label][args.warmup :]  # the timed pushes
        recompute = summarize(recompute_samples[block])["median_s"] * 1e6
        rows.append(
            {
                "model": block,
                "stride": int(stride),
                "carries": carries[label],
                "median_us": push["median_s"] * 1e6,
                "p99_us": push["p99_s"] * 1e6,
                "mean_us": float(np.mean(timings)) * 1e6,
                "cpu_median_us": float(np.median(cpu)) * 1e6,
                "recompute_window_us": recompute,
                "recompute_per_sample_us": recompute / int(stride),
                "samples": push["repeats"],
            }
        )
    payload = {"benchmark": "stream_predict", "config": vars(args), "rows": rows}

    print_and_write(
        args.out,
        payload,
        f"T={args.steps}, C={args.inputs}, H={args.features}, heads {args.num_heads}, "
        f"k={args.window_size}, {args.num_layers} layers, {args.classes} classes; {args.samples} pushes "
        f"per stream, in turns; recompute: median of {args.repeats}",
        [
            Column("model", "model"),
            Column("stride", "stride"),
            Column("carries", "carries"),
            Column("median_us", "median µs/sample", "{:.0f}"),
            Column("p99_us", "p99 µs", "{:.0f}"),
            Column("mean_us", "mean µs", "{:.0f}"),
            Column("cpu_median_us", "CPU µs/sample", "{:.0f}"),
            Column("recompute_window_us", "recompute µs/window", "{:.0f}"),
            Column("recompute_per_sample_us", "recompute µs/sample", "{:.0f}"),
        ],
    )
    return payload


if __name__ == "__main__":
    main()
