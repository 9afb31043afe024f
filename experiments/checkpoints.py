"""Checkpoints of a training run: Orbax-managed, verified on restore, safe against crashes.

Layout of a checkpoint folder (``OUT/checkpoints``), one sub-folder per completed epoch::

    OUT/checkpoints/
        <epoch>/                 the state after that many epochs (1, 2, ...)
            state/               Orbax StandardSave of {"params", "batch_stats", "opt_state", "rng"}
            meta/metadata        JSON written by the caller (training: epoch, config, metrics
                                 history, test predictions of the selected epoch so far)
            metrics/metrics      JSON written by Orbax: {"selection_score": float}
            _CHECKPOINT_METADATA, commit_success.txt     Orbax's own bookkeeping
            sha256sums.json      written last: size and SHA-256 of every other file
        quarantine/<epoch>-<time>/   corrupted or incomplete checkpoints moved out of the way

Orbax writes each step into a temporary folder and renames it when complete; this module then
writes ``sha256sums.json``. A step folder without that file was interrupted while saving, and a
file that is missing or whose size or digest differs was damaged afterwards; either way the step
is "bad". Bad steps are found when the store is opened: a writable store moves them to
``quarantine/`` (so that training can save that epoch again) with a warning that names the step,
and resumes from an older one; a read-only store skips them and records them in
:attr:`CheckpointStore.bad_steps`, for the reader to say what it does without them (evaluation
and predictions never use another epoch unasked: :mod:`experiments.restore`). A step that passes
verification but does not fit the model it is restored into is an error, not a reason to fall
back.

Retention: the 3 latest steps and the step with the best selection score (validation accuracy,
see :func:`experiments.report.selection_score`; ties go to the later step).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, overload

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from experiments.files import atomic_write, sha256_file
from larnn_jax.typing import PyTree

log = logging.getLogger(__name__)

MANIFEST_NAME = "sha256sums.json"
QUARANTINE_DIR = "quarantine"
STATE_ITEM = "state"
META_ITEM = "meta"
SCORE_KEY = "selection_score"


class CheckpointError(RuntimeError):
    """A checkpoint folder holds no usable checkpoint, or a requested step is unusable."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (a full disk, a lost mount); the earlier ones are
    intact and the run can be resumed from the latest of them."""


def _step_files(step_dir: pathlib.Path) -> Iterator[pathlib.Path]:
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            yield path


def write_manifest(step_dir: pathlib.Path) -> None:
    """Records size and SHA-256 of every file of a finished step in ``step_dir/sha256sums.json``.

    Written to a temporary name, flushed to disk and renamed, so the manifest itself is either
    complete or absent (:func:`experiments.files.atomic_write`).
    """
    files = {
        path.relative_to(step_dir).as_posix(): {
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        for path in _step_files(step_dir)
    }
    with atomic_write(step_dir / MANIFEST_NAME, durable=True) as file:
        json.dump({"files": files}, file, indent=1, sort_keys=True)


def verify_step(step_dir: pathlib.Path) -> str | None:
    """Checks a step folder against its manifest.

    Returns:
        ``None`` when every file listed in the manifest is present with the recorded size and
        SHA-256, otherwise a sentence describing the first problem found.
    """
    manifest_path = step_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"it has no {MANIFEST_NAME}, so its save never completed"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST_NAME} is unreadable ({err})"
    for name, expected in sorted(files.items()):
        path = step_dir / name
        if not path.is_file():
            return f"file {name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"file {name} has {size} bytes instead of {expected['size']} (truncated?)"
        if sha256_file(path) != expected["sha256"]:
            return f"file {name} does not match its recorded SHA-256"
    return None


def abstract_tree(tree: PyTree) -> PyTree:
    """The shapes and dtypes of ``tree`` (``jax.ShapeDtypeStruct`` leaves): a restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointStore:
    """One run's checkpoints: save every epoch, restore the latest good one.

    Args:
        directory: the checkpoint folder (``OUT/checkpoints``); created when writable.
        keep_latest: how many of the most recent steps to keep (besides the best one).
        read_only: open for restoring only: nothing is written, moved or deleted.

    Use as a context manager, or call :meth:`close`.

    Attributes:
        bad_steps: ``{step: problem}`` for the bad steps a read-only store skipped (a writable
            store moves them to ``quarantine/``).
    """

    def __init__(
        self, directory: os.PathLike | str, *, keep_latest: int = 3, read_only: bool = False
    ):
        self.directory = pathlib.Path(directory).absolute()
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint folder at {self.directory}")
        self.bad_steps: dict[int, str] = {}
        self._failed_save_logs: _HeldRecords | None = None
        if self.directory.is_dir():
            self._set_aside_bad_steps()
        preservation = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=keep_latest),
                checkpoint_managers.BestN(
                    get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            # best_fn makes Orbax write each step's metrics so that BestN still knows them after
            # a restart; retention itself is the preservation policy.
            best_fn=_score,
            best_mode="max",
            preservation_policy=preservation,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            # Read-only stores may hold bad steps whose metrics Orbax would fail to parse.
            lightweight_initialize=read_only,
        )
        absl = logging.getLogger("absl")
        absl.addFilter(_without_read_only_notice)  # the store says it is read-only: no news
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=(STATE_ITEM, META_ITEM)
            )
        finally:
            absl.removeFilter(_without_read_only_notice)

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Waits for pending work and releases Orbax's resources."""
        # Orbax's close() does not wait for the clean-up of temporary folders that its
        # constructor started in a thread; a process that exits right after (a run refused at
        # once) would see that thread fail during the interpreter's shutdown.
        self._manager._maybe_await_cleanup_tmp_directory()
        self._manager.close()
        if self._failed_save_logs is not None:
            # Orbax keeps the failed save's asyncio tasks until it is released; collected, they
            # log the errors that the save's CheckpointSaveError already reported.
            del self._manager
            gc.collect()
            self._failed_save_logs.remove()
            self._failed_save_logs = None

    def step_dir(self, step: int) -> pathlib.Path:
        """The folder of checkpoint ``step`` (whether or not it exists)."""
        return self.directory / str(step)

    def steps(self) -> list[int]:
        """The steps that passed verification, oldest first."""
        return sorted(set(self._manager.all_steps()) - set(self.bad_steps))

    def save(self, step: int, state: PyTree, meta: dict[str, Any], selection_score: float) -> None:
        """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON-serialisable) as ``step``.

        Synchronous: when this returns, the step is on disk with its manifest, and steps that
        fell out of the retention policy are deleted.

        Raises:
            CheckpointSaveError: the step could not be written (e.g. the disk is full); what was
                written of it is incomplete and set aside when the store is next opened, the
                earlier steps are intact. The errors that Orbax's threads log about the same
                failure are not shown: the exception says it once.
        """
        intact = self.latest_step()
        threads_before = set(threading.enumerate())
        _ignore_writes_that_end_after_their_event_loop()
        held = _HeldRecords()
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}
                ),
                metrics={SCORE_KEY: float(selection_score)},
            )
            self._manager.wait_until_finished()
            write_manifest(self.step_dir(step))
            failure = None
        except (OSError, ValueError) as err:  # Orbax and TensorStore raise either
            failure = _failure_reason(err)
        if failure is None:
            held.release()
            return
        # The save's other threads may go on writing, and failing, after the first error: they
        # are waited for, and their records held until the store is closed; those of writes
        # that end later still are dropped whenever they come.
        _ReportsOfAFailedSave(f"{self.step_dir(step)}.orbax-checkpoint-tmp")
        # (And the writes that the closed loop never started: at exit, Python warns of each.)
        warnings.filterwarnings(
            "ignore", r"coroutine '.*write_fragment' was never awaited", RuntimeWarning
        )
        for thread in set(threading.enumerate()) - threads_before:
            with contextlib.suppress(Exception):  # Orbax's threads raise their error on join
                thread.join(_THREAD_WAIT_SECONDS)
        self._failed_save_logs = held
        kept = (
            f"the checkpoint of epoch {intact} is intact"
            if intact is not None
            else "no earlier checkpoint exists"
        )
        raise CheckpointSaveError(
            f"could not save the checkpoint of epoch {step} in {self.directory} ({failure}); "
            f"{kept}: resume the run (--resume) once the problem is solved"
        )

    @overload
    def restore(
        self,
        step: int,
        target: None = None,
        *,
        check_meta: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[None, dict[str, Any]]: ...

    @overload
    def restore(
        self,
        step: int,
        target: PyTree,
        *,
        check_meta: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[PyTree, dict[str, Any]]: ...

    def restore(
        self,
        step: int,
        target: PyTree | None = None,
        *,
        check_meta: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[PyTree | None, dict[str, Any]]:
        """Restores one step.

        Args:
            step: the step to restore.
            target: a pytree with the structure, shapes and dtypes of the saved state (arrays or
                ``jax.ShapeDtypeStruct``); ``None`` to read the metadata only.
            check_meta: called with the metadata before the state is read (e.g. to compare the
                saved config with the current one); its exceptions propagate.

        Returns:
            ``(state, meta)``; ``state`` is ``None`` when ``target`` is.

        Raises:
            CheckpointError: the step is absent or bad, or its files passed verification but do
                not fit ``target`` (a checkpoint written for another model or code version).
        """
        if step in self.bad_steps:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is unusable: {self.bad_steps[step]}"
            )
        if step not in self.steps():
            raise CheckpointError(
                f"no checkpoint step {step} in {self.directory} (available: {self.steps()})"
            )
        meta = self._restore_item(step, META_ITEM, ocp.args.JsonRestore())
        if check_meta is not None:
            check_meta(meta)
        if target is None:
            return None, meta
        state = self._restore_item(
            step, STATE_ITEM, ocp.args.StandardRestore(abstract_tree(target))
        )
        return state, meta

    def latest_step(self) -> int | None:
        """The most recent good step (bad ones were skipped when the store was opened)."""
        steps = self.steps()
        return steps[-1] if steps else None

    def _restore_item(self, step: int, name: str, args: ocp.args.CheckpointArgs) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
        except Exception as err:  # Orbax raises many types; all mean "does not fit"
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} passed its integrity check but its "
                f"{name!r} item could not be restored (written by another model or code "
                f"version?): {err}"
            ) from err

    def _set_aside_bad_steps(self) -> None:
        for step_dir in sorted(self.directory.iterdir()):
            if step_dir.is_dir() and step_dir.name.isdigit():
                problem = verify_step(step_dir)
                if problem is not None:
                    self._mark_bad(int(step_dir.name), problem)

    def _mark_bad(self, step: int, problem: str) -> None:
        self.bad_steps[step] = problem
        if self.read_only:  # skipped; the reader says what it does without it
            return
        where = self.step_dir(step)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        target = self.directory / QUARANTINE_DIR / f"{step}-{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(where, target)
        log.warning(
            "checkpoint step %d (%s) is unusable: %s; moved it to %s (an older checkpoint, if "
            "any, is used instead)",
            step,
            where,
            problem,
            target,
        )
        # The step is gone from disk, so it no longer blocks saving that step again.
        del self.bad_steps[step]


#: The loggers through which Orbax's threads and asyncio report the failures of a save, which
#: :meth:`CheckpointStore.save` then raises itself.
_BACKGROUND_LOGGERS = ("absl", "asyncio")
#: How long a failed save waits for each of the threads it started to end.
_THREAD_WAIT_SECONDS = 60.0


class _HeldRecords(logging.Filter):
    """Holds back every record of the :data:`_BACKGROUND_LOGGERS` from its creation until
    :meth:`release` (which logs them) or :meth:`remove` (which drops them)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        for name in _BACKGROUND_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def remove(self) -> None:
        """Stops holding records back, dropping those held."""
        for name in _BACKGROUND_LOGGERS:
            logging.getLogger(name).removeFilter(self)

    def release(self) -> None:
        """Stops holding records back, logging those held."""
        self.remove()
        for record in self.records:
            logging.getLogger(record.name).handle(record)


class _ReportsOfAFailedSave(logging.Filter):
    """From its creation on, drops the records of the :data:`_BACKGROUND_LOGGERS` that name the
    temporary folder of a failed save: the errors of its writes, which its CheckpointSaveError
    reported, when they come after the store has closed (asyncio reports a task's error when the
    task is collected, which can be as late as the interpreter's exit)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder
        for name in _BACKGROUND_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return self.folder not in record.getMessage() + str(error)


#: The hooks installed by :func:`_ignore_writes_that_end_after_their_event_loop`.
_LOOP_FILTERS: set[Callable[[Any], None]] = set()


def _ignore_writes_that_end_after_their_event_loop() -> None:
    """From now on, drops what Python reports of TensorStore writes that end after the event
    loop awaiting them has closed. When a save fails, Orbax's loop closes at the first error
    while the save's other writes go on in TensorStore's threads; each of them then reports
    ``RuntimeError: Event loop is closed`` where nothing can catch it (``sys.unraisablehook``),
    whenever it ends, up to the interpreter's exit. Every other unraisable exception is
    reported as before."""
    previous = sys.unraisablehook
    if previous in _LOOP_FILTERS:
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    _LOOP_FILTERS.add(hook)
    sys.unraisablehook = hook


def _without_read_only_notice(record: logging.LogRecord) -> bool:
    """False for the warning that Orbax logs for every read-only checkpoint folder."""
    return not record.getMessage().startswith("Given directory is read only")


def _failure_reason(error: BaseException) -> str:
    """A failed write's reason in a few words: the operating system's (``[Errno 28] No space
    left on device``), also when TensorStore wraps it in its own message; else the message."""
    if isinstance(error, OSError) and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code is not None:
        return f"[Errno {code[1]}] {os.strerror(int(code[1]))}"
    return " ".join(str(error).split())


def _score(metrics: dict[str, float]) -> float:
    return metrics[SCORE_KEY]


def holds_checkpoints(directory: pathlib.Path) -> bool:
    """Whether the folder ``directory`` holds a step that a :class:`CheckpointStore` saved (its
    manifest written, whether damaged since or not), found without opening a store (which would
    set aside what it takes for bad steps)."""
    return directory.is_dir() and any(
        (step_dir / MANIFEST_NAME).is_file()
        for step_dir in directory.iterdir()
        if step_dir.name.isdigit()
    )


def discover_checkpoint_dir(path: os.PathLike | str) -> tuple[pathlib.Path, int | None]:
    """Finds the checkpoint folder that ``path`` designates.

    ``path`` may be a run folder (holding ``checkpoints/``), a checkpoint folder, or one step
    folder inside it.

    Returns:
        ``(checkpoint_folder, step)`` where ``step`` is set only when ``path`` is a step folder.
    """
    path = pathlib.Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / META_ITEM).exists():
        return path.parent, int(path.name)
    if path.is_dir():
        return path, None
    raise CheckpointError(f"{path} is not a run folder, checkpoint folder or checkpoint step")
