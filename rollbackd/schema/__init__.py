"""The event contract as JSON Schema (draft 2020-12), shipped as package data."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["EVENT_SCHEMA_FILE", "event_schema"]

EVENT_SCHEMA_FILE = "event-contract-v1.json"


def event_schema() -> dict[str, Any]:
    """The parsed JSON Schema of event contract v1 (a fresh dict on each call)."""
    text = resources.files(__name__).joinpath(EVENT_SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)
