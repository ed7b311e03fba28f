"""The documentation runs: every Python block of every page of ``docs/`` (and of the README), in order, in one
fresh interpreter per page, in an empty folder, offline; a block that cannot run here says why on its first line
(``# not run: ...``). The site itself is built with ``mkdocs build --strict`` by ``make docs``."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md"), key=lambda p: str(p)) + [ROOT / "README.md"]
PAGES = [p for p in PAGES if "artifacts" not in p.relative_to(ROOT).parts]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
NOT_RUN = "# not run:"


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def runnable(page: Path) -> str:
    return "\n".join(b for b in blocks(page) if not b.startswith(NOT_RUN))


def test_pages_have_code_and_every_skip_gives_a_reason():
    assert any(runnable(p) for p in PAGES)
    for page in PAGES:
        for block in blocks(page):
            if block.startswith(NOT_RUN):
                reason = block.splitlines()[0].removeprefix(NOT_RUN).strip()
                assert len(reason) > 10, f"{page.name}: a skipped block must say why it cannot run here"


def test_the_readme_is_short_and_shows_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 10_000 and "make demo" in readme and "make test" in readme
    example = blocks(ROOT / "README.md")[0]
    assert len(example.strip().splitlines()) <= 15


@pytest.mark.slow
@pytest.mark.docs_pages
@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_of_each_page_runs(page, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", runnable(page)], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, f"{page}:\n{result.stderr[-3000:]}"
