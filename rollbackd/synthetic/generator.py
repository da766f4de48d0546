"""The chunked generator: draws each chunk's requests, applies the faults, scores and labels
them, and emits every event that is due in event-time order."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from rollbackd.synthetic.encoding import ERROR_CODE_CUM, ERROR_CODES, EventEncoder, MalformedLines
from rollbackd.synthetic.faults import FaultEffects
from rollbackd.synthetic.model import (
    STREAM_EXTRA,
    STREAM_JITTER,
    STREAM_MALFORMED,
    STREAM_TRAFFIC,
    Model,
    rng,
    sigmoid,
)
from rollbackd.synthetic.traffic import Arrivals, Columns, Routing, take

if TYPE_CHECKING:
    from rollbackd.scenarios import Scenario

Chunk = tuple[list[bytes], tuple[int, int, int, int]]


class Pool:
    """Pending events of one kind as column arrays; ``take`` removes those due."""

    __slots__ = ("cols",)

    def __init__(self) -> None:
        self.cols: Columns | None = None

    def add(self, cols: Columns) -> None:
        if self.cols is None:
            self.cols = cols
        else:
            self.cols = {k: np.concatenate((v, cols[k])) for k, v in self.cols.items()}

    def take(self, threshold: float | None) -> Columns | None:
        if self.cols is None:
            return None
        if threshold is None:
            out, self.cols = self.cols, None
            return out
        due = self.cols["key"] < threshold
        if not due.any():
            return None
        if due.all():
            out, self.cols = self.cols, None
            return out
        out = take(self.cols, due)
        self.cols = take(self.cols, ~due)
        return out


def chunk_seconds(s: Scenario) -> float:
    per_second = s.rate * len(s.deployments)
    if per_second <= 1000.0:
        return 60.0
    return max(1.0, float(int(60_000.0 / per_second)))


class Generator:
    """Produces the output chunk by chunk: ``run()`` yields ``(lines, kinds_count)``."""

    def __init__(self, s: Scenario, jitter: float) -> None:
        if not (math.isfinite(jitter) and 0.0 <= jitter <= 2.0):
            raise ValueError(f"jitter must be in [0, 2] seconds, got {jitter}")
        self.s = s
        self.jitter = float(jitter)
        n_dep = len(s.deployments)
        self.models = [Model(s, d) for d in range(n_dep)]
        self.arrivals = [
            Arrivals(s, rng(s.seed, STREAM_TRAFFIC, d), rng(s.seed, STREAM_EXTRA, d)) for d in range(n_dep)
        ]
        self.jrng = rng(s.seed, STREAM_JITTER)
        self.routing = Routing(s)
        self.encoder = EventEncoder(s, self.routing, self.models)
        self.malformed = MalformedLines(s, rng(s.seed, STREAM_MALFORMED), self.encoder.encode)
        self.serial = [0] * n_dep
        self.preds = Pool()
        self.outs = Pool()
        self.deploys = Pool()
        self.deploy_dicts, cols = self.encoder.deploys()
        self.deploys.add(cols)

    def _traffic(self, d: int, t0: float, length: float) -> None:
        """Draws the predictions of deployment ``d`` in ``[t0, t0 + length)`` (relative) and
        their outcomes, into the pending pools."""
        s, m, routing = self.s, self.models[d], self.routing
        cols = self.arrivals[d].draw(t0, length)
        off = cols["off"]
        cols["variant"] = routing.variants(cols.pop("u_variant"))
        cols["version"] = routing.versions(off, cols["variant"], cols.get("u_ramp"))
        cols["ts"] = np.round(s.start + off, 3)
        keep = (cols["version"] >= 0) & (cols["ts"] < s.end)
        if not keep.all():
            cols = take(cols, keep)
        n = len(cols["off"])

        x = m.mean + m.sd * cols["z"]
        shape = self.arrivals[d].shape
        if shape is not None and shape.feature is not None:
            i = int(shape.feature[4:])
            x[:, i] += shape.feature_offset(cols["ts"]) * m.sd[i]
        cat = m.categories(cols["u_cat"])
        fx = FaultEffects.apply(s, d, routing, m, cols, x, cat)
        for j in range(s.n_categorical):
            np.minimum(cat[:, j], len(m.cat_values[j]) - 1, out=cat[:, j])

        logit = m.logit(x, cat)
        true_score = sigmoid(logit)
        score = np.round(sigmoid(fx.served_logit(m, x, logit, cols.get("eta")) + fx.logit_shift), 4)
        error = cols["u_error"] < fx.p_error
        code = np.where(error, np.searchsorted(ERROR_CODE_CUM, cols["u_code"], side="right"), -1)
        np.minimum(code, len(ERROR_CODES) - 1, out=code)
        latency = np.round(cols["latency"] * fx.lat_mult, 2)

        serial0 = self.serial[d]
        self.serial[d] = serial0 + n
        serial = np.arange(serial0, serial0 + n, dtype=np.int64)
        ts = cols["ts"]
        key = ts + self.jrng.random(n) * self.jitter if self.jitter > 0 else ts
        pred: Columns = {
            "key": key,
            "dep": np.full(n, d, dtype=np.int64),
            "serial": serial,
            "ts": ts,
            "variant": cols["variant"],
            "version": cols["version"],
            "x": np.round(x, 4),
            "cat": cat,
            "score": score,
            "latency": latency,
            "code": code,
        }
        if "region" in cols:
            pred["region"] = cols["region"]
        labelled = (cols["u_labelled"] < s.label_fraction) & ~error
        label = (cols["u_label"] < true_score) ^ (cols["u_flip"] < fx.p_flip)
        delay = cols["delay"]
        if fx.drop.any():
            # A traffic stop removes requests after every draw was made and every id handed
            # out, so the traffic outside the stop is identical to the scenario without it.
            # Which requests of a partial stop vanish is a fixed hash of the id, not a draw.
            frac = ((serial * 2654435761) % 4294967296) / 4294967296.0
            kept = ~(fx.drop & (frac < fx.dropped_share))
            pred = take(pred, kept)
            labelled, label, delay = labelled[kept], label[kept], delay[kept]
        self.preds.add(pred)

        ts, key = pred["ts"], pred["key"]
        o_ts = np.round(ts + delay, 3)
        o_keep = labelled & (o_ts < s.end)
        o_ts = o_ts[o_keep]
        if self.jitter > 0:
            o_key = np.maximum(o_ts + self.jrng.random(len(o_ts)) * self.jitter, key[o_keep])
        else:
            o_key = o_ts
        self.outs.add(
            {
                "key": o_key,
                "dep": np.full(len(o_ts), d, dtype=np.int64),
                "serial": pred["serial"][o_keep],
                "ts": o_ts,
                "label": label[o_keep].astype(np.int64),
            }
        )

    def _emit(self, threshold: float | None) -> Chunk:
        p = self.preds.take(threshold)
        o = self.outs.take(threshold)
        dp = self.deploys.take(threshold)
        dicts: list[dict[str, Any]] = []
        keys, ranks, deps, serials = [], [], [], []
        counts = [0, 0, 0]
        for rank, cols in ((0, dp), (1, p), (2, o)):
            if cols is None:
                continue
            if rank == 0:
                dicts.extend(self.deploy_dicts[i] for i in cols["serial"].tolist())
            elif rank == 1:
                dicts.extend(self.encoder.predictions(cols))
            else:
                dicts.extend(self.encoder.outcomes(cols))
            nk = len(cols["key"])
            counts[rank] = nk
            keys.append(cols["key"])
            ranks.append(np.full(nk, rank, dtype=np.int64))
            deps.append(cols["dep"])
            serials.append(cols["serial"])
        if not dicts:
            return [], (0, 0, 0, 0)
        key = np.concatenate(keys)
        rank_a = np.concatenate(ranks)
        order = np.lexsort((np.concatenate(serials), np.concatenate(deps), rank_a, key))
        enc = self.encoder.encode
        ordered = [dicts[i] for i in order.tolist()]
        lines = [enc(dd) for dd in ordered]
        lines, n_bad = self.malformed.add(ordered, lines, rank_a[order] == 1)
        return lines, (counts[1], counts[2], counts[0], n_bad)

    def run(self) -> Iterator[Chunk]:
        s = self.s
        step = chunk_seconds(s)
        n_chunks = max(1, math.ceil(s.duration / step - 1e-9))
        for c in range(n_chunks):
            t0 = c * step
            t1 = min(s.duration, t0 + step)
            for d in range(len(s.deployments)):
                self._traffic(d, t0, t1 - t0)
            if c == n_chunks - 1:
                break
            # Everything still to be generated has ts >= start + t1 - 0.0005 (ms rounding).
            out = self._emit(s.start + t1 - 0.001)
            if out[0]:
                yield out
        out = self._emit(None)
        if out[0]:
            yield out
