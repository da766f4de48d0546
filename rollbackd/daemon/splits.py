"""Judging a window by its parts: the versions that served it, the slices of its traffic.

A window of one deployment × variant can hold more than one model version (a rolling update,
a blue-green overlap, labels arriving for the version that served before). Judged whole, a
failing new version is diluted by the healthy old one and the incident names whichever
served most. So the pipeline also measures each version's *share* of such a window — with a
probe, a copy of the rule's detector as it was before the window, fed only that share — and
:func:`judge_versions` decides which measurement steps the alert: a share that breaches (the
version is named in the evidence, and the rollback moves away from it), else the whole window.
The shares' p-values are Holm-adjusted (:func:`adjust_parts`): two versions are not two chances
of a false alarm.

A rule with ``slice_by`` is evaluated per slice instead (one detector per slice, so each keeps
its own history: a region's drift reference is that region's). :func:`slice_windows` cuts the
largest ``slice_top_k`` slices of a window and pools the rest as "other";
:func:`adjust_parts` corrects their p-values for multiplicity (Holm) and :func:`judge_slices`
picks the slice that steps the rule's one alert, naming the breaching slices and the rest's
value in the evidence.

Pure: no clock, no I/O; the same window gives the same parts in the same order.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from rollbackd.detectors.base import Labeled, Measurement, Window
from rollbackd.detectors.stats import adjust_pvalues
from rollbackd.events import Prediction
from rollbackd.rules.alerts import Alert, AlertState, verdict
from rollbackd.rules.model import RuleSpec

__all__ = [
    "OTHER", "VERSION_SHARE", "VERSION_SHARES", "mixed", "version_shares", "judge_versions", "blamed_version", "mixed_unattributed", "where",
    "slice_of", "slice_paths", "slice_windows", "adjust_parts", "judge_slices",
]

# The slice that pools every value beyond a rule's slice_top_k.
OTHER = "other"
# The slice of a label whose prediction was buffered before its rule sliced labels (a
# checkpoint of an older configuration).
UNKNOWN = "(unknown)"
# The evidence keys a split adds (a detector's own ``version`` evidence is another thing: the
# version it judged): the version whose share stepped the alert, and each share's value.
VERSION_SHARE = "version_share"
VERSION_SHARES = "version_shares"


def _part(window: Window, predictions: list[Prediction], outcomes: list[Labeled]) -> Window:
    part = Window(window.deployment, window.variant, window.start, window.end, predictions, outcomes)
    part.siblings = window.siblings
    part.version, part.segment, part.known_good = window.version, window.segment, window.known_good
    return part


def mixed(window: Window, labels: bool) -> bool:
    """Whether more than one version served ``window`` (:func:`version_shares` has shares for
    it). ``labels``: the rule reads outcomes, so a label for an older version's prediction makes
    the window mixed too. Asked of every window by every rule: no set is built for the usual
    window of one version (``Window.versions`` and ``label_versions`` are cached)."""
    versions = window.versions
    if len(versions) > 1:
        return True
    if not (labels and window.outcomes):
        return False
    by_label = window.label_versions
    return len(by_label) > 1 or (len(versions) == 1 and not by_label <= versions.keys())


def version_shares(window: Window, labels: bool) -> list[Window]:
    """Each version's share of ``window`` (sorted by version), or ``[]`` when one version served
    it. ``labels``: as for :func:`mixed`."""
    if not mixed(window, labels):
        return []
    versions = set(window.versions)
    if labels and window.outcomes:
        versions |= window.label_versions  # cached: every label rule on the window asks
    preds: dict[str, list[Prediction]] = {v: [] for v in versions}
    outs: dict[str, list[Labeled]] = {v: [] for v in versions}
    for p in window.predictions:
        preds[p.model_version].append(p)
    if labels:
        for o in window.outcomes:
            outs[o.model_version].append(o)
    shares = []
    for v in sorted(versions):
        share = _part(window, preds[v], outs[v])
        share.version = v
        shares.append(share)
    return shares


def _adverse(rule: RuleSpec, m: Measurement) -> float:
    """How far ``m`` is on the failing side: larger is worse, whatever the direction."""
    assert m.value is not None
    return m.value if rule.direction == "above" else -m.value


def _active(alert: Alert | None) -> bool:
    return alert is not None and alert.state is not AlertState.INACTIVE


def _pick(rule: RuleSpec, alert: Alert | None, parts: Sequence[tuple[str, Measurement]]) -> tuple[str, Measurement] | None:
    """The part that steps the alert: the most adverse breaching one; while the alert is active,
    the most adverse one with a verdict (it holds the alert while past ``clear``)."""
    judged = [(label, m) for label, m in parts if verdict(rule, m) is not None]
    breaching = [(label, m) for label, m in judged if verdict(rule, m)]
    pool = breaching or (judged if _active(alert) else [])
    if not pool:
        return None
    return max(pool, key=lambda lm: (_adverse(rule, lm[1]), lm[1].sample_size, lm[0]))


def judge_versions(
    rule: RuleSpec, alert: Alert | None, whole: Measurement, shares: Sequence[tuple[str, Measurement]]
) -> Measurement:
    """The measurement that steps ``alert``: a version's share that breaches (or, the alert
    being active, is the most adverse past ``clear``), else the whole window's. The share's
    evidence names the version and what each version measured."""
    others = {v: _brief(s) for v, s in shares}
    chosen = _pick(rule, alert, shares)
    if chosen is None or (
        not verdict(rule, chosen[1]) and verdict(rule, whole) is not None
        and _adverse(rule, whole) >= _adverse(rule, chosen[1])
    ):
        # No share to blame (or, holding an active alert, the whole window is as far past
        # clear as any share): the whole window speaks, and says which versions it mixes, so
        # no single version is taken for the culprit.
        return replace(whole, evidence={**whole.evidence, VERSION_SHARES: others})
    version, m = chosen
    return replace(m, evidence={**m.evidence, VERSION_SHARE: version, VERSION_SHARES: others})


def mixed_unattributed(measurement: Mapping[str, Any]) -> bool:
    """Whether a measurement record judged a window several versions served without naming
    one: then no version is marked bad on its account."""
    evidence = measurement.get("evidence")
    return isinstance(evidence, Mapping) and VERSION_SHARES in evidence and VERSION_SHARE not in evidence


def blamed_version(measurement: Mapping[str, Any]) -> str | None:
    """The version a measurement record (``Measurement.to_record``) names as breaching: set
    when a version's share of a mixed window stepped the alert."""
    evidence = measurement.get("evidence")
    version = evidence.get(VERSION_SHARE) if isinstance(evidence, Mapping) else None
    return version if isinstance(version, str) else None


def where(measurement: Mapping[str, Any]) -> str | None:
    """Where in the traffic a measurement record found its value, for a notice: "in
    region=eu-west (others 0.004)", "in version 8 (of 7, 8)"; None for a whole window."""
    evidence = measurement.get("evidence")
    if not isinstance(evidence, Mapping):
        return None
    segment = evidence.get("segment")
    if isinstance(segment, str):
        others = evidence.get("others_value")
        more = [b.get("slice") for b in evidence.get("slices_breaching") or () if isinstance(b, Mapping)]
        more = [m for m in more if isinstance(m, str) and m != segment]
        text = f"in {segment}" + (f" (also {', '.join(more)})" if more else "")
        if isinstance(others, (int, float)):
            text += f" (others {others:.4g})"
        return text
    version = blamed_version(measurement)
    if version is not None:
        versions = evidence.get(VERSION_SHARES)
        served = ", ".join(sorted(versions)) if isinstance(versions, Mapping) else version
        return f"in version {version} (window served {served})"
    return None


def _brief(m: Measurement) -> dict[str, Any]:
    return {"value": m.value, "n": m.sample_size} if m.insufficient is None else \
        {"value": None, "n": m.sample_size, "insufficient": m.insufficient}


# Slices ---------------------------------------------------------------------------------
def slice_of(prediction: Prediction, paths: Sequence[tuple[str, str]]) -> str:
    """The slice a prediction belongs to: ``name=value`` per path, comma-joined."""
    parts = []
    for source, name in paths:
        values = prediction.attrs if source == "attrs" else prediction.features
        value = values.get(name) if values else None
        parts.append(f"{name}={'(none)' if value is None else value}")
    return ",".join(parts)


def slice_paths(rule: RuleSpec) -> tuple[tuple[str, str], ...]:
    return tuple((s.partition(".")[0], s.partition(".")[2]) for s in rule.slice_by)


def slice_windows(
    window: Window, paths: Sequence[tuple[str, str]], top_k: int, labels: int | None = None
) -> list[Window]:
    """The window's slices: the ``top_k`` largest (by predictions, and labels for a rule on
    labels; ties by name) on their own, the others pooled into :data:`OTHER`; in order of size.
    ``labels``: which of ``Labeled.segments`` holds this rule's slice (None: a rule on
    predictions, whose slices carry no labels)."""
    by: dict[str, tuple[list[Prediction], list[Labeled]]] = {}
    for p in window.predictions:
        key = slice_of(p, paths)
        part = by.get(key)
        if part is None:
            by[key] = ([p], [])
        else:
            part[0].append(p)
    if labels is not None:
        for o in window.outcomes:
            segments = o.segments
            key = segments[labels] if segments is not None and labels < len(segments) else UNKNOWN
            part = by.get(key)
            if part is None:
                by[key] = ([], [o])
            else:
                part[1].append(o)
    ranked = sorted(by, key=lambda k: (-len(by[k][0]) - len(by[k][1]), k))
    parts = []
    for name in ranked[:top_k]:
        part = _part(window, *by[name])
        part.segment = name
        parts.append(part)
    if len(ranked) > top_k:
        rest = ranked[top_k:]
        part = _part(window, [p for n in rest for p in by[n][0]], [o for n in rest for o in by[n][1]])
        part.segment = OTHER
        parts.append(part)
    return parts


def adjust_parts(parts: Sequence[tuple[str, Measurement]]) -> list[tuple[str, Measurement]]:
    """The parts' measurements with their p-values Holm-adjusted across the parts that have
    one (the raw value kept in the evidence): ten regions, or the two versions of a rolling
    update, are not ten or two chances of a false alarm. What the measurements file records
    and what :func:`judge_slices` and :func:`judge_versions` judge."""
    tested = [i for i, (_, m) in enumerate(parts) if m.p_value is not None and m.insufficient is None]
    adjusted = list(parts)
    if len(tested) > 1:
        raw = [parts[i][1].p_value for i in tested]
        for i, p_adj in zip(tested, adjust_pvalues(raw, "holm")):  # type: ignore[arg-type]
            label, m = parts[i]
            adjusted[i] = (label, replace(m, p_value=float(p_adj),
                                          evidence={**m.evidence, "p_value_raw": m.p_value}))
    return adjusted


def judge_slices(
    rule: RuleSpec, alert: Alert | None, adjusted: Sequence[tuple[str, Measurement]]
) -> Measurement:
    """The one measurement that steps the rule's alert for all its slices (their p-values
    adjusted by :func:`adjust_parts`).

    The chosen slice is the most adverse breaching one (while the alert is active: the most
    adverse with a verdict); its evidence names every breaching slice and the others' value,
    weighted by their samples (the pooled rate, for a rate). With no slice able to give a
    verdict, the measurement says so."""
    chosen = _pick(rule, alert, adjusted)
    if chosen is None:
        judged = [(label, m) for label, m in adjusted if verdict(rule, m) is not None]
        if judged:  # no breach, alert inactive: the most adverse slice, for the record
            chosen = max(judged, key=lambda lm: (_adverse(rule, lm[1]), lm[1].sample_size, lm[0]))
        else:
            n = sum(m.sample_size for _, m in adjusted)
            return Measurement.insufficient_data(
                rule.threshold, n, "no slice had enough data for a verdict" if adjusted else "no traffic",
                slices=len(adjusted))
    label, m = chosen
    breaching = [(lb, s) for lb, s in adjusted if verdict(rule, s)]
    rest = [s for lb, s in adjusted if lb != label and verdict(rule, s) is not None]
    rest_n = sum(s.sample_size for s in rest)
    others = (sum(s.value * s.sample_size for s in rest) / rest_n) if rest_n else None  # type: ignore[operator]
    return replace(m, evidence={
        **m.evidence,
        "segment": label,
        "slices_breaching": [{"slice": lb, "value": s.value, "n": s.sample_size, "p_value": s.p_value}
                             for lb, s in breaching],
        "others_value": others,
        "others_n": rest_n,
        "slices": len(adjusted),
    })
