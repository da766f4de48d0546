"""What a test does when a tool it needs is missing: locally it skips with the reason; under CI
(``CI=true``), where ``.ci/run`` installs every tool, it fails, so no test is skipped there
unnoticed."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(why: str) -> NoReturn:
    """Skip (locally) or fail (under CI) the calling test, saying ``why``."""
    if in_ci():
        pytest.fail(why, pytrace=False)
    pytest.skip(why)
