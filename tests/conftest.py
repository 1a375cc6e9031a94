"""Test tiers: tests/unit (pure logic), tests/component (real local servers: docker-registry,
skopeo, containerd), tests/e2e (the real local cluster). Fixtures live in tests/fixtures/.

With IMAGEWARM_REQUIRE_E2E=1 (the README's test command and CI set it), a skipped test fails the
run, and so does a whole-suite run in which no end-to-end test passed: a skipped end-to-end test
is a missing feature, never a green run.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.fixtures.registries", "tests.fixtures.cluster", "tests.fixtures.controller"]


def _require_e2e() -> bool:
    return os.environ.get("IMAGEWARM_REQUIRE_E2E") == "1"


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Tests that start clusters of their own run first: once the session cluster is up it holds the
    machine lock until the session ends, and their Cluster.start would wait for it for ever."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)  # stable


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _require_e2e():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    whole_suite = not session.config.args or session.config.args == [str(session.config.rootpath / "tests")]
    e2e_passed = [r for r in reporter.stats.get("passed", []) if "e2e" in getattr(r, "keywords", {})]
    problems = []
    if skipped:
        problems.append(f"{len(skipped)} test(s) skipped: a skipped test is a missing feature")
    if whole_suite and not e2e_passed:
        problems.append("no end-to-end test passed: the e2e suite did not run")
    if problems:
        reporter.write_line("IMAGEWARM_REQUIRE_E2E: " + "; ".join(problems), red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
