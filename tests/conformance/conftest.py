"""The conformance suite's shared set-up: the vectors, the requests and the hooks reference, built once."""

import os
from pathlib import Path

import appliers  # (this folder's helper module: pytest puts the folder on sys.path)
import pytest


@pytest.fixture(scope="session")
def suite(smollm, tmp_path_factory):
    """(model, tok, vector folder, vectors, requests, hooks reference rows)."""
    model, tok = smollm
    folder = tmp_path_factory.mktemp("conformance-vectors")
    vecs = appliers.vectors(folder)
    reqs = appliers.requests(tok)
    assert appliers.CASES["steering"][0] == [], "the first steering setting is the unsteered one"
    refs = [appliers.hooks(model, vecs, r["ids"], r["steering"]) for r in reqs]
    return model, tok, folder, vecs, reqs, refs


def pytest_sessionfinish(session, exitstatus):
    """With STEERKIT_CONFORMANCE_TABLE=PATH (``make conformance``), write the agreement table there."""
    path = os.environ.get("STEERKIT_CONFORMANCE_TABLE")
    if path and appliers.TABLE:
        from steerkit._io import atomic_path

        with atomic_path(Path(path), force=True) as tmp:
            Path(tmp).write_text(appliers.table_markdown())
