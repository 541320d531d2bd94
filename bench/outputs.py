"""Where the bench's reports go: a scratch folder by default, the committed ``bench/results/``
only when asked (``--update``), and then merged, so that what another toolchain measured stays.

    python -m bench.kernels_report            # $TMPDIR/ranktuner_bench/kernels.{md,json}
    python -m bench.kernels_report --update   # bench/results/kernels.{md,json}, merged

A report's rows each belong to one toolchain (``bench.kernels_report``: the Triton version;
``bench.compare``: the device, torch and Triton of the run, :func:`toolchain`). With
``--update`` the committed rows of the toolchains this run measured are replaced and the rows
of every other toolchain are kept (:func:`merge_rows`): a run with Triton 3.9 does not drop
the committed Triton 3.6 rows.
"""

from __future__ import annotations

import json
import os
import tempfile

#: the committed results (``--update``)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: where a report goes unless ``--out`` or ``--update`` is given
SCRATCH = os.path.join(tempfile.gettempdir(), "ranktuner_bench")


def add_arguments(ap, what: str = "output folder"):
    """``--out`` and ``--update`` on the argparse parser ``ap`` (``what``: what ``--out`` names)."""
    ap.add_argument("--out", default=None, help=f"{what} (default: under the scratch folder {SCRATCH}; with "
                                                "--update, under the committed bench/results/)")
    ap.add_argument("--update", action="store_true",
                    help="write into the committed bench/results/, merging: this toolchain's rows are replaced, "
                         "other toolchains' rows are kept")


def destination(ap, args, name: str = "") -> str:
    """The path a report writes: ``args.out`` as given; else ``name`` under :data:`RESULTS`
    with ``args.update``, under :data:`SCRATCH` without (the folder itself when ``name`` is
    empty). ``--out`` with ``--update`` is refused (``ap.error``)."""
    if args.update and args.out is not None:
        ap.error("--update writes into the committed bench/results/: not with --out")
    if args.out is not None:
        return args.out
    folder = RESULTS if args.update else SCRATCH
    return os.path.join(folder, name) if name else folder


def read_json(path: str):
    """The JSON object at ``path``, or None when there is no such file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def merge_rows(committed: list, new: list, toolchain_of) -> list:
    """The rows of a report that replaces one with rows ``committed``: the committed rows of
    every toolchain (``toolchain_of(row)``) that ``new`` has no row of, then ``new``."""
    measured = {toolchain_of(r) for r in new}
    return [r for r in committed if toolchain_of(r) not in measured] + list(new)


def toolchain(env: dict) -> str:
    """A run's toolchain, from its environment (``device``, ``torch``, ``triton``)."""
    return f"{env.get('device', '?')}, torch {env.get('torch', '?')}, Triton {env.get('triton', '?')}"
