"""Draws the LARNN positional encoding (docs/model.md §1) like the paper's Fig. 4.

python -m experiments.plot_positional_encoding --window-size 128 --out docs/positional_encoding.png
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments import cli
from larnn_jax import positional_encoding


def plot(window_size: int, out: pathlib.Path) -> pathlib.Path:
    """Writes a heat map of ``positional_encoding(window_size)`` (positions × features) to ``out``."""
    table = positional_encoding(window_size)  # (k, 2b)
    figure, axes = plt.subplots(figsize=(10, 4))
    image = axes.imshow(
        table.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest"
    )
    half = table.shape[1] // 2
    axes.axhline(half - 0.5, color="black", linewidth=0.8)
    axes.set_yticks([half / 2 - 0.5, half + half / 2 - 0.5], ["cos", "sin"])
    axes.set_xlabel(f"window position p (1 = most recent … {window_size} = oldest)")
    axes.set_xticks(range(0, window_size, max(1, window_size // 8)))
    axes.set_xticklabels([str(p + 1) for p in range(0, window_size, max(1, window_size // 8))])
    axes.set_title(
        f"LARNN positional encoding, window k = {window_size}: {table.shape[1]} features"
    )
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = cli.command_parser("experiments.plot_positional_encoding", __doc__)
    parser.add_argument(
        "--window-size",
        "--window",
        type=int,
        default=128,
        help="window size k (default 128, as Fig. 4)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("docs/positional_encoding.png"),
        help="PNG to write",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    print(plot(args.window_size, args.out))
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
