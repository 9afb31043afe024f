"""Training-step time and memory against sequence length: LARNN versus causal self-attention.

Both models are ``elu(Dense_H(x))`` → the sequence block → mean over time → ``Dense_C``, trained
with the same step, the training's own (forward, backward, optimiser update; see
:class:`benchmarks.harness.workloads.TrainingBench`). The mean over time
makes the loss depend on every step's output (with only the last step, XLA could skip all but
the last query of the attention). Blocks:

* ``larnn``: ``--num-layers`` LARNN layers (default one) with residual stacking (docs/model.md §3), the
  library's default fused scan;
* ``larnn_remat``: the same with ``scan='remat'``, the training scan rematerialised in chunks of
  ``N`` steps (``remat_chunk_length``), ``N`` the divisor of ``T`` nearest ``sqrt(T)``;
* ``attention``: ONE causal multi-head self-attention layer of the same width and heads,
  written plainly with ``jnp`` (a ``(T, T)`` score matrix per head: ``O(T²)`` time and memory),
  with a residual sum.

Lengths double from 128 to 8192. The two LARNN variants are timed in turns at each length; the
attention layer is timed in a series of its own afterwards (interleaved with its multi-GiB steps,
LARNN's step at T = 2048 took twice its time alone). A model's series stops where its compiled
memory analysis exceeds the budget or a step exceeds the time budget (the output says so).
Figures per sequence are the step's figures divided by the batch (memory: XLA's compiled memory
analysis, the whole step's peak need, parameters and optimizer state included).

    python -m benchmarks.scaling_length
    python -m benchmarks.scaling_length --batch 2 --lengths 128,256,512 --repeats 2
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness.arguments import (
    add_run_arguments,
    add_subset_argument,
    add_workload_arguments,
    doubling,
    int_list,
)
from benchmarks.harness.machine import describe_machine, machine_info
from benchmarks.harness.memory_use import GIB, memory_budget_bytes
from benchmarks.harness.output import (
    Column,
    format_table,
    pyplot,
    save_figure,
    write_json,
    write_partial_json,
)
from benchmarks.harness.series import measure_series
from benchmarks.harness.workloads import PAPER, TrainingBench, default_remat_chunk_length
from larnn_jax import LARNN, LARNNCell

MODELS = ("larnn", "larnn_remat", "attention")
# Models timed in turns with each other; each group's series runs after the previous one.
TIMING_GROUPS = (("larnn", "larnn_remat"), ("attention",))
TARGET_DOUBLING = 2.2  # the project's target: time(2T) / time(T) <= 2.2 from T = 512 up
DOUBLING_FROM = 512


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over ``(B, T, H)`` with a residual sum; ``O(T²)``."""

    features: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        """``x + W_o · concat_h softmax_causal(q_h k_hᵀ / sqrt(d_k)) v_h``, all ``(B, T, H)``."""
        del deterministic  # no dropout, no statistics
        batch, steps, _ = x.shape
        head_size = self.features // self.num_heads

        def project(name: str) -> jax.Array:
            y = nn.Dense(self.features, name=name)(x)
            return y.reshape(batch, steps, self.num_heads, head_size)

        query, key, value = project("query"), project("key"), project("value")
        scores = jnp.einsum("bqnd,bknd->bnqk", query, key) / math.sqrt(head_size)
        causal = jnp.tril(jnp.ones((steps, steps), dtype=bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        attended = jnp.einsum("bnqk,bknd->bqnd", weights, value)
        output = nn.Dense(self.features, name="output")(attended.reshape(x.shape))
        return x + output


class PooledClassifier(nn.Module):
    """``elu(Dense_H(x))`` → ``block`` → mean over time → ``Dense_C``: ``(B, T, D)`` → ``(B, C)``."""

    block: nn.Module
    features: int
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        """Logits; ``deterministic`` is passed to the block (training mode when ``False``)."""
        hidden = nn.elu(nn.Dense(self.features, name="input_projection")(x))
        sequence = self.block(hidden, deterministic=deterministic)
        return nn.Dense(self.num_classes, name="classifier")(sequence.mean(axis=1))


def build_model(name: str, args: argparse.Namespace, length: int) -> PooledClassifier:
    """The model ``name`` (one of :data:`MODELS`) of the parsed flags for length ``T``."""
    cell = LARNNCell(args.features, num_heads=args.num_heads, window_size=args.window_size)
    if name == "larnn":
        block: nn.Module = LARNN(cell, num_layers=args.num_layers, residual_stacking=True)
    elif name == "larnn_remat":
        block = LARNN(
            cell,
            num_layers=args.num_layers,
            residual_stacking=True,
            scan="remat",
            remat_chunk_length=default_remat_chunk_length(length),
        )
    else:
        block = CausalSelfAttention(args.features, args.num_heads)
    return PooledClassifier(block, args.features, PAPER["classes"])


def _crossover(rows: list[dict[str, Any]], key: str, model: str) -> int | None:
    """The first length at which ``model``'s ``key`` is at most attention's (both measured)."""
    by_point: dict[int, dict[str, float]] = {}
    for row in rows:
        by_point.setdefault(row["point"], {})[row["model"]] = row[key]
    for point in sorted(by_point):
        values = by_point[point]
        if model in values and "attention" in values and values[model] <= values["attention"]:
            return point
    return None


def doubling_ratios(
    rows: list[dict[str, Any]], model: str = "larnn", key: str = "median_s"
) -> list[dict[str, Any]]:
    """``time(2T) / time(T)`` of ``model`` for every measured pair with ``T >= 512``.

    ``key``: ``'median_s'`` (wall clock) or ``'cpu_s'`` (this process's CPU time, which other
    load on the machine disturbs much less).
    """
    times = {row["point"]: row[key] for row in rows if row["model"] == model and key in row}
    return [
        {"T": t, "2T": 2 * t, "ratio": times[2 * t] / times[t]}
        for t in sorted(times)
        if t >= DOUBLING_FROM and 2 * t in times
    ]


def mean_doubling_ratio(ratios: list[dict[str, Any]]) -> float | None:
    """The geometric mean of consecutive doubling ratios: ``(t(T_last)/t(T_first))^(1/n)``.

    Less sensitive to one noisy length than any single ratio.
    """
    if not ratios:
        return None
    return float(np.prod([r["ratio"] for r in ratios]) ** (1 / len(ratios)))


def plot(
    rows: list[dict[str, Any]],
    stopped: dict[str, str],
    crossover: dict[str, int | None],
    out: str,
) -> str:
    """Log-log figure: time and memory per sequence against ``T``, one curve per model.

    A dotted vertical line marks a crossover (from where ``larnn`` is at most attention).
    """
    plt = pyplot()
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in MODELS:
        mine = [row for row in rows if row["model"] == model]
        if not mine:
            continue
        lengths = [row["point"] for row in mine]
        label = model + (" (stopped)" if model in stopped else "")
        time_axis.loglog(lengths, [r["ms_per_seq"] for r in mine], "o-", base=2, label=label)
        memory_axis.loglog(lengths, [r["mib_per_seq"] for r in mine], "o-", base=2, label=label)
    for axis, title, point in (
        (time_axis, "training step time per sequence (ms)", crossover["time_larnn"]),
        (memory_axis, "compiled peak memory per sequence (MiB)", crossover["memory_larnn"]),
    ):
        if point is not None:
            axis.axvline(point, color="grey", linestyle=":", label=f"larnn crossover T={point}")
        axis.set_xlabel("sequence length T")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    path = save_figure(figure, out)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints the tables and returns (and writes) the JSON payload."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int_list, default=doubling(128, 8192))
    add_workload_arguments(parser, skip=("steps", "classes", "dropout_rate"), batch=4, num_layers=1)
    parser.add_argument("--time-budget-s", type=float, default=60.0, help="stop above this")
    add_subset_argument(parser, "--models", MODELS)
    add_run_arguments(parser, "scaling_length", repeats=3)
    args = parser.parse_args(argv)
    budget = memory_budget_bytes(args.memory_budget_gb)

    def make_bench(model: str, length: int) -> TrainingBench:
        key_x, key_y = jax.random.split(jax.random.key(length))
        x = jax.random.normal(key_x, (args.batch, length, args.inputs))
        y = jax.random.randint(key_y, (args.batch,), 0, PAPER["classes"])
        return TrainingBench(build_model(model, args, length), x, y)

    rows: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}

    def save_partial(group_rows: list[dict[str, Any]]) -> None:
        write_partial_json(args.out, "scaling_length", vars(args), rows + group_rows)

    for group in TIMING_GROUPS:
        selected = [model for model in group if model in args.models]
        if not selected:
            continue
        group_rows, group_stopped = measure_series(
            args.lengths,
            selected,
            make_bench,
            repeats=args.repeats,
            warmup=args.warmup,
            memory_budget=budget,
            time_budget_s=args.time_budget_s,
            after_point=save_partial,
        )
        rows.extend(group_rows)
        stopped.update(group_stopped)
    for row in rows:
        row["ms_per_seq"] = row["median_s"] * 1e3 / args.batch
        row["mib_per_seq"] = row["memory"]["total_bytes"] / 2**20 / args.batch
        if "cpu_user_s" in row:
            row["cpu_s"] = row["cpu_user_s"] + row["cpu_sys_s"]
    ratios = doubling_ratios(rows)
    remat_ratios = doubling_ratios(rows, "larnn_remat")
    cpu_ratios = doubling_ratios(rows, key="cpu_s")
    crossover = {
        f"{quantity}_{model}": _crossover(rows, key, model)
        for quantity, key in (("time", "median_s"), ("memory", "mib_per_seq"))
        for model in ("larnn", "larnn_remat")
    }
    figure = plot(rows, stopped, crossover, args.out)
    payload: dict[str, Any] = {
        "benchmark": "scaling_length",
        "complete": True,
        "config": vars(args),
        "larnn_block": f"{args.num_layers} LARNN layer(s), residual stacking",
        "attention_block": "one causal multi-head self-attention layer, residual sum",
        "memory_budget_bytes": budget,
        "rows": rows,
        "stopped": stopped,
        "crossover_T": crossover,
        "larnn_doubling_ratios": ratios,
        "larnn_remat_doubling_ratios": remat_ratios,
        "larnn_cpu_time_doubling_ratios": cpu_ratios,
        "larnn_mean_doubling_ratio": mean_doubling_ratio(ratios),
        "larnn_cpu_time_mean_doubling_ratio": mean_doubling_ratio(cpu_ratios),
        "target": {
            "max_doubling_ratio": TARGET_DOUBLING,
            "met": all(r["ratio"] <= TARGET_DOUBLING for r in ratios) if ratios else None,
        },
        "figure": figure,
    }

    print(describe_machine(machine_info()))
    print(
        f"batch {args.batch}, H={args.features}, heads {args.num_heads}, k={args.window_size}; "
        f"LARNN: {args.num_layers} layer(s); attention: 1 layer; median of {args.repeats}; budgets "
        f"{(budget or 0) / GIB:.1f} GiB, {args.time_budget_s:.0f} s"
    )
    by_length: dict[int, dict[str, Any]] = {}
    for row in rows:
        entry = by_length.setdefault(row["point"], {"T": row["point"]})
        entry[f"{row['model']}_ms"] = row["ms_per_seq"]
        entry[f"{row['model']}_mib"] = row["mib_per_seq"]
    for entry in by_length.values():
        if "attention_ms" in entry and "larnn_ms" in entry:
            entry["time_ratio"] = entry["larnn_ms"] / entry["attention_ms"]
        if "larnn_remat_ms" in entry and "larnn_ms" in entry:
            entry["remat_ratio"] = entry["larnn_remat_ms"] / entry["larnn_ms"]
    print(
        format_table(
            list(by_length.values()),
            [
                Column("T", "T"),
                Column("larnn_ms", "LARNN ms/seq", "{:.2f}"),
                Column("larnn_remat_ms", "remat ms/seq", "{:.2f}"),
                Column("attention_ms", "attention ms/seq", "{:.2f}"),
                Column("time_ratio", "LARNN/attention", "{:.2f}"),
                Column("remat_ratio", "remat/LARNN", "{:.2f}"),
                Column("larnn_mib", "LARNN MiB/seq", "{:.1f}"),
                Column("larnn_remat_mib", "remat MiB/seq", "{:.2f}"),
                Column("attention_mib", "attention MiB/seq", "{:.1f}"),
            ],
        )
    )
    for model, reason in stopped.items():
        print(f"{model}: {reason}")
    for name, point in crossover.items():
        quantity, model = name.split("_", 1)
        text = f"T={point}" if point else "none measured"
        print(f"{quantity} crossover ({model} <= attention): {text}")
    remat_by_length = {r["T"]: r["ratio"] for r in remat_ratios}
    cpu_by_length = {r["T"]: r["ratio"] for r in cpu_ratios}
    print(
        format_table(
            [
                {**r, "remat": remat_by_length.get(r["T"]), "cpu": cpu_by_length.get(r["T"])}
                for r in ratios
            ],
            [
                Column("T", "T"),
                Column("ratio", "LARNN t(2T)/t(T)", "{:.2f}"),
                Column("cpu", "LARNN CPU-time ratio", "{:.2f}"),
                Column("remat", "remat t(2T)/t(T)", "{:.2f}"),
            ],
        )
    )
    if ratios:
        verdict = "met" if payload["target"]["met"] else "NOT met"
        print(
            f"target t(2T)/t(T) <= {TARGET_DOUBLING} from T={DOUBLING_FROM}: {verdict} (per "
            f"pair); mean per doubling {payload['larnn_mean_doubling_ratio']:.2f} wall, "
            f"{payload['larnn_cpu_time_mean_doubling_ratio'] or float('nan'):.2f} CPU time"
        )
    write_json(args.out, payload)
    print(f"figure: {figure}")
    return payload


if __name__ == "__main__":
    main()
