"""Test-run policy shared by every test module.

The default run must fit CI (2 cores, 15 minutes), so the slowest variants of a behaviour
that a cheaper test already covers are marked ``long`` and run only when
``DISTCKPT_LONG_TESTS=1`` is set (the long run the README describes).
"""

from __future__ import annotations

import os

import pytest

LONG_RUN = os.environ.get("DISTCKPT_LONG_TESTS", "") not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG_RUN:
        return
    skip = pytest.mark.skip(reason="long variant: set DISTCKPT_LONG_TESTS=1 to run it")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS) for the whole run, started on first use and stopped by
    its process id at the end; skips, saying why, only where it cannot start."""
    from tests import s3server

    try:
        server = s3server.start(str(tmp_path_factory.mktemp("seaweedfs")))
    except s3server.ServerUnavailable as exc:
        pytest.skip(f"no S3 server (SeaweedFS) could start here: {exc}")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch):
    """The AWS variables pointing at the test server, set for this test; returns it."""
    from distckpt.storage import lease

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    yield s3_server
    lease.release_all()  # leases this test's saves took, while the server still answers
