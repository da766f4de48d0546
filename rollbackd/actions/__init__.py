"""Rollback backends and notifiers: one small protocol each, chosen by name from the config."""

from rollbackd.actions.base import (
    ActionResult,
    AlertSummary,
    Notice,
    Notifier,
    NullNotifier,
    PausableBackend,
    RollbackBackend,
    RollbackPlan,
    Verification,
    ObservableBackend,
    current_version,
    pause_rollout,
    verify_plan,
)
from rollbackd.actions.alertmanager import AlertmanagerNotifier
from rollbackd.actions.command import CommandBackend
from rollbackd.actions.console import ConsoleNotifier, format_notice
from rollbackd.actions.factory import BACKEND_TYPES, NOTIFIER_TYPES, make_backend, make_notifier, make_notifiers
from rollbackd.actions.kubernetes import KubernetesBackend
from rollbackd.actions.logbackend import LogBackend
from rollbackd.actions.mlflow import MlflowRegistryBackend
from rollbackd.actions.noticehook import WebhookNotifier, verify_notice
from rollbackd.actions.opsgenie import OpsgenieNotifier
from rollbackd.actions.pagerduty import PagerDutyNotifier
from rollbackd.actions.retry import RetryPolicy, classify
from rollbackd.actions.routing import NoticeRouter, Route
from rollbackd.actions.slack import SlackNotifier, build_blocks
from rollbackd.actions.trafficfile import TrafficFileBackend
from rollbackd.actions.webhook import WebhookBackend, verify_signature

__all__ = [
    "ActionResult",
    "AlertSummary",
    "Notice",
    "Notifier",
    "NullNotifier",
    "RollbackBackend",
    "RollbackPlan",
    "Verification",
    "ObservableBackend",
    "PausableBackend",
    "current_version",
    "pause_rollout",
    "verify_plan",
    "CommandBackend",
    "KubernetesBackend",
    "MlflowRegistryBackend",
    "TrafficFileBackend",
    "ConsoleNotifier",
    "format_notice",
    "BACKEND_TYPES",
    "NOTIFIER_TYPES",
    "make_backend",
    "make_notifier",
    "make_notifiers",
    "AlertmanagerNotifier",
    "PagerDutyNotifier",
    "OpsgenieNotifier",
    "WebhookNotifier",
    "verify_notice",
    "NoticeRouter",
    "Route",
    "LogBackend",
    "RetryPolicy",
    "classify",
    "SlackNotifier",
    "build_blocks",
    "WebhookBackend",
    "verify_signature",
]
