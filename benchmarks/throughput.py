"""Training and inference throughput at the paper's configuration, against Flax's LSTM.

One training step is the training's own jitted step (forward, backward, optimiser update of
the whole classifier, docs/model.md §3; see :class:`benchmarks.harness.workloads.TrainingBench`); inference is the
evaluation-mode forward pass. Models (:data:`benchmarks.harness.workloads.BLOCKS`): LARNN (the library's
default, ``scan='auto'``: the native step where it is available, else the XLA fused scan), LARNN
with the XLA fused scan (``larnn_fused``), LARNN with rematerialised training scans (``larnn_remat``:
``scan='remat'``, chunks of ``N`` steps, ``N`` the divisor of ``T`` nearest ``sqrt(T)`` unless
``--remat-chunk-length``), LARNN with the plain scan (``larnn_plain``: ``nn.RNN`` over the cell,
the implementation before the fused scan), LARNN with the naive cell
(:mod:`larnn_jax.reference`), the BN-LSTM (``bnlstm``), Flax's ``nn.LSTMCell`` (``lstm``)
and, when ``torch`` is importable, PyTorch's ``nn.LSTM`` (``torch_lstm``: input projection, a
``num_layers``-layer ``nn.LSTM`` without residual sums, classifier on the last step; eager).

All models are timed in turns (see :func:`benchmarks.harness.timing.interleaved_timings`); every figure
is a median, reported with its ratio to Flax's LSTM from the same run, and the default LARNN's
speed-up over the other scans measured (``larnn_fused`` or ``larnn_plain`` time / ``larnn`` time).

    python -m benchmarks.throughput                       # the paper configuration
    python -m benchmarks.throughput --batch 64 --repeats 3
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.harness.arguments import (
    add_run_arguments,
    add_subset_argument,
    add_workload_arguments,
    workload_from_args,
)
from benchmarks.harness.machine import describe_machine, machine_info
from benchmarks.harness.memory_use import GIB, memory_budget_bytes
from benchmarks.harness.output import Column, format_table, write_json
from benchmarks.harness.timing import interleaved_timings, summarize
from benchmarks.harness.workloads import BLOCKS, InferenceBench, TrainingBench, Workload
from larnn_jax import native

MODELS = (*BLOCKS, "torch_lstm")
BASELINE = "lstm"
TARGET_RATIO = 3.0  # the project's target: a LARNN training step <= 3x Flax LSTM's


def torch_benches(workload: Workload) -> tuple[Callable[[], None], Callable[[], None]] | None:
    """PyTorch ``nn.LSTM`` training-step and inference callables, or ``None`` without torch.

    Same batch, sizes and loss as ``workload`` (``block='lstm'``); runs on CUDA when both JAX and
    torch see a GPU, else on the CPU.
    """
    try:
        import torch
    except ImportError:
        return None
    import jax

    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    torch.manual_seed(0)
    projection = torch.nn.Linear(workload.inputs, workload.features)
    lstm = torch.nn.LSTM(
        workload.features, workload.features, workload.num_layers, batch_first=True
    )
    classifier = torch.nn.Linear(workload.features, workload.classes)
    modules = torch.nn.ModuleList([projection, lstm, classifier]).to(device)
    optimizer = torch.optim.Adam(modules.parameters(), lr=1e-3)
    x_jax, y_jax = workload.data()
    x = torch.from_numpy(np.asarray(x_jax)).to(device)
    y = torch.from_numpy(np.asarray(y_jax)).long().to(device)

    def logits() -> Any:
        sequence, _ = lstm(torch.nn.functional.elu(projection(x)))
        return classifier(sequence[:, -1])

    def wait() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def train() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits(), y).backward()
        optimizer.step()
        wait()

    def infer() -> None:
        with torch.no_grad():
            logits()
        wait()

    return train, infer


def native_scan_reason() -> str:
    """Which scan ``scan='auto'`` runs for the paper's LARNN here, and why not the native one."""
    reason = native.unavailable_reason()
    return "the native step" if reason is None else f"the XLA fused scan ({reason})"


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or not baseline else value / baseline


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints the table and returns (and writes) the JSON payload."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    add_run_arguments(parser, "throughput", repeats=5)
    add_subset_argument(parser, "--models", MODELS)
    parser.add_argument("--remat-chunk-length", type=int, default=None, help="larnn_remat's N")
    args = parser.parse_args(argv)
    models = args.models
    budget = memory_budget_bytes(args.memory_budget_gb)

    train: dict[str, Callable[[], Any]] = {}
    infer: dict[str, Callable[[], Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for model in models:
        if model == "torch_lstm":
            benches = torch_benches(workload_from_args(args, "lstm"))
            if benches is None:
                skipped[model] = "torch is not importable"
                continue
            train[model], infer[model] = benches
            info[model] = {"compile_s": None, "infer_compile_s": None, "memory": None}
            continue
        workload = workload_from_args(args, model)
        training = TrainingBench.of(workload)
        needed = training.memory["total_bytes"]
        if budget is not None and needed is not None and needed > budget:
            skipped[model] = f"needs {needed / GIB:.1f} GiB > budget {budget / GIB:.1f} GiB"
            continue
        inference = InferenceBench.of(workload)
        train[model], infer[model] = training, inference
        info[model] = {
            "compile_s": training.compile_seconds,
            "infer_compile_s": inference.compile_seconds,
            "memory": training.memory,
            "parameters": training.parameters,
        }
        print(f"compiled {model}: {training.compile_seconds:.1f} s", flush=True)

    train_times = interleaved_timings(train, args.repeats, args.warmup)
    infer_times = interleaved_timings(infer, args.repeats, args.warmup)
    base_train = summarize(train_times[BASELINE])["median_s"] if BASELINE in train else None
    base_infer = summarize(infer_times[BASELINE])["median_s"] if BASELINE in infer else None
    base_compile = info.get(BASELINE, {}).get("compile_s")

    rows = []
    for model in train:
        train_summary, infer_summary = summarize(train_times[model]), summarize(infer_times[model])
        memory = info[model]["memory"]
        bench = train[model]
        usage = bench.usage_summary() if isinstance(bench, TrainingBench) else {}
        cpu = usage.get("cpu_user_s", 0.0) + usage.get("cpu_sys_s", 0.0)
        infer_bench = infer[model]
        infer_usage = infer_bench.usage_summary() if isinstance(infer_bench, InferenceBench) else {}
        infer_cpu = infer_usage.get("cpu_user_s", 0.0) + infer_usage.get("cpu_sys_s", 0.0)
        rows.append(
            {
                "model": model,
                "train_ms": train_summary["median_s"] * 1e3,
                "train_seq_per_s": args.batch / train_summary["median_s"],
                "train_vs_lstm": _ratio(train_summary["median_s"], base_train),
                "infer_ms": infer_summary["median_s"] * 1e3,
                "infer_seq_per_s": args.batch / infer_summary["median_s"],
                "infer_vs_lstm": _ratio(infer_summary["median_s"], base_infer),
                "infer_cpu_s": infer_cpu or None,
                "compile_s": info[model]["compile_s"],
                "compile_vs_lstm": _ratio(info[model]["compile_s"], base_compile),
                "train_memory_gib": None if memory is None else memory["total_bytes"] / GIB,
                **usage,
                "train_cpu_s": cpu or None,
                "train_sys_share": usage["cpu_sys_s"] / cpu if cpu else None,
                "train_samples_s": train_times[model],
                "infer_samples_s": infer_times[model],
                **{k: v for k, v in info[model].items() if k not in ("compile_s", "memory")},
                "train_memory": memory,
            }
        )
    base_cpu = next((r["train_cpu_s"] for r in rows if r["model"] == BASELINE), None)
    base_infer_cpu = next((r["infer_cpu_s"] for r in rows if r["model"] == BASELINE), None)
    for row in rows:
        row["train_cpu_vs_lstm"] = _ratio(row["train_cpu_s"], base_cpu)
        row["infer_cpu_vs_lstm"] = _ratio(row["infer_cpu_s"], base_infer_cpu)
    larnn_ratio = next((r["train_vs_lstm"] for r in rows if r["model"] == "larnn"), None)
    by_model = {row["model"]: row for row in rows}
    default = by_model.get("larnn")
    speedup = {  # the default LARNN against the other scans
        other: {
            "train": by_model[other]["train_ms"] / default["train_ms"],
            "infer": by_model[other]["infer_ms"] / default["infer_ms"],
        }
        for other in ("larnn_fused", "larnn_plain")
        if default is not None and other in by_model
    }
    payload: dict[str, Any] = {
        "benchmark": "throughput",
        "config": vars(args),
        "rows": rows,
        "skipped": skipped,
        "larnn_scan": native_scan_reason(),
        "larnn_speedup": speedup,
        "target": {
            "larnn_train_vs_lstm_max": TARGET_RATIO,
            "larnn_train_vs_lstm": larnn_ratio,
            "met": None if larnn_ratio is None else larnn_ratio <= TARGET_RATIO,
        },
    }
    print(describe_machine(machine_info()))
    print(
        f"batch {args.batch}, T={args.steps}, D={args.inputs}, H={args.features}, "
        f"heads {args.num_heads}, k={args.window_size}, {args.num_layers} layers; median of {args.repeats}"
    )
    print(
        format_table(
            rows,
            [
                Column("model", "model"),
                Column("train_ms", "train ms/step", "{:.1f}"),
                Column("train_seq_per_s", "train seq/s", "{:.0f}"),
                Column("train_vs_lstm", "x LSTM", "{:.2f}"),
                Column("infer_ms", "infer ms/batch", "{:.1f}"),
                Column("infer_seq_per_s", "infer seq/s", "{:.0f}"),
                Column("infer_vs_lstm", "x LSTM", "{:.2f}"),
                Column("infer_cpu_s", "infer CPU s", "{:.3f}"),
                Column("infer_cpu_vs_lstm", "x LSTM", "{:.2f}"),
                Column("compile_s", "compile s", "{:.1f}"),
                Column("compile_vs_lstm", "x LSTM", "{:.2f}"),
                Column("train_memory_gib", "train GiB", "{:.2f}"),
                Column("train_cpu_s", "train CPU s", "{:.2f}"),
                Column("train_cpu_vs_lstm", "x LSTM", "{:.2f}"),
                Column("train_sys_share", "kernel share", "{:.0%}"),
            ],
        )
    )
    if "larnn_remat" in train:
        chunk = workload_from_args(args, "larnn_remat").chunk
        print(f"larnn_remat: scan='remat', remat_chunk_length={chunk}")
    print(f"larnn runs {payload['larnn_scan']}")
    for other, ratios in speedup.items():
        print(
            f"larnn against {other}: {ratios['train']:.2f}x faster training steps, "
            f"{ratios['infer']:.2f}x faster inference"
        )
    for model, reason in skipped.items():
        print(f"skipped {model}: {reason}")
    if larnn_ratio is not None:
        verdict = "met" if payload["target"]["met"] else "NOT met"
        print(f"target LARNN step <= {TARGET_RATIO:g}x LSTM: {larnn_ratio:.2f}x, {verdict}")
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
