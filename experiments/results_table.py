"""The results tables of the documentation, generated from the run files under ``results/``.

    python -m experiments.results_table                  # print the tables
    python -m experiments.results_table --write docs/results.md README.md
    python -m experiments.results_table --check docs/results.md README.md   # exit 1 if they differ

Every run folder directly under ``--results`` (default ``results/uci_har``) that holds a
``report.json``,
its ``config.json`` and ``metrics.jsonl`` is one row of the per-run table. Runs whose
configurations differ only in the seed (and in where and how they ran: output folder, data
folder, progress bar, rematerialisation) are one *variant*; the summary table gives, per variant,
which epoch its honest figure comes from (selected on validation, or the final epoch of a run
without validation split), the mean ± sample standard deviation over its seeds of the honest test
accuracy and weighted F1,
and the mean of the optimistic figure (the paper's protocol: the best test accuracy over all
epochs). The subject table gives, per variant, the honest test accuracy on each test subject:
from ``report.json`` where the run recorded it, else from the ``evaluation-epoch<N>.json`` that
``python -m experiments.evaluate`` wrote for the selected epoch ``N`` into the run folder. Each
file in ``--results``'s ``ensembles/`` folder (written by ``python -m experiments.ensemble``, whose
members must be run folders under ``--results``) is a line of the ensemble table.

In a Markdown file the generated text sits between a section's markers (:data:`SECTIONS`): all
three tables between ``<!-- results:start -->`` and ``<!-- results:end -->`` (docs/results.md),
the summary alone between ``<!-- results-summary:start -->`` and ``<!-- results-summary:end -->``
(the README's headline). ``--write`` and ``--check`` fill or compare every section a file has.

The screening of a recipe's parts (docs/recipe.md, ``--results results/uci_har/screen``) has its
own section, ``<!-- screen:start -->`` … ``<!-- screen:end -->`` (:func:`screen_tables`): it judges
each part on validation accuracy only. Its run folders are named ``NAME-seed<S>``, and each
``NAME`` (a variant of the recipe) is compared seed by seed with :data:`SCREEN_REFERENCE` (the
seeds draw the validation subjects).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

from experiments import cli
from experiments.config import RUN_FIELDS, TrainConfig, with_settings_of_older_runs
from experiments.files import write_text_atomically

#: Fields that do not change what a run computes, besides the seed.
NOT_PART_OF_A_VARIANT = RUN_FIELDS - {"epochs"} | {"seed"}
MODEL_NAMES = {"larnn": "LARNN", "bnlstm": "BN-LSTM", "lstm": "LSTM (Flax)"}


@dataclasses.dataclass(frozen=True)
class Run:
    """What the tables need of one run folder."""

    name: str
    config: dict[str, Any]
    report: dict[str, Any]
    history: list[dict[str, Any]]
    #: honest test accuracy per test subject (``{"2": 0.93, …}``), where known
    per_subject: dict[str, float] | None

    @property
    def variant(self) -> str:
        """The model and every setting that differs from the defaults, seed aside."""
        defaults = TrainConfig().to_dict()
        changes = [
            f"{name}={value}"
            for name, value in sorted(self.config.items())
            if name not in NOT_PART_OF_A_VARIANT | {"model"} and value != defaults.get(name)
        ]
        return " ".join([MODEL_NAMES.get(self.config["model"], self.config["model"]), *changes])

    @property
    def test_figure(self) -> str:
        """Which epoch its honest test figure comes from: the one selected on validation, or
        the final one (a run without validation split, trained on every training subject)."""
        if self.report["selection"]["val_accuracy"] is None:
            return "final epoch (no validation)"
        return "selected on validation"

    def most_diverged(self, split: str) -> int | None:
        """The largest number of ``split`` sequences that diverged in one epoch."""
        counts = [line.get(f"{split}_diverged") for line in self.history]
        known = [count for count in counts if count is not None]
        return max(known) if len(known) == len(counts) else None


def load_runs(results: pathlib.Path) -> list[Run]:
    """Every complete run folder below ``results``, sorted by variant, then seed."""
    runs = []
    for report_path in sorted(results.glob("*/report.json")):
        folder = report_path.parent
        try:
            config = json.loads((folder / "config.json").read_text())
            history = [
                json.loads(line)
                for line in (folder / "metrics.jsonl").read_text().splitlines()
                if line.strip()
            ]
            report = json.loads(report_path.read_text())
            per_subject = per_subject_accuracy(folder, report)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: incomplete run folder {folder}: {err}") from err
        runs.append(
            Run(
                str(folder.relative_to(results)),
                with_settings_of_older_runs(config),
                report,
                history,
                per_subject,
            )
        )
    return sorted(runs, key=lambda run: (run.variant, run.config["seed"], run.name))


def per_subject_accuracy(folder: pathlib.Path, report: dict[str, Any]) -> dict[str, float] | None:
    """A run's honest test accuracy per test subject: its report's, else that of the evaluation
    of its selected epoch in ``folder`` (which must give the report's test accuracy)."""
    if "per_subject_accuracy" in report["test"]:
        return report["test"]["per_subject_accuracy"]
    path = folder / f"evaluation-epoch{report['selection']['epoch']}.json"
    if not path.exists():
        return None
    test = json.loads(path.read_text())["test"]
    if abs(test["accuracy"] - report["test"]["accuracy"]) > 1e-9:
        raise SystemExit(
            f"error: {path} gives test accuracy {test['accuracy']}, but the run's report.json "
            f"{report['test']['accuracy']} for the same epoch"
        )
    return test.get("per_subject_accuracy")


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def runs_table(runs: Sequence[Run]) -> str:
    """One line per run."""
    lines = [
        "| variant | run | seed | epochs | selected epoch | val acc | honest test acc "
        "| weighted F1 | optimistic test acc (epoch) | most diverged val / test sequences in an "
        "epoch | median s/epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        report = run.report
        diverged = " / ".join(
            "–" if count is None else str(count)
            for count in (run.most_diverged("val"), run.most_diverged("test"))
        )
        val_accuracy = report["selection"]["val_accuracy"]  # None: no validation split
        lines.append(
            f"| {run.variant} | `{run.name}` | {run.config['seed']} | {report['epochs']} "
            f"| {report['selection']['epoch']} "
            f"| {'–' if val_accuracy is None else f'{val_accuracy:.4f}'} "
            f"| **{report['test']['accuracy']:.4f}** | {report['test']['weighted_f1']:.4f} "
            f"| {report['optimistic_protocol_best_test_accuracy']:.4f} "
            f"({report['optimistic_protocol_best_test_epoch']}) | {diverged} "
            f"| {report['seconds_per_epoch']['median']:.0f} |"
        )
    return "\n".join(lines)


def _by_variant(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """The runs grouped by :attr:`Run.variant`, in the order of ``runs``."""
    variants: dict[str, list[Run]] = {}
    for run in runs:
        variants.setdefault(run.variant, []).append(run)
    return variants


def summary_table(runs: Sequence[Run]) -> str:
    """One line per variant: mean ± standard deviation over its seeds."""
    lines = [
        "| variant | seeds | epoch of the honest figure | honest test acc | weighted F1 "
        "| optimistic test acc (paper's protocol) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for variant, members in _by_variant(runs).items():
        figures = " / ".join(sorted({run.test_figure for run in members}))
        lines.append(
            f"| {variant} | {len(members)} | {figures} "
            f"| **{_mean_std([r.report['test']['accuracy'] for r in members])}** "
            f"| {_mean_std([r.report['test']['weighted_f1'] for r in members])} "
            f"| {_mean_std([r.report['optimistic_protocol_best_test_accuracy'] for r in members])}"
            " |"
        )
    return "\n".join(lines)


def subject_table(runs: Sequence[Run]) -> str | None:
    """One line per variant whose runs all know their per-subject accuracy: its mean over the
    seeds on each test subject. ``None`` if no variant qualifies."""
    known: dict[str, list[dict[str, float]]] = {}
    for variant, members in _by_variant(runs).items():
        accuracies = [run.per_subject for run in members if run.per_subject]
        if len(accuracies) == len(members):
            known[variant] = accuracies
    if not known:
        return None
    subjects = sorted(
        {subject for seeds in known.values() for accuracy in seeds for subject in accuracy},
        key=int,
    )
    lines = [
        "| variant | seeds | " + " | ".join(f"subject {subject}" for subject in subjects) + " |",
        "|---|---:|" + "---:|" * len(subjects),
    ]
    for variant, seeds in known.items():
        means = [statistics.fmean(accuracy[subject] for accuracy in seeds) for subject in subjects]
        cells = " | ".join(f"{mean:.3f}" for mean in means)
        lines.append(f"| {variant} | {len(seeds)} | {cells} |")
    return "\n".join(lines)


#: The folder under ``--results`` of the ensembles' files (``python -m experiments.ensemble``).
ENSEMBLES_DIR = "ensembles"


def ensemble_table(runs: Sequence[Run], results: pathlib.Path) -> str | None:
    """One line per ensemble file in ``results/ensembles/``: its members' variant, their honest
    test accuracy (mean ± sd) and the ensemble's test accuracy and weighted F1. ``None`` if
    there is no ensemble file.

    Raises:
        SystemExit: an unreadable file, or a member that is not a run of ``runs`` at its honest
            epoch with its honest test accuracy (the ensemble must be of the committed runs).
    """
    paths = sorted((results / ENSEMBLES_DIR).glob("*.json"))
    if not paths:
        return None
    by_name = {run.name: run for run in runs}
    lines = [
        "| ensemble | variant | runs | epoch of the members' figure | members' honest test acc "
        "| ensemble's test acc | ensemble's weighted F1 |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for path in paths:
        try:
            ensemble = json.loads(path.read_text())
            members, test = ensemble["members"], ensemble["test"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"error: unreadable ensemble file {path}: {err!r}") from err
        member_runs = []
        for member in members:
            run = by_name.get(member["run"])
            if (
                run is None
                or member["epoch"] != run.report["selection"]["epoch"]
                or abs(member["test_accuracy"] - run.report["test"]["accuracy"]) > 1e-9
            ):
                raise SystemExit(
                    f"error: {path}: member {member['run']} (epoch {member['epoch']}, test "
                    f"accuracy {member['test_accuracy']}) is not a run under {results} at its "
                    "honest epoch"
                )
            member_runs.append(run)
        variants = " / ".join(sorted({run.variant for run in member_runs}))
        figures = " / ".join(sorted({run.test_figure for run in member_runs}))
        accuracies = [run.report["test"]["accuracy"] for run in member_runs]
        lines.append(
            f"| `{path.stem}` | {variants} | {len(member_runs)} | {figures} "
            f"| {_mean_std(accuracies)} | **{test['accuracy']:.4f}** "
            f"| {test['weighted_f1']:.4f} |"
        )
    return "\n".join(lines)


def tables(runs: Sequence[Run], results: pathlib.Path) -> str:
    """The summary, the per-subject, the ensemble and the per-run table (the ``results``
    section)."""
    text = summary(runs, results)
    subjects = subject_table(runs)
    if subjects is not None:
        text += (
            "\n\nHonest test accuracy on each test subject (at each run's selected epoch; mean "
            f"over the seeds):\n\n{subjects}"
        )
    ensembles = ensemble_table(runs, results)
    if ensembles is not None:
        text += (
            "\n\nEnsembles of a variant's seeds (`python -m experiments.ensemble`: the class of "
            "highest mean probability over the runs, each at its honest epoch; reported beside "
            f"the variants, never as a headline):\n\n{ensembles}"
        )
    return f"{text}\n\nEvery run:\n\n{runs_table(runs)}"


def summary(runs: Sequence[Run], results: pathlib.Path) -> str:
    """The summary table with its caption (the ``results-summary`` section)."""
    return (
        f"Summary by variant (generated by `python -m experiments.results_table` from "
        f"`{results.as_posix()}/`):\n\n{summary_table(runs)}"
    )


#: How many final epochs the screening's "last epochs" figures average.
LAST_EPOCHS = 5
#: The runs every screening variant is compared with: ``baseline-seed<S>`` (scripts/screen.sh).
SCREEN_REFERENCE = "baseline"


def screen_name(run: Run) -> str:
    """``NAME`` of a screening run folder ``NAME-seed<S>``."""
    return run.name.rsplit("-seed", 1)[0]


def validation_figures(run: Run, prefix: str) -> dict[str, Any]:
    """A run's validation figures for the weights that ``prefix`` names (``""``: the run's model;
    ``"raw_"``: the raw weights beside a moving average): ``best`` (the highest validation
    accuracy of an epoch, the one the honest protocol selects), ``last`` (the mean over the
    :data:`LAST_EPOCHS` last epochs) and ``subjects`` (``{subject: mean over those epochs}``)."""
    accuracies = [line[f"{prefix}val_accuracy"] for line in run.history]
    last = run.history[-LAST_EPOCHS:]
    subjects = last[0].get(f"{prefix}val_subject_accuracy") or {}
    return {
        "best": max(accuracies),
        "last": statistics.fmean(accuracies[-LAST_EPOCHS:]),
        "subjects": {
            subject: statistics.fmean(
                line[f"{prefix}val_subject_accuracy"][subject] for line in last
            )
            for subject in subjects
        },
    }


def _config_changes(config: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``config`` that differ from ``reference``'s (what makes a variant)."""
    return {
        name: value
        for name, value in sorted(config.items())
        if name not in NOT_PART_OF_A_VARIANT and value != reference.get(name)
    }


def _compared_with(name: str, changes: dict[str, dict[str, Any]], reference: str) -> str:
    """The variant that ``name`` adds to: among the others whose changes ``name``'s include, the
    one with the most (``reference`` when it stacks on no other, or changes nothing); of two with
    as many, the one whose name begins ``name`` (``scale01-ls01`` adds label smoothing to
    ``scale01``)."""
    mine = changes[name].items()
    beneath = [
        other for other, theirs in changes.items() if other != name and theirs.items() < mine
    ]
    return max(
        beneath,
        key=lambda other: (len(changes[other]), name.startswith(f"{other}-")),
        default=reference,
    )


def _paired(values: dict[int, float], reference: dict[int, float]) -> str:
    """Mean of ``values`` over seeds, and its mean difference to ``reference`` over the seeds
    both have, with how many of them went up."""
    text = f"{statistics.fmean(values.values()):.4f}"
    seeds = sorted(set(values) & set(reference))
    if not seeds or values is reference:
        return text
    differences = [values[seed] - reference[seed] for seed in seeds]
    up = sum(difference > 0 for difference in differences)
    return f"{text} ({statistics.fmean(differences):+.4f}, {up}/{len(seeds)} up)"


def screen_tables(
    runs: Sequence[Run], results: pathlib.Path, reference: str = SCREEN_REFERENCE
) -> str:
    """The screening tables: per variant ``NAME``, the mean over its seeds of each validation
    figure of :func:`validation_figures`, for the run's model and, where the runs keep a moving
    average, for the raw weights, each with its mean difference (same seeds) to the variant it
    adds a part to (:func:`_compared_with`; ``reference`` unless it stacks on another variant);
    and the accuracy on each validation subject (mean over the last epochs)."""
    groups: dict[str, dict[int, Run]] = {}
    for run in runs:
        groups.setdefault(screen_name(run), {})[run.config["seed"]] = run
    if reference not in groups:
        raise SystemExit(f"error: no run folder {reference}-seed<S> under {results}")
    reference_config = next(iter(groups[reference].values())).config
    changes = {
        name: _config_changes(next(iter(members.values())).config, reference_config)
        for name, members in groups.items()
    }
    kinds = [("", "model")]
    if all("raw_val_accuracy" in run.history[0] for run in runs):
        kinds = [("raw_", "raw weights"), ("", "moving average")]
    figures = {
        (name, prefix): {seed: validation_figures(run, prefix) for seed, run in members.items()}
        for name, members in groups.items()
        for prefix, _ in kinds
    }
    header = "| variant | changes from the reference | compared with | seeds |"
    for _, label in kinds:
        header += f" best val acc, {label} | last {LAST_EPOCHS} epochs val acc, {label} |"
    lines = [header, "|---|---|---|---:|" + "---:|" * 2 * len(kinds)]
    for name, members in groups.items():
        base_name = name if name == reference else _compared_with(name, changes, reference)
        described = " ".join(f"{key}={value}" for key, value in changes[name].items())
        cells = [
            f"`{name}`",
            described or "(the reference)",
            "" if name == reference else f"`{base_name}`",
            " ".join(str(seed) for seed in sorted(members)),
        ]
        for prefix, _ in kinds:
            for key in ("best", "last"):
                values = {seed: f[key] for seed, f in figures[name, prefix].items()}
                base = {seed: f[key] for seed, f in figures[base_name, prefix].items()}
                cells.append(_paired(values, values if name == reference else base))
        lines.append("| " + " | ".join(cells) + " |")
    text = (
        f"Validation accuracy by variant (generated by `python -m experiments.results_table "
        f"--results {results.as_posix()} --write docs/recipe.md` from the run files there; mean "
        f"over the seeds, in brackets the mean difference to the variant it is compared with over "
        f"the same seeds and how many of them it raised; a variant is compared with the one it "
        f"adds a part to, `{reference}` unless it stacks on another):\n\n" + "\n".join(lines)
    )
    prefix, label = kinds[0]
    subjects = sorted(
        {
            s
            for (_, p), by_seed in figures.items()
            if p == prefix
            for f in by_seed.values()
            for s in f["subjects"]
        },
        key=int,
    )
    if subjects:
        rows = [
            "| variant | " + " | ".join(f"subject {subject}" for subject in subjects) + " |",
            "|---|" + "---:|" * len(subjects),
        ]
        for name in groups:
            by_subject = {
                subject: value
                for f in figures[name, prefix].values()
                for subject, value in f["subjects"].items()
            }
            rows.append(
                f"| `{name}` | "
                + " | ".join(f"{by_subject[s]:.3f}" if s in by_subject else "" for s in subjects)
                + " |"
            )
        text += (
            f"\n\nValidation accuracy on each validation subject ({label}; mean over the last "
            f"{LAST_EPOCHS} epochs of the seed that drew the subject):\n\n" + "\n".join(rows)
        )
    return text


#: What each section of a Markdown file holds: name → the text of ``(runs, results folder)``.
SECTIONS: dict[str, Callable[[Sequence[Run], pathlib.Path], str]] = {
    "results": tables,
    "results-summary": summary,
    "screen": screen_tables,
}


def markers(section: str) -> tuple[str, str]:
    """The start and end markers of ``section``: ``<!-- NAME:start -->``, ``<!-- NAME:end -->``."""
    return f"<!-- {section}:start -->", f"<!-- {section}:end -->"


def fill_sections(text: str, runs: Sequence[Run], results: pathlib.Path, where: str) -> str:
    """``text`` with what lies between the markers of each of its :data:`SECTIONS` replaced by
    that section's generated text; ``where`` names the file in errors.

    Raises:
        SystemExit: ``text`` has no section, or a start marker without its end.
    """
    found = False
    for section, make in SECTIONS.items():
        start_marker, end_marker = markers(section)
        start, end = text.find(start_marker), text.find(end_marker)
        if start < 0 and end < 0:
            continue
        if start < 0 or end < start:
            raise SystemExit(f"error: {where}: {start_marker} and {end_marker} do not match")
        found = True
        content = make(runs, results)
        text = text[: start + len(start_marker)] + "\n" + content + "\n" + text[end:]
    if not found:
        names = ", ".join(markers(section)[0] for section in SECTIONS)
        raise SystemExit(f"error: {where} has no results section (none of {names})")
    return text


def load_results(results: pathlib.Path) -> list[Run]:
    """The runs under ``results`` (:func:`load_runs`); SystemExit when there is none."""
    runs = load_runs(results)
    if not runs:
        raise SystemExit(f"error: no run folder with a report.json under {results}")
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1: ``--check`` found a difference)."""
    args = build_parser().parse_args(argv)
    results = pathlib.Path(args.results)
    runs = load_results(results)
    paths = [pathlib.Path(path) for path in args.write or args.check or ()]
    if not paths:
        print(tables(runs, results))
        return cli.OK
    stale = []
    for path in paths:
        text = path.read_text()
        updated = fill_sections(text, runs, results, str(path))
        if args.write:
            write_text_atomically(path, updated)
        elif updated != text:
            stale.append(str(path))
    if stale:
        return cli.report_error(
            f"{', '.join(stale)}: the results tables differ from {args.results}; regenerate them "
            "with --write",
            cli.FAILED,
        )
    return cli.OK


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = cli.command_parser("experiments.results_table", __doc__)
    parser.add_argument(
        "--results", default="results/uci_har", help="folder of run folders (default: %(default)s)"
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--write", nargs="+", metavar="MARKDOWN", help="fill the results sections of these files"
    )
    action.add_argument(
        "--check",
        nargs="+",
        metavar="MARKDOWN",
        help="exit 1 if the results sections of these files differ",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
