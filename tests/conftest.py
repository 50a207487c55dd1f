"""In CI (``CI`` set, where ``make test`` has installed everything: the test and demo extras, the JS
bundle, Debian's Chromium) a skipped test is a failure, unless its reason is one that no install can
remove: a missing CUDA device. Locally a skip says what is missing and the run goes on."""

from __future__ import annotations

import os

import pytest

#: the only skip reasons CI accepts
CI_SKIP_REASONS = ("needs a CUDA device",)


def _unexplained_ci_skip(report: pytest.TestReport | pytest.CollectReport) -> bool:
    return (bool(os.environ.get("CI")) and report.skipped and not hasattr(report, "wasxfail")
            and not any(reason in str(report.longrepr) for reason in CI_SKIP_REASONS))


def _fail(report: pytest.TestReport | pytest.CollectReport) -> None:
    report.longrepr = (f"skipped in CI, where `make test` installs everything the tests need: "
                       f"{report.longrepr}")
    report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if _unexplained_ci_skip(report):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    report = outcome.get_result()
    if _unexplained_ci_skip(report):
        _fail(report)
