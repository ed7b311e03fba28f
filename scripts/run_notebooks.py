"""Execute the notebooks on the embedded model and commit-ready: outputs (figures included) written in place.

    .venv/bin/python scripts/run_notebooks.py            # full settings (about 10 minutes on 2 CPU cores)
    .venv/bin/python scripts/run_notebooks.py --small    # the test suite's settings (STEERKIT_NB_SMALL=1)

Each notebook is written atomically only after it ran without an error, so a failure leaves it as it was.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steerkit._io import write_text  # noqa: E402


def run(path: Path, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small settings, as the test suite runs them")
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.small:
        os.environ.update(STEERKIT_NB_SMALL="1", STEERKIT_NB_STEPS="5")
    paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in [p for p in paths if not args.names or p.stem in args.names]:
        start = time.perf_counter()
        nb = run(path, ROOT / "notebooks")
        write_text(nbformat.writes(nb) + "\n", path, force=True)  # the notebook's own file, rewritten
        images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
        print(f"{path.name}: {time.perf_counter() - start:.0f} s, {images} figure(s)")


if __name__ == "__main__":
    main()
