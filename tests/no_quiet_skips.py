"""A pytest plugin: under CI (`CI=true`) a test that would be skipped fails instead, naming
what it was missing. A suite whose checks skip where a tool, a permission or a file is
absent would otherwise pass there without having checked anything; elsewhere the skips
stay skips, and `-rs` lists each one with its reason.

Loaded by scripts/test.sh with `-p no_quiet_skips` (tests/ on PYTHONPATH)."""

import os

import pytest


def _under_ci() -> bool:
    return os.environ.get("CI") == "true"


def _reason(longrepr) -> str:
    # A skip's longrepr is (file, line, "Skipped: reason").
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail(report) -> None:
    report.outcome = "failed"
    report.longrepr = (f"would have been skipped, and CI=true runs every test: "
                       f"{_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A module that skips itself as a whole does so while it is collected.
    outcome = yield
    report = outcome.get_result()
    if _under_ci() and report.skipped:
        _fail(report)
