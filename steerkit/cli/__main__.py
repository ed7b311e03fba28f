"""``python -m steerkit.cli``: the command line (as ``steerkit``)."""

from steerkit.cli import main

main()
