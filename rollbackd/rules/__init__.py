"""Rules: the rules-file schema (``model``), its loader and checks, and the alert state machine."""

from rollbackd.rules.alerts import Alert, AlertState, Transition, alert_id, step, verdict
from rollbackd.rules.durations import format_duration, parse_duration
from rollbackd.rules.loader import (
    ConfigError,
    ConfigIssue,
    check_file,
    check_text,
    known_detectors,
    load_config,
    load_config_text,
    summarize,
    validate_file,
)
from rollbackd.rules.model import (
    BackendSpec,
    Config,
    DeploymentSpec,
    GroupingSpec,
    NotifierSpec,
    RuleSpec,
    Settings,
    WindowSpec,
)

__all__ = [
    "Alert",
    "AlertState",
    "Transition",
    "alert_id",
    "step",
    "verdict",
    "parse_duration",
    "format_duration",
    "ConfigError",
    "ConfigIssue",
    "check_file",
    "check_text",
    "known_detectors",
    "load_config",
    "load_config_text",
    "summarize",
    "validate_file",
    "BackendSpec",
    "Config",
    "DeploymentSpec",
    "GroupingSpec",
    "NotifierSpec",
    "RuleSpec",
    "Settings",
    "WindowSpec",
]
