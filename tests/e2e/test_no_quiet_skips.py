"""The suite's plugin `no_quiet_skips` (tests/no_quiet_skips.py): under CI=true a test that
skips, or a module that skips itself, fails and says what it missed; elsewhere they stay
skips, listed with their reasons by `-rs`."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

SKIPPING = '''
import pytest

def test_needs_a_tool():
    pytest.skip("needs frobnicate")

@pytest.mark.skipif(True, reason="needs root")
def test_needs_root():
    pass

@pytest.mark.xfail(reason="a known bug", run=False)
def test_known_bug():
    pass

def test_runs():
    pass
'''

SKIPPING_MODULE = '''
import pytest
pytest.skip("needs a GPU", allow_module_level=True)
'''


def run_pytest(directory: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(TESTS)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no_quiet_skips",
         "-p", "no:cacheprovider", str(directory)],
        capture_output=True, text=True, timeout=120, env=env, cwd=directory)


def suite(tmp_path: Path, source: str) -> Path:
    (tmp_path / "test_suite.py").write_text(source)
    return tmp_path


def test_under_ci_every_skipped_test_fails_naming_what_was_missing(tmp_path):
    result = run_pytest(suite(tmp_path, SKIPPING), "true")
    assert result.returncode == 1, result.stdout
    for missing in ("needs frobnicate", "needs root"):
        assert missing in result.stdout, result.stdout
    assert "CI=true runs every test" in result.stdout
    # A skip in the call fails the test, a skip mark fails its setup; the test that runs
    # passes; an expected failure stays one.
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in result.stdout, result.stdout


def test_under_ci_a_module_that_skips_itself_fails_the_run(tmp_path):
    result = run_pytest(suite(tmp_path, SKIPPING_MODULE), "true")
    assert result.returncode == 2, result.stdout  # interrupted: an error while collecting
    assert "CI=true runs every test: Skipped: needs a GPU" in result.stdout, result.stdout


def test_elsewhere_skips_stay_skips_and_are_listed(tmp_path):
    for source, counts in ((SKIPPING, "1 passed, 2 skipped, 1 xfailed"),
                           (SKIPPING_MODULE, "1 skipped")):
        directory = tmp_path / str(len(source))
        directory.mkdir()
        result = run_pytest(suite(directory, source), None)
        # 5: pytest ran no test (the module skipped itself whole).
        assert result.returncode in (0, 5), result.stdout
        assert counts in result.stdout, result.stdout
        assert "SKIPPED" in result.stdout, result.stdout
