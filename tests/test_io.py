"""The shared file helpers: the output rules, confined paths, signals, stale temporaries and the jsonl reader."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from steerkit._io import atomic_path, check_output, clean, confined, iter_jsonl, read_text, stale_temporaries

ROOT = Path(__file__).resolve().parents[1]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_leaves_nothing_on_failure_and_needs_force(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("old")
    with pytest.raises(FileExistsError, match="already exists; pass force=True"):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target, force=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and _listing(tmp_path) == ["out.txt"]  # the old output survives
    with atomic_path(target, force=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and _listing(tmp_path) == ["out.txt"]


def test_a_file_never_replaces_a_directory_nor_the_reverse(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="is a directory; the output is a file"):
        with atomic_path(results, force=True) as tmp:
            tmp.write_text("x")
    assert (results / "keep.txt").read_text() == "precious"
    single = tmp_path / "single.txt"
    single.write_text("precious")
    with pytest.raises(ValueError, match="is a file; the output is a directory"):
        check_output(single, force=True, directory=True)
    assert single.read_text() == "precious"


def test_inputs_and_folders_holding_them_are_never_replaced(tmp_path):
    work = tmp_path / "work"
    (work / "base").mkdir(parents=True)
    (work / "base" / "w.bin").write_text("weights")
    with pytest.raises(ValueError, match="is an input"):
        check_output(work / "base", force=True, inputs=[work / "base"], directory=True)
    with pytest.raises(ValueError, match="holds an input"):
        check_output(work, force=True, inputs=[work / "base"], directory=True)
    link = tmp_path / "link"
    link.symlink_to(work / "base")
    with pytest.raises(ValueError, match="an input"):  # the same folder under another name
        check_output(link, force=True, inputs=[work / "base"], directory=True)
    assert (work / "base" / "w.bin").read_text() == "weights"


def test_working_directory_home_and_root_are_protected(tmp_path, monkeypatch):
    cwd, home = tmp_path / "a" / "cwd", tmp_path / "b" / "home"
    cwd.mkdir(parents=True)
    home.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    for place, name in ((cwd, "is or holds the working directory"), (cwd.parent, "working"), (home, "home")):
        with pytest.raises(ValueError, match=name):
            check_output(place, force=True, directory=True)
    (tmp_path / "rootlink").symlink_to("/")
    with pytest.raises(ValueError, match="filesystem root"):
        check_output(tmp_path / "rootlink", force=True, directory=True)
    for nameless in ("/", ".", ".."):
        with pytest.raises(ValueError, match="names no file"):
            check_output(nameless, force=True, directory=True)
    assert cwd.is_dir() and home.is_dir()


def test_a_symlink_output_is_named_and_only_the_link_is_replaced(tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("precious")
    link = tmp_path / "out.txt"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="a symlink to"):
        check_output(link)
    with atomic_path(link, force=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "precious" and not link.is_symlink() and link.read_text() == "new"


_WRITER = """
import signal, sys, time
from steerkit._io import atomic_path
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell may have set SIGINT to ignore
with atomic_path(sys.argv[1], directory=True) as tmp:
    tmp.mkdir()
    (tmp / "part").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(60)
"""


def _start_writer(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"writing"
    return proc


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, -signal.SIGINT)])
def test_signals_remove_the_temporary(tmp_path, sig, code):
    proc = _start_writer(tmp_path / "out")
    assert any(".out.steerkit-tmp-" in name for name in _listing(tmp_path))
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == code
    assert _listing(tmp_path) == []


def test_a_killed_run_is_named_next_time_and_cleaned_with_one_call(tmp_path):
    proc = _start_writer(tmp_path / "out")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stale = stale_temporaries(tmp_path)
    assert len(stale) == 1 and stale[0].name.startswith(".out.steerkit-tmp-")
    with pytest.warns(UserWarning, match=r"steerkit clean"):
        check_output(tmp_path / "out", directory=True)
    (tmp_path / "mine.txt").write_text("not steerkit's")
    assert clean(tmp_path) == [(stale[0], "removed")]
    assert _listing(tmp_path) == ["mine.txt"]


def test_clean_restores_an_old_output_whose_replacement_never_arrived(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    old = tmp_path / f".out.steerkit-old-{dead}-abcd1234"
    old.mkdir()
    (old / "w").write_text("old weights")
    assert clean(tmp_path) == [(tmp_path / "out", "restored")]
    assert (tmp_path / "out" / "w").read_text() == "old weights"


def test_live_temporaries_of_another_process_are_left_alone(tmp_path):
    proc = _start_writer(tmp_path / "out")
    try:
        assert stale_temporaries(tmp_path) == [] and clean(tmp_path) == []
    finally:
        proc.kill()
        proc.wait()


def test_confined_names_stay_inside_their_folder(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "ok.safetensors").write_text("x")
    assert confined(root, "ok.safetensors") == root / "ok.safetensors"
    for bad in ("/etc/passwd", "../outside", "a/../../b", ""):
        with pytest.raises(ValueError, match="not a plain name inside"):
            confined(root, bad, "shard")
    (tmp_path / "secret").write_text("s")
    (root / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match="leads outside"):
        confined(root, "leak", "shard")
    # a Hugging Face cache snapshot links into its repository's blobs: allowed
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("w")
    snap = repo / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(repo / "blobs" / "abc")
    assert confined(snap, "model.safetensors").read_text() == "w"


def test_read_text_names_a_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8"):
        read_text(bad)
    with pytest.raises(ValueError, match=r"latin1\.jsonl:1: not UTF-8"):
        bad.rename(tmp_path / "latin1.jsonl")
        list(iter_jsonl(tmp_path / "latin1.jsonl", lambda row: row, "rows"))


def test_iter_jsonl_parses_skips_blank_lines_and_names_the_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(iter_jsonl(path, lambda row: row["a"], "an 'a'")) == [1, 2]
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: expected an 'a' \(got a JSON list\)"):
        list(iter_jsonl(path, lambda row: row["a"], "an 'a'"))
    path.write_text('{"a": 1}\n{"b": 1}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: expected an 'a'"):
        list(iter_jsonl(path, lambda row: row["a"], "an 'a'"))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: expected"):
        list(iter_jsonl(path, lambda row: row["a"], "an 'a'"))


def test_sigterm_handler_is_restored_after_writing(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with atomic_path(tmp_path / "x.txt") as tmp:
        assert signal.getsignal(signal.SIGTERM) is not before
        tmp.write_text("x")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_user_sigterm_handler_still_runs(tmp_path):
    code = textwrap.dedent(
        """
        import signal, sys, time
        from steerkit._io import atomic_path
        signal.signal(signal.SIGTERM, lambda s, f: print("user handler", flush=True))
        with atomic_path(sys.argv[1]) as tmp:
            tmp.write_text("x")
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "o")], stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"writing"
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert proc.stdout.read().strip() == b"user handler" and _listing(tmp_path) == []
