"""Crash safety: a conversion killed at any point leaves no --out, and a re-run gives the
byte-identical output of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli, tree_hashes

ARGS = ("-q", "flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo", "--no-validate")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("clean") / "out"
    proc = run_cli(*ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return tree_hashes(out)


@pytest.mark.parametrize("point", ["after-plan", "tensor-1", "tensor-40", "before-rename"])
def test_sigkill_then_rerun_is_identical(point, tmp_path, clean_run):
    out = tmp_path / "out"
    killed = run_cli(*ARGS, "--out", str(out), env={"QCONVERT_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if ".qconvert-tmp-" in p.name]
    if point != "after-plan":
        assert leftovers, "the killed run should have been writing into a temporary sibling"
    again = run_cli(*ARGS, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert tree_hashes(out) == clean_run
    # the stale temporary of the killed run was cleaned, never mistaken for output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("point", ["after-plan", "tensor-20"])
def test_ctrl_c_leaves_nothing(point, tmp_path, tiny_path):
    """A real SIGINT mid-run (sent by the process to itself at a known point, so the test
    cannot race the conversion): exit 130, one line, no output and no temporary folder."""
    out = tmp_path / "out"
    env = dict(os.environ, QCONVERT_KILL_AT=point, QCONVERT_KILL_SIGNAL="INT")
    proc = subprocess.run([sys.executable, "-m", "qconvert.cli", *ARGS, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "interrupted" in proc.stderr
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_ctrl_c_at_a_random_moment_exits_130(tmp_path, tiny_path):
    """The same with a SIGINT from outside after a few seconds (importing or converting)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "qconvert.cli", *ARGS, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, QCONVERT_KILL_AT=""))
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # a machine fast enough to finish first: the output must be whole
        assert str(out) in stdout and (out / "qconvert.json").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        return
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert not out.exists()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("point", ["tensor-20", "before-rename"])
def test_ctrl_c_removes_the_parent_folders_the_command_created(point, tmp_path, tiny_path):
    """--out out/sub/x where out/ did not exist: after a Ctrl-C the command leaves no empty
    out/sub/ behind, and a folder that was there before (tmp_path, a file in it) is kept."""
    (tmp_path / "keep.txt").write_text("mine")
    out = tmp_path / "out" / "sub" / "x"
    env = dict(os.environ, QCONVERT_KILL_AT=point, QCONVERT_KILL_SIGNAL="INT")
    proc = subprocess.run([sys.executable, "-m", "qconvert.cli", *ARGS, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_parent_folders_that_hold_something_else_are_kept(tmp_path, tiny_path):
    """Only empty folders are removed: another file put in out/ meanwhile keeps it."""
    from qconvert.output import atomic_folder

    out = tmp_path / "out" / "x"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out, overwrite=False):
            (tmp_path / "out" / "other-run.txt").write_text("someone else's")
            raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other-run.txt"]
