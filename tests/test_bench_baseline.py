"""``python -m bench --baseline REF``: the daemon of another commit, taken with ``git archive``
(bench/README.md). Only the taking is tested here: the bench itself is never run by the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import Baseline

ROOT = Path(__file__).resolve().parent.parent


def test_a_ref_with_a_slash_is_taken(tmp_path: Path) -> None:
    """``origin/main``, ``feature/x``: the directory is named by the commit, not by the ref."""
    ref = subprocess.run(
        ["git", "-C", str(ROOT), "for-each-ref", "--count=1", "--format=%(refname)", "refs/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not ref:
        pytest.skip("a checkout without any ref")
    baseline = Baseline.extract(ref, tmp_path)
    assert (baseline.source / "proxy" / "cli.py").is_file()
    assert baseline.target == f"atlasburn-proxy@{ref}"
    assert Baseline.extract(ref, tmp_path) == baseline  # taken once


def test_a_ref_that_names_no_commit_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--baseline no-such-ref: no such commit"):
        Baseline.extract("no-such-ref", tmp_path)
    assert_refused("--baseline no-such-ref: no such commit", "no-such-ref")


def test_one_commit_named_twice_is_refused() -> None:
    """Two refs of one commit shared a state directory, a config file and an ingest process
    (left running): refused before anything starts."""
    assert_refused("--baseline: HEAD~0 and HEAD name one commit", "HEAD", "HEAD~0")


def assert_refused(message: str, *refs: str) -> None:
    """``python -m bench --only chat-c1 --baseline REFS`` ends at once with exit code 1 and
    ``message``, without a traceback and before any table."""
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "chat-c1", "--baseline", *refs],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert message in run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
