"""Event encoding: column arrays to contract-v1 dicts and JSON lines, and the malformed lines
a scenario adds next to valid ones."""

from __future__ import annotations

import datetime as _dt
import hashlib
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from rollbackd.synthetic.model import Model
from rollbackd.synthetic.traffic import Columns, Routing

if TYPE_CHECKING:
    from rollbackd.scenarios import Scenario

ERROR_CODES: tuple[str, ...] = ("TIMEOUT", "UPSTREAM_5XX", "INTERNAL")
ERROR_CODE_CUM = np.cumsum([0.5, 0.35, 0.15])

#: The ways a malformed line breaks the contract, in the order of their kind index.
MALFORMED_KINDS: tuple[str, ...] = (
    "invalid_json",
    "missing_field",
    "wrong_type",
    "unknown_type",
    "out_of_range",
    "naive_timestamp",
)


def git_sha(deployment: str, variant: str, version: str) -> str:
    return hashlib.sha1(f"{deployment}\0{variant}\0{version}".encode()).hexdigest()[:7]


class EventEncoder:
    """Dicts of fixed key order for each event kind, and their JSON encoding."""

    __slots__ = ("s", "routing", "catvals", "fnames", "region_names", "encode")

    def __init__(self, s: Scenario, routing: Routing, models: list[Model]) -> None:
        self.s = s
        self.routing = routing
        self.catvals = [m.cat_values for m in models]
        self.fnames = list(s.feature_names)
        self.region_names = [r for r, _ in s.regions]
        self.encode = msgspec.json.Encoder().encode

    def deploys(self) -> tuple[list[dict[str, Any]], Columns]:
        """Every deploy event of the scenario, and its columns for the pending pool."""
        s, shares = self.s, self.routing.shares
        dicts: list[dict[str, Any]] = []
        ts, dep, serial = [], [], []
        for d, dn in enumerate(s.deployments):
            for e in s.versions:
                for vi, v in enumerate(self.routing.variant_names):
                    if len(e) == 3 and e[2] != v:
                        continue
                    t = round(s.start + e[0], 3)
                    dicts.append(
                        {
                            "type": "deploy",
                            "ts": t,
                            "deployment": dn,
                            "model_version": e[1],
                            "variant": v,
                            "traffic": round(float(shares[vi]), 4),
                            "attrs": {"git_sha": git_sha(dn, v, e[1])},
                        }
                    )
                    ts.append(t)
                    dep.append(d)
                    serial.append(len(serial))
        cols = {
            "key": np.array(ts, dtype=float),
            "dep": np.array(dep, dtype=np.int64),
            "serial": np.array(serial, dtype=np.int64),
        }
        return dicts, cols

    def predictions(self, p: Columns) -> list[dict[str, Any]]:
        deps = self.s.deployments
        vnames = self.routing.variant_names
        versions = self.routing.version_names
        fnames = self.fnames
        k = self.s.n_numeric
        catvals = self.catvals
        regions = p["region"].tolist() if "region" in p else None
        rnames = self.region_names
        out = []
        append = out.append
        for i, (dep, serial, ts, var, ver, xr, cr, score, lat, code) in enumerate(zip(
            p["dep"].tolist(),
            p["serial"].tolist(),
            p["ts"].tolist(),
            p["variant"].tolist(),
            p["version"].tolist(),
            p["x"].tolist(),
            p["cat"].tolist(),
            p["score"].tolist(),
            p["latency"].tolist(),
            p["code"].tolist(),
        )):
            dn = deps[dep]
            cv = catvals[dep]
            feats = dict(zip(fnames, xr))
            for j, ci in enumerate(cr):
                feats[fnames[k + j]] = cv[j][ci]
            if code < 0:
                pred, sc, err = int(score >= 0.5), score, None
            else:
                pred, sc, err = None, None, ERROR_CODES[code]
            event = {
                "type": "prediction",
                "id": f"{dn}-{serial}",
                "ts": ts,
                "deployment": dn,
                "model_version": versions[ver],
                "variant": vnames[var],
                "features": feats,
                "prediction": pred,
                "score": sc,
                "latency_ms": lat,
                "error": err,
            }
            if regions is not None:
                event["attrs"] = {"region": rnames[regions[i]]}
            append(event)
        return out

    def outcomes(self, o: Columns) -> list[dict[str, Any]]:
        deps = self.s.deployments
        return [
            {"type": "outcome", "id": f"{deps[d]}-{n}", "ts": ts, "deployment": deps[d], "label": y}
            for d, n, ts, y in zip(
                o["dep"].tolist(), o["serial"].tolist(), o["ts"].tolist(), o["label"].tolist()
            )
        ]


class MalformedLines:
    """Adds, after each line with probability ``p_insert``, a line that breaks the contract.
    The lines have their own random stream, so they only add lines, never change valid ones."""

    __slots__ = ("rng", "p_insert", "encode", "bad_serial", "last_prediction")

    def __init__(self, s: Scenario, rng: np.random.Generator, encode: Any) -> None:
        self.rng = rng
        self.p_insert = s.malformed_fraction / (1.0 - s.malformed_fraction)
        self.encode = encode
        self.bad_serial = 0
        # an out_of_range line next to an outcome or deploy breaks the prediction before it
        self.last_prediction: dict[str, Any] | None = None

    def add(self, ordered: list[dict[str, Any]], lines: list[bytes], is_pred: np.ndarray) -> tuple[list[bytes], int]:
        if self.p_insert <= 0:
            if is_pred.any():
                self.last_prediction = ordered[int(np.nonzero(is_pred)[0][-1])]
            return lines, 0
        n = len(lines)
        after = np.nonzero(self.rng.random(n) < self.p_insert)[0]
        kinds = self.rng.integers(0, len(MALFORMED_KINDS), len(after))
        last_pred = np.maximum.accumulate(np.where(is_pred, np.arange(n), -1))
        if len(after) == 0:
            if is_pred.any():
                self.last_prediction = ordered[int(last_pred[-1])]
            return lines, 0
        out: list[bytes] = []
        prev = 0
        for i, kind in zip(after.tolist(), kinds.tolist()):
            lp = int(last_pred[i])
            if lp >= 0:
                self.last_prediction = ordered[lp]
            out.extend(lines[prev : i + 1])
            out.append(self._line(ordered[i], kind))
            prev = i + 1
        out.extend(lines[prev:])
        if is_pred.any():
            self.last_prediction = ordered[int(last_pred[-1])]
        return out, len(after)

    def _line(self, base: dict[str, Any], kind: int) -> bytes:
        """A line next to ``base`` that breaks the contract in way ``MALFORMED_KINDS[kind]``."""
        ts = base["ts"]
        if MALFORMED_KINDS[kind] == "out_of_range" and base["type"] != "prediction":
            if self.last_prediction is not None:
                base = self.last_prediction
        d = dict(base)
        d["ts"] = ts
        self.bad_serial += 1
        if "id" in d:
            d["id"] = f"{d['deployment']}-bad-{self.bad_serial}"
        name = MALFORMED_KINDS[kind]
        if name == "invalid_json":
            raw = self.encode(d)
            return raw[: max(1, len(raw) // 2)]
        if name == "missing_field":
            del d["deployment"]
        elif name == "wrong_type":
            if "model_version" in d:
                d["model_version"] = int(self.bad_serial)
            else:
                d["deployment"] = int(self.bad_serial)
        elif name == "unknown_type":
            d["type"] = "click"
        elif name == "out_of_range":
            if d["type"] == "prediction":
                d["score"] = 1.5
            else:  # a deploy before any prediction was generated
                d["traffic"] = 1.5
        else:  # naive_timestamp
            dt = _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).replace(tzinfo=None)
            d["ts"] = dt.isoformat(timespec="milliseconds")
        return self.encode(d)
