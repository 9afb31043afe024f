"""Helpers shared by the benchmark scripts.

* what machine a run was on (:func:`machine_info`), tables and JSON output;
* timing: warm-up, then the compared functions interleaved repeat by repeat
  (:func:`interleaved_timings`), summarised by their median (:func:`summarize`);
* memory: XLA's compiled memory analysis (:func:`memory_analysis`, deterministic), the device's
  peak bytes where the backend reports them, and the peak resident set size of a fresh
  subprocess (:func:`run_in_subprocess`);
* the models (:class:`Workload`: a training configuration, built as the training builds it)
  and, for them, the training's own jitted step (forward, backward, optimiser update) and the
  evaluation-mode forward pass (:class:`TrainingBench`, :class:`InferenceBench`);
* series over a size, each model stopping at a memory or time budget (:func:`measure_series`).

Every script takes argparse flags for its sizes, prints a table and writes a JSON file whose
``"machine"`` entry comes from :func:`machine_info`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.naive_cell import SCAN as NAIVE_SCAN
from benchmarks.naive_cell import naive_twin
from experiments.config import TrainConfig
from experiments.steps import build_model, init_state, make_optimizer, make_train_step
from larnn_jax.models import SequenceClassifier

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = 1024**3

_PAPER_CONFIG = TrainConfig()
# The paper's UCI HAR configuration (docs/model.md §5): 9 inertial channels x 128 steps, 6 classes, and
# the training's defaults (its best hyperparameters).
PAPER = {
    "batch": _PAPER_CONFIG.batch_size,
    "steps": 128,
    "inputs": 9,
    "classes": 6,
    "hidden": _PAPER_CONFIG.hidden,
    "heads": _PAPER_CONFIG.heads,
    "window": _PAPER_CONFIG.window,
    "layers": _PAPER_CONFIG.layers,
    "dropout": _PAPER_CONFIG.dropout,
}

# Models a benchmark can build: the training's three (``TrainConfig.model``), and LARNN with the
# plain scan (``nn.RNN`` over the cell, the implementation before the fused scan), with
# rematerialised training scans (``scan='remat'``) and with the naive cell.
BLOCKS = ("larnn", "larnn_remat", "larnn_plain", "larnn_naive", "bnlstm", "lstm")

Tree = Any


# ---------------------------------------------------------------------------------------------
# The machine


def _cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_bytes() -> int | None:
    """Physical memory of the machine, where the OS reports it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """What a result was measured on, without the host's name."""
    device = jax.devices()[0]
    return {
        "platform": platform.platform(terse=True),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": _total_memory_bytes(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        # Other processes on the machine: 1-, 5- and 15-minute load averages when measured.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        # glibc's malloc settings (e.g. glibc.malloc.hugetlb=1), which change XLA:CPU's page faults.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        # A preloaded allocator (e.g. tcmalloc) replaces malloc altogether.
        "ld_preload": os.environ.get("LD_PRELOAD"),
    }


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line for the top of a printed table."""
    memory = info.get("memory_bytes")
    memory_text = f", {memory / GIB:.0f} GiB RAM" if memory else ""
    load = info.get("load_average")
    load_text = f"; load average {load[0]:.1f}" if load else ""
    return (
        f"{info['cpu_model']}, {info['cpu_cores']} cores{memory_text}; {info['platform']}; "
        f"jax {info['jax']} ({info['backend']}: {info['device_kind']}), flax {info['flax']}"
        f"{load_text}"
    )


# ---------------------------------------------------------------------------------------------
# Output


def write_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Writes ``payload`` (plus ``"machine"`` and the command line) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": machine_info(),
        "code": code_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, default=_json_default) + "\n")
    return path


def write_partial_json(
    path: str | os.PathLike[str],
    benchmark: str,
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
) -> Path:
    """Writes the rows measured so far, marked ``"complete": false``.

    A long run saves this after every point, so that a run stopped by a time limit keeps what
    it measured; the final :func:`write_json` replaces it.
    """
    payload = {"benchmark": benchmark, "complete": False, "config": config, "rows": list(rows)}
    return write_json(path, payload)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: the row key, its header and how to format a value (``None``: blank)."""

    key: str
    header: str
    fmt: str = "{}"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A plain-text table, right-aligned, one line per row (a GitHub-markdown table)."""
    cells = [[column.header for column in columns]]
    for row in rows:
        cells.append(
            [
                "" if row.get(column.key) is None else column.fmt.format(row[column.key])
                for column in columns
            ]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def print_and_write(
    out: str | os.PathLike[str],
    payload: Mapping[str, Any],
    description: str,
    columns: Sequence[Column],
) -> None:
    """Prints the machine, ``description`` and the table of ``payload["rows"]``, then writes
    ``payload`` to ``out`` (:func:`write_json`)."""
    print(describe_machine(machine_info()))
    print(description)
    print(format_table(payload["rows"], columns))
    write_json(out, payload)


def default_out(script: str) -> str:
    """The default JSON path of a script: ``benchmarks/results/<script>.json``."""
    return str(RESULTS_DIR / f"{script}.json")


def save_figure(figure: Any, json_path: str | os.PathLike[str]) -> str:
    """Saves a matplotlib figure next to the JSON output (same name, ``.png``).

    Returns its path relative to the working directory.
    """
    path = Path(json_path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return os.path.relpath(path)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# Timing


def interleaved_timings(
    functions: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in turns so that load drifts hit all alike.

    Each function is called ``warmup`` times first (untimed). Then, ``repeats`` times, every
    function is called once, in an order rotated by one at each repeat. Each function must block
    until its result is ready.
    """
    names = list(functions)
    for name in names:
        for _ in range(warmup):
            functions[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            functions[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, minimum, 99th percentile and count of timing samples (seconds)."""
    values = np.asarray(samples, dtype=np.float64)
    return {
        "median_s": float(np.median(values)),
        "min_s": float(values.min()),
        "p99_s": float(np.percentile(values, 99)),
        "repeats": len(values),
    }


def timed_compile(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``function`` jitted (unless it is already, with its own options such as donation),
    lowered and compiled for ``args``; returns it and the seconds taken."""
    start = time.perf_counter()
    jitted = function if hasattr(function, "lower") else jax.jit(function)
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Memory


def memory_analysis(compiled: Any) -> dict[str, int | None]:
    """XLA's memory analysis of a compiled function, in bytes.

    ``total_bytes = argument + output + temp - alias``: what the function needs at its peak,
    deterministic and independent of what else the process holds. ``None`` where the backend
    gives no analysis.
    """
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {"total_bytes": None}
    sizes = {
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
        "alias_bytes": analysis.alias_size_in_bytes,
        "generated_code_bytes": analysis.generated_code_size_in_bytes,
    }
    sizes["total_bytes"] = (
        sizes["argument_bytes"] + sizes["output_bytes"] + sizes["temp_bytes"] - sizes["alias_bytes"]
    )
    return sizes


def device_peak_bytes() -> int | None:
    """The device's peak bytes in use so far in this process (GPU), ``None`` where not reported."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


_CHILD_MARK = "BENCHMARK-CHILD-RESULT "


def run_in_subprocess(target: str, kwargs: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """Calls ``module:function(**kwargs)`` in a fresh Python process; adds its peak memory.

    The function returns a JSON-serialisable dict; the result gets ``peak_rss_bytes`` (the
    child's peak resident set size, which includes the Python interpreter, JAX and the compiler)
    and ``device_peak_bytes``. On failure (an exception, killed for memory, past ``timeout_s``),
    the result is ``{"error": ...}``.
    """
    command = [sys.executable, "-m", "benchmarks.common", target, json.dumps(dict(kwargs))]
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            command, cwd=root, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_CHILD_MARK):
            return json.loads(line[len(_CHILD_MARK) :])
    reason = f"exit status {done.returncode}"
    if done.returncode < 0:
        reason = f"killed by signal {-done.returncode} (out of memory?)"
    tail = done.stderr.strip().splitlines()[-3:]
    return {"error": reason + (": " + " / ".join(tail) if tail else "")}


def _child_main(argv: Sequence[str]) -> None:
    """Entry point of :func:`run_in_subprocess`'s child: ``target`` ``kwargs-json``."""
    target, kwargs = argv
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = dict(function(**json.loads(kwargs)))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["device_peak_bytes"] = device_peak_bytes()
    print(_CHILD_MARK + json.dumps(result, default=_json_default), flush=True)


def available_memory_bytes() -> int | None:
    """Memory the OS could give this process now (``MemAvailable``), where it says."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget_bytes(budget_gb: float | None) -> int | None:
    """``budget_gb`` in bytes; by default 80 % of the memory available now (``None``: no limit)."""
    if budget_gb is not None:
        return int(budget_gb * GIB)
    available = available_memory_bytes()
    return None if available is None else int(0.8 * available)


# ---------------------------------------------------------------------------------------------
# Models, training step, inference


def default_remat_chunk_length(steps: int) -> int:
    """The divisor of ``steps`` nearest ``sqrt(steps)`` (chunk length for rematerialisation)."""
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return min(divisors, key=lambda d: abs(d - steps**0.5))


@dataclasses.dataclass(frozen=True)
class Workload:
    """A classifier (docs/model.md §3) and the batch it trains on; the unit every benchmark measures.

    The model is the training's (:func:`experiments.steps.build_model`) for the
    :class:`~experiments.config.TrainConfig` of :meth:`config`: the paper's configuration (the
    training's defaults) but for the sizes given here. ``block`` is one of :data:`BLOCKS`:

    * ``'larnn'``, ``'bnlstm'``, ``'lstm'``: the training's models, LARNN with the library's
      default fused scan;
    * ``'larnn_plain'``: LARNN with ``scan='plain'`` (``nn.RNN`` over the cell);
    * ``'larnn_remat'``: LARNN with rematerialised training scans in chunks of
      ``remat_chunk_length`` steps (default: the divisor of ``steps`` nearest its square root),
      as ``TrainConfig(remat_chunk_length=N)`` trains;
    * ``'larnn_naive'``: LARNN (same variables) with
      :class:`~benchmarks.naive_cell.NaiveLARNNCell`, under the plain scan.
    """

    block: str
    batch: int = PAPER["batch"]
    steps: int = PAPER["steps"]
    inputs: int = PAPER["inputs"]
    classes: int = PAPER["classes"]
    hidden: int = PAPER["hidden"]
    heads: int = PAPER["heads"]
    window: int = PAPER["window"]
    layers: int = PAPER["layers"]
    dropout: float = PAPER["dropout"]
    norm: str = _PAPER_CONFIG.norm
    remat_chunk_length: int | None = None

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")

    @property
    def chunk(self) -> int:
        """The chunk length of ``'larnn_remat'``."""
        return self.remat_chunk_length or default_remat_chunk_length(self.steps)

    def config(self) -> TrainConfig:
        """The training configuration of this workload's model and batch."""
        return dataclasses.replace(
            _PAPER_CONFIG,
            model=self.block.partition("_")[0],
            hidden=self.hidden,
            heads=self.heads,
            window=self.window,
            layers=self.layers,
            dropout=self.dropout,
            norm=self.norm,
            batch_size=self.batch,
            remat_chunk_length=self.chunk if self.block == "larnn_remat" else None,
        )

    def model(self) -> SequenceClassifier:
        """The classifier, as the training builds it (with the scan or cell ``block`` names)."""
        model = build_model(self.config(), self.classes)
        if self.block == "larnn_plain":
            return model.clone(scan="plain")
        if self.block == "larnn_naive":
            return model.clone(cell=naive_twin(model.cell), scan=NAIVE_SCAN)
        return model

    def data(self, seed: int = 0) -> tuple[jax.Array, jax.Array]:
        """Standard-normal inputs ``(batch, steps, inputs)`` and random labels ``(batch,)``."""
        key_x, key_y = jax.random.split(jax.random.key(seed))
        x = jax.random.normal(key_x, (self.batch, self.steps, self.inputs), jnp.float32)
        return x, jax.random.randint(key_y, (self.batch,), 0, self.classes)


def add_workload_arguments(
    parser: argparse.ArgumentParser, skip: Sequence[str] = (), **defaults: Any
) -> None:
    """Flags for :class:`Workload`'s sizes but ``skip`` (defaults: the paper's or ``defaults``)."""
    values = {**PAPER, **defaults}
    for name, help_text in (
        ("batch", "sequences per batch"),
        ("steps", "time steps T per sequence"),
        ("inputs", "input features per step"),
        ("hidden", "hidden size H"),
        ("heads", "attention heads"),
        ("window", "LARNN window size k"),
        ("layers", "stacked recurrent layers (residual stacking)"),
    ):
        if name not in skip:
            parser.add_argument(f"--{name}", type=int, default=values[name], help=help_text)
    parser.add_argument("--dropout", type=float, default=values["dropout"], help="dropout on h")


def add_run_arguments(
    parser: argparse.ArgumentParser,
    script: str,
    repeats: int,
    warmup: int = 1,
    memory_budget: bool = True,
) -> None:
    """``--repeats``, ``--warmup``, ``--out`` and (with ``memory_budget``) ``--memory-budget-gb``."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed calls per function")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls first")
    if memory_budget:
        parser.add_argument(
            "--memory-budget-gb",
            type=float,
            default=None,
            help="skip what the compiled memory analysis says needs more (default: 80%% of "
            "the memory available at the start)",
        )
    parser.add_argument("--out", default=default_out(script), help="JSON output path")


def workload_from_args(args: argparse.Namespace, block: str, **overrides: Any) -> Workload:
    """The :class:`Workload` of the parsed flags for ``block``."""
    sizes = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(Workload)
        if hasattr(args, field.name) and field.name != "block"
    }
    return Workload(block=block, **{**sizes, **overrides})


def add_subset_argument(parser: argparse.ArgumentParser, flag: str, choices: Sequence[str]) -> None:
    """Adds ``flag`` (e.g. ``--models``): a comma-separated subset of ``choices`` (default: all),
    parsed into a list; an unknown or empty subset is a usage error that names it."""
    what = flag.lstrip("-")

    def subset(text: str) -> list[str]:
        chosen = [item for item in text.split(",") if item]
        unknown = sorted(set(chosen) - set(choices))
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"unknown or no {what} in {text!r}; choose from {','.join(choices)}"
            )
        return chosen

    parser.add_argument(
        flag,
        type=subset,
        default=list(choices),
        help=f"comma-separated subset of {','.join(choices)} (default: all)",
    )


def int_list(text: str) -> list[int]:
    """``'1,2,4'`` → ``[1, 2, 4]`` (an argparse type)."""
    return [int(item) for item in text.split(",") if item]


def doubling(first: int, last: int) -> str:
    """``'first,2·first,…,last'`` as an argparse default."""
    values = [first]
    while values[-1] * 2 <= last:
        values.append(values[-1] * 2)
    return ",".join(str(v) for v in values)


class TrainingBench:
    """A model's training step on one fixed batch, to be called repeatedly.

    The step is the training's own (:func:`experiments.steps.make_train_step`: forward,
    backward, the optimiser update, the state donated), compiled ahead for this batch, on the
    state of :func:`experiments.steps.init_state`. Calling it runs one step (the state moves on,
    as in training) and waits for the result.

    Attributes:
      compile_seconds: time to trace, lower and compile the step.
      memory: :func:`memory_analysis` of the compiled step.
      parameters: number of trained parameters.
      usage: per call, CPU seconds in user and kernel mode and minor page faults.
    """

    def __init__(
        self,
        model: nn.Module,
        x: jax.Array,
        y: jax.Array,
        optimizer: optax.GradientTransformation | None = None,
        seed: int = 0,
    ):
        """``optimizer``: default, the training's for the paper's configuration."""
        if optimizer is None:
            optimizer = make_optimizer(_PAPER_CONFIG, steps_per_epoch=1)
        self.x, self.y = x, y
        self.rows = jnp.arange(len(y), dtype=jnp.int32)  # the batch is all of x
        self.steps_run = 0
        self.state = init_state(model, optimizer, x[:1], seed)
        self.parameters = parameter_count(self.state["params"])
        self.compiled, self.compile_seconds = timed_compile(
            make_train_step(model, optimizer), self.state, x, y, self.rows, self.steps_run
        )
        self.memory = memory_analysis(self.compiled)
        self.usage: list[tuple[float, float, int]] = []

    @classmethod
    def of(cls, workload: Workload) -> TrainingBench:
        """The bench of a :class:`Workload`, with the training's optimiser for its configuration
        (the length of an epoch only sets when the learning rate decays: one step here)."""
        optimizer = make_optimizer(workload.config(), steps_per_epoch=1)
        return cls(workload.model(), *workload.data(), optimizer=optimizer)

    def __call__(self) -> float:
        """One training step; returns the loss. Records the CPU time and page faults it took."""
        before = resource.getrusage(resource.RUSAGE_SELF)
        self.state, loss, _ = self.compiled(self.state, self.x, self.y, self.rows, self.steps_run)
        self.steps_run += 1
        value = float(jax.block_until_ready(loss))
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.usage.append(
            (
                after.ru_utime - before.ru_utime,
                after.ru_stime - before.ru_stime,
                after.ru_minflt - before.ru_minflt,
            )
        )
        return value

    def usage_summary(self) -> dict[str, float]:
        """Medians over the calls so far: CPU seconds in user and kernel mode, minor page faults.

        This process's own CPU time (all threads), so other load on the machine does not count;
        kernel time on the CPU backend is mostly the zero-filling of freshly mapped temporary
        buffers (one minor fault per 4 KiB page).
        """
        if not self.usage:
            return {}
        user, kernel, faults = np.median(np.asarray(self.usage), axis=0)
        return {
            "cpu_user_s": float(user),
            "cpu_sys_s": float(kernel),
            "minor_faults": float(faults),
        }


class InferenceBench:
    """A model's compiled evaluation-mode forward pass on one fixed batch."""

    def __init__(self, model: nn.Module, x: jax.Array, seed: int = 0):
        self.x = x
        self.variables = model.init(jax.random.key(seed), x[:1], deterministic=True)

        def infer(variables: Tree, x: jax.Array) -> jax.Array:
            return model.apply(variables, x, deterministic=True)

        self.compiled, self.compile_seconds = timed_compile(infer, self.variables, x)
        self.memory = memory_analysis(self.compiled)

    @classmethod
    def of(cls, workload: Workload) -> InferenceBench:
        """The bench of a :class:`Workload`."""
        return cls(workload.model(), workload.data()[0])

    def __call__(self) -> None:
        """One forward pass, waited for."""
        jax.block_until_ready(self.compiled(self.variables, self.x))


def parameter_count(tree: Tree) -> int:
    """Number of scalars in a tree of arrays."""
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


# ---------------------------------------------------------------------------------------------
# Series: one measurement per (point, model), each model stopping at its budget


def measure_series(
    points: Sequence[int],
    models: Sequence[str],
    make_bench: Callable[[str, int], TrainingBench],
    *,
    repeats: int,
    warmup: int,
    memory_budget: int | None,
    time_budget_s: float | None,
    log: Callable[[str], None] = print,
    after_point: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Times a training step of every model at every point, interleaving the models per point.

    A model's series stops at the first point where the compiled memory analysis exceeds
    ``memory_budget`` (that point is not run), where compiling or running fails (for example
    out of memory), or after the first point whose median step exceeds ``time_budget_s``.
    ``after_point`` is called with the rows so far after every measured point (to save partial
    results of a run that may be stopped).

    Returns:
      One row per measured (point, model): ``point``, ``model``, the :func:`summarize` fields,
      ``compile_s``, ``memory`` (:func:`memory_analysis`) and, on devices that report it,
      ``device_peak_bytes`` (the process's peak so far, so with points in increasing order it is
      the peak of that point); and ``{model: why its series stopped}``.
    """
    rows: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}
    for point in points:
        benches: dict[str, TrainingBench] = {}
        for model in models:
            if model in stopped:
                continue
            try:
                bench = make_bench(model, point)
            except (jax.errors.JaxRuntimeError, MemoryError) as error:  # e.g. out of memory
                stopped[model] = f"failed to compile at {point}: {type(error).__name__}"
                continue
            needed = bench.memory["total_bytes"]
            if memory_budget is not None and needed is not None and needed > memory_budget:
                stopped[model] = (
                    f"stopped at {point}: needs {needed / GIB:.2f} GiB > budget "
                    f"{memory_budget / GIB:.2f} GiB"
                )
                log(f"  {model} @ {point}: {stopped[model]}")
                continue
            benches[model] = bench
        if not benches:  # every series has stopped
            break
        try:
            samples = interleaved_timings(benches, repeats=repeats, warmup=warmup)
        except (jax.errors.JaxRuntimeError, MemoryError) as error:
            for model in benches:
                stopped[model] = f"failed to run at {point}: {type(error).__name__}"
            continue
        for model, bench in benches.items():
            row = {
                "point": point,
                "model": model,
                **summarize(samples[model]),
                "compile_s": bench.compile_seconds,
                "memory": bench.memory,
                "device_peak_bytes": device_peak_bytes(),
                **bench.usage_summary(),
            }
            rows.append(row)
            log(
                f"  {model} @ {point}: {row['median_s'] * 1e3:.1f} ms/step, "
                f"{(bench.memory['total_bytes'] or 0) / GIB:.2f} GiB"
            )
            if time_budget_s is not None and row["median_s"] > time_budget_s:
                stopped[model] = (
                    f"stopped after {point}: {row['median_s']:.1f} s/step > time budget "
                    f"{time_budget_s:.0f} s"
                )
        if after_point is not None:
            after_point(rows)
    return rows, stopped


def code_version() -> dict[str, Any]:
    """The commit measured and whether the library (``larnn_jax/``) differed from it."""
    import larnn_jax

    root = Path(larnn_jax.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--", "larnn_jax")
    return {
        "commit": git("rev-parse", "HEAD"),
        "library_uncommitted_changes": None if status is None else bool(status),
    }


if __name__ == "__main__":
    _child_main(sys.argv[1:])
