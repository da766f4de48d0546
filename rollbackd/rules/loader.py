"""Load the rules file into :class:`~rollbackd.rules.model.Config`, reporting every problem at once.

The file is composed (not constructed) with PyYAML's safe loader, so each value still carries
its line and column while we check it; like Prometheus' ``rulefmt``, a user who runs
``rollbackd validate`` sees every error in one go, each with its place, instead of fixing
them one by one. Values are checked against the schema, then against each other
(rule → deployment references, hysteresis, ``k <= n``, detector names and parameters).

This module is the public entry; the reading itself is in ``rules/loading/``, one module per
section of the file (``settings``, ``deployments``, ``rules``, ...) on a shared ``NodeReader``.
"""

from __future__ import annotations

import os
from pathlib import Path

# The schema's lists of allowed values are importable from here with the entry points.
from rollbackd.rules.loading.backends import COMMAND_PLACEHOLDERS, KUBERNETES_KINDS  # noqa: F401
from rollbackd.rules.loading.detector_check import FALLBACK_DETECTORS, known_detectors
from rollbackd.rules.loading.document import SUPPORTED_VERSIONS, DocumentReader  # noqa: F401
from rollbackd.rules.loading.reader import ConfigIssue
from rollbackd.rules.loading.rules import DIRECTIONS  # noqa: F401
from rollbackd.rules.loading.summary import summarize
from rollbackd.rules.model import BACKEND_TYPES, GROUP_LABELS, NOTIFIER_TYPES, Config
from rollbackd.rules.parse import RulesFileError, read_rules_file

__all__ = [
    "ConfigIssue",
    "ConfigError",
    "load_config",
    "load_config_text",
    "check_file",
    "check_text",
    "validate_file",
    "summarize",
    "known_detectors",
    "FALLBACK_DETECTORS",
    "BACKEND_TYPES",
    "NOTIFIER_TYPES",
    "GROUP_LABELS",
]


class ConfigError(ValueError):
    """The rules file is invalid; ``errors`` holds every problem found, in file order."""

    def __init__(self, errors: list[ConfigIssue], source: str = "<string>") -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return "\n".join(issue.format(self.source) for issue in self.errors)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Load and validate the rules file at ``path``; :class:`ConfigError` lists every error."""
    config, issues = check_file(path)
    errors = [i for i in issues if i.severity == "error"]
    if errors or config is None:
        raise ConfigError(errors, str(path))
    return config


def load_config_text(
    text: str, source: str = "<string>", *, base_dir: str | os.PathLike[str] | None = None
) -> Config:
    """Like :func:`load_config` for text already read; ``source`` names it in messages.

    Relative ``reference`` paths resolve against ``base_dir``, else against ``source``'s folder
    when ``source`` is a path, else they are kept as written.
    """
    config, issues = check_text(text, source, base_dir=base_dir)
    errors = [i for i in issues if i.severity == "error"]
    if errors or config is None:
        raise ConfigError(errors, source)
    return config


def check_file(path: str | os.PathLike[str]) -> tuple[Config | None, list[ConfigIssue]]:
    """Every issue (errors and warnings) in the file, and the config when there was no error."""
    try:
        text = read_rules_file(path)
    except RulesFileError as exc:
        return None, [ConfigIssue("", exc.line, exc.column, f"cannot read the rules file: {exc.message}")]
    except OSError as exc:
        return None, [ConfigIssue("", 0, 0, f"cannot read the rules file: {exc.strerror or exc}")]
    return check_text(text, str(path), base_dir=Path(path).parent)


def check_text(
    text: str, source: str = "<string>", *, base_dir: str | os.PathLike[str] | None = None
) -> tuple[Config | None, list[ConfigIssue]]:
    """Every issue in ``text``, and the config when there was no error (warnings allowed)."""
    if base_dir is None and not source.startswith("<"):
        base_dir = Path(source).parent
    document = DocumentReader(None if base_dir is None else Path(base_dir))
    config = document.load(text, source)
    issues = sorted(document.read.issues, key=lambda i: (i.line, i.column))
    if any(i.severity == "error" for i in issues):
        return None, issues
    return config, issues


def validate_file(path: str | os.PathLike[str]) -> list[ConfigIssue]:
    """Every issue in the file; the file is usable when none has ``severity == "error"``."""
    return check_file(path)[1]
