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
