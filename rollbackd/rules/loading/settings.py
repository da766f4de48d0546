"""The ``settings:`` section: global switches, event-time limits, caps and the notifier."""

from __future__ import annotations

import datetime as dt
import re
from types import MappingProxyType
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode

from rollbackd.rules.loading.backends import BackendReader
from rollbackd.rules.loading.extras import missing_extra
from rollbackd.rules.loading.reader import INVALID, Check, NodeReader, kind, sub
from rollbackd.rules.model import LABEL_NAME, SEVERITIES, DigestSpec, NotifierSpec, RouteMatch, RouteSpec, Settings


_YEAR_10000 = 253_402_300_800.0  # 10000-01-01T00:00:00Z in Unix seconds
_CAPS = ("max_deployments", "max_variants_per_deployment", "max_features_per_deployment")


class SettingsReader:
    def __init__(self, read: NodeReader) -> None:
        self.read = read
        self.backends = BackendReader(read)

    def settings(self, node: Node) -> Settings:
        keys = (
            "dry_run",
            "lateness",
            "join_horizon",
            "max_pending_labels",
            "max_event_bytes",
            "max_future_skew",
            "min_event_time",
            *_CAPS,
            "notifier",
            "notifiers",
        )
        read = self.read
        pairs = read.mapping(node, "settings", keys)
        if not pairs:
            return Settings()
        kw: dict[str, Any] = {}
        read.optional(pairs, "settings", kw, "dry_run", read.boolean)
        read.optional(pairs, "settings", kw, "lateness", read.duration)
        read.optional(pairs, "settings", kw, "join_horizon", read.positive_duration)
        read.optional(pairs, "settings", kw, "max_pending_labels", read.count)
        read.optional(pairs, "settings", kw, "max_event_bytes", read.count)
        read.optional(pairs, "settings", kw, "max_future_skew", read.positive_duration)
        read.optional(pairs, "settings", kw, "min_event_time", self.event_time)
        for cap in _CAPS:
            read.optional(pairs, "settings", kw, cap, read.count)
        if "notifier" in pairs:
            notifier = self.notifier(pairs["notifier"][1], "settings.notifier")
            if notifier is not None:
                kw["notifier"] = notifier
        if "notifiers" in pairs:
            if "notifier" in pairs:
                read.error(pairs["notifiers"][0], "settings.notifiers",
                           "set either `notifier` (one) or `notifiers` (several, routed), not both")
            routes = self.routes(pairs["notifiers"][1], "settings.notifiers")
            if routes is not None:
                kw["notifiers"] = routes
        return Settings(**kw)

    def routes(self, node: Node, path: str) -> tuple[RouteSpec, ...] | None:
        """``settings.notifiers``: a list of notifiers, each with a ``match``."""
        read = self.read
        items = read.sequence(node, path)
        if items is None:
            return None
        if not items:
            read.error(node, path, "must not be empty (leave the key out instead)")
            return None
        out: list[RouteSpec] = []
        catch_all = False
        for i, item in enumerate(items):
            where = f"{path}[{i}]"
            match: Any = RouteMatch()
            if not isinstance(item, MappingNode):
                read.error(item, where, f"expected a mapping with a `type`, got {kind(item)}")
                continue
            # `match` is the route's, not one of the notifier's options
            own = [(k, v) for k, v in item.value if isinstance(k, ScalarNode) and k.value == "match"]
            item = MappingNode(item.tag, [(k, v) for k, v in item.value if (k, v) not in own],
                               item.start_mark, item.end_mark, item.flow_style)
            if own:
                match = self.match(own[0][1], sub(where, "match"))
            spec = self.notifier(item, where, route=True)
            if spec is None or match is INVALID:
                continue
            catch_all |= match.everything and match.deployments is None
            out.append(RouteSpec(spec, match))
        if len(out) == len(items) and not catch_all:
            read.warn(node, path, "no route matches every notice: notices about rollbackd itself (blind, "
                      "queue full) and digests go nowhere; add a route without `match` (e.g. slack)")
        return tuple(out) if len(out) == len(items) else None

    def match(self, node: Node, path: str) -> Any:
        """``{severities: [critical], escalation: true, deployments: [fraud-*]}``."""
        read = self.read
        pairs = read.mapping(node, path, ("severities", "escalation", "deployments"))
        if pairs is None:
            return INVALID
        kw: dict[str, Any] = {}
        failed = False
        for key, check in (
            ("severities", lambda n, p: read.strings(n, p, choices=SEVERITIES, non_empty=True)),
            ("escalation", read.boolean),
            ("deployments", lambda n, p: read.strings(n, p, non_empty=True)),
        ):
            failed |= read.optional(pairs, path, kw, key, check) is INVALID
        if failed:
            return INVALID
        if not kw.get("severities") and not kw.get("escalation") and "deployments" not in kw and pairs:
            return read.error(node, path, "matches nothing: give `severities`, `escalation: true` or both")
        return RouteMatch(**kw)

    def event_time(self, node: Node, path: str) -> Any:
        """A point in time: RFC 3339 (``2000-01-01T00:00:00Z``, quoted or not) or Unix seconds,
        between 1970 and 9999 (what the event contract can carry)."""
        read = self.read
        value = read.construct(node, path) if isinstance(node, ScalarNode) else None
        if value is INVALID:
            return INVALID
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day)
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value.strip().replace("z", "Z").replace("Z", "+00:00"))
            except ValueError:
                return read.error(
                    node, path, f"expected an RFC 3339 time (2000-01-01T00:00:00Z) or Unix seconds, got {value!r}"
                )
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:  # YAML reads an unquoted ...Z time as naive UTC
                value = value.replace(tzinfo=dt.timezone.utc)
            value = value.timestamp()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return read.error(
                node, path, f"expected an RFC 3339 time (2000-01-01T00:00:00Z) or Unix seconds, got {kind(node)}"
            )
        if not 0 <= value < _YEAR_10000:
            return read.error(node, path, f"must be between 1970 and 9999, got {value}")
        return float(value)

    def notifier(self, node: Node, path: str, route: bool = False) -> NotifierSpec | None:
        read = self.read
        # retry and headers read as the webhook backend's do
        paging_common = {"timeout": read.positive_duration, "retry": self.backends.retry}
        # The option names are those ``actions.factory.make_notifier`` reads; the types are
        # ``rules.model.NOTIFIER_TYPES``.
        schema: dict[str, dict[str, Check]] = {
            "console": {"color": read.boolean, "digest": self.digest},
            "none": {},
            "slack": {
                "channel": read.string,
                "token_env": read.string,
                "base_url": read.url,
                "timeout": read.positive_duration,
                "max_rate_limit_retries": lambda n, p: read.number(n, p, integer=True, ge=0),
                "digest": self.digest,
            },
            "alertmanager": {
                "url": read.url,
                "resend_interval": read.duration,
                "labels": self.labels,
                "generator_url": read.url,
                "token_env": read.string,
                **paging_common,
            },
            "pagerduty": {
                "routing_key_env": read.string,
                "url": read.url,
                "source": read.string,
                "client_url": read.url,
                **paging_common,
            },
            "opsgenie": {
                "api_key_env": read.string,
                "url": read.url,
                "responders": self.responders,
                "tags": lambda n, p: read.strings(n, p, non_empty=True),
                **paging_common,
            },
            "webhook": {
                "url": read.url,
                "secret_env": read.string,
                "headers": self.backends.headers,
                **paging_common,
            },
        }
        if route:  # a route has no digest of its own: the digest is settings.notifier's
            schema = {name: {k: v for k, v in opts.items() if k != "digest"} for name, opts in schema.items()}
        required = {"slack": ("channel",), "alertmanager": ("url",), "webhook": ("url",)}
        typed = read.typed_options(node, path, schema, "console", required)
        if typed is None:
            return None
        notifier_type, options = typed
        missing = missing_extra("notifier", notifier_type)
        if missing is not None:
            read.error(node, sub(path, "type"), missing)
            return None
        digest = options.pop("digest", None)  # the notifier's schedule, not one of its options
        return NotifierSpec(type=notifier_type, options=MappingProxyType(options), digest=digest)

    def labels(self, node: Node, path: str) -> Any:
        """Alertmanager labels: a mapping of Prometheus label names to strings."""
        labels = self.backends.string_mapping(node, path, "label name to value")
        if labels is INVALID:
            return INVALID
        bad = [name for name in labels if not LABEL_NAME.match(name)]
        if bad:
            return self.read.error(node, sub(path, bad[0]), f"{bad[0]!r} is not a label name ([A-Za-z_][A-Za-z0-9_]*)")
        return labels

    def responders(self, node: Node, path: str) -> Any:
        """Opsgenie responders: ``[{type: team, name: ml-oncall}, {type: user, username: ...}]``."""
        read = self.read
        items = read.sequence(node, path)
        if items is None:
            return INVALID
        out = []
        for i, item in enumerate(items):
            where = f"{path}[{i}]"
            pairs = read.mapping(item, where, ("type", "id", "name", "username"))
            if pairs is None:
                return INVALID
            entry: dict[str, Any] = {}
            read.optional(pairs, where, entry, "type", lambda n, p: read.string(
                n, p, choices=("team", "user", "escalation", "schedule")))
            for key in ("id", "name", "username"):
                read.optional(pairs, where, entry, key, read.string)
            if "type" not in entry or len(entry) < 2:
                return read.error(item, where, "a responder needs `type` and one of `id`, `name`, `username`")
            out.append(MappingProxyType(entry))
        return tuple(out)

    def digest(self, node: Node, path: str) -> Any:
        """``"0 9 * * *"`` (UTC) or ``{cron: "0 9 * * *", timezone: Europe/Berlin}``."""
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        from apscheduler.triggers.cron import CronTrigger

        read = self.read
        if isinstance(node, ScalarNode):
            cron_node, tz_node, pairs = node, None, None
        else:
            pairs = read.mapping(node, path, ("cron", "timezone"))
            if pairs is None:
                return INVALID
            if "cron" not in pairs:
                return read.error(node, path, 'missing `cron`: a 5-field cron expression, e.g. "0 9 * * *"')
            cron_node, tz_node = pairs["cron"][1], pairs.get("timezone", (None, None))[1]
        cron_path = path if pairs is None else sub(path, "cron")
        cron = read.string(cron_node, cron_path)
        tz_name = "UTC" if tz_node is None else read.string(tz_node, sub(path, "timezone"))
        if INVALID in (cron, tz_name):
            return INVALID
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            return read.error(tz_node, sub(path, "timezone"),
                              f"unknown time zone {tz_name!r} (an IANA name such as UTC or Europe/Berlin)")
        try:
            CronTrigger.from_crontab(cron, timezone=tz)
        except ValueError as exc:
            return read.error(cron_node, cron_path, f"not a cron expression (minute hour day month weekday): {exc}")
        weekday = cron.split()[4]
        if re.search(r"\d", weekday):
            read.warn(cron_node, cron_path, f"weekday {weekday!r}: numbers count from 0 = Monday here "
                      "(APScheduler), not from 0 = Sunday as in crontab; names (mon-fri, sun) are unambiguous")
        return DigestSpec(cron=cron, timezone=tz_name)
