"""Detectors: pure objects that turn a closed :class:`Window` into a :class:`Measurement`.

Importing this package registers the built-in detectors by name (see :func:`make_detector`).
"""

from rollbackd.detectors.base import (
    REGISTRY,
    Detector,
    DetectorFactory,
    Labeled,
    Measurement,
    MissingExtra,
    Reference,
    Window,
    make_detector,
    register,
)
# alibi-detect's detectors register by name; alibi-detect itself is imported only when one is
# built (an optional, BSL-licensed extra).
from rollbackd.detectors.alibi import AlibiCVMOnline, AlibiLSDD, AlibiMMD
from rollbackd.detectors.burn_rate import BurnRate
from rollbackd.detectors.calibration import Calibration
from rollbackd.detectors.canary import Canary
from rollbackd.detectors.drift import Drift
from rollbackd.detectors.error_rate import ErrorRate
from rollbackd.detectors.latency import Latency
from rollbackd.detectors.model_error import ModelError
from rollbackd.detectors.model_quality import ModelQuality
from rollbackd.detectors.quality import DataQuality
from rollbackd.detectors.sequential import Sequential
from rollbackd.detectors.traffic import Traffic

__all__ = [
    "REGISTRY",
    "Detector",
    "DetectorFactory",
    "Labeled",
    "Measurement",
    "MissingExtra",
    "Reference",
    "Window",
    "make_detector",
    "register",
    "AlibiCVMOnline",
    "AlibiLSDD",
    "AlibiMMD",
    "BurnRate",
    "Calibration",
    "Canary",
    "DataQuality",
    "Drift",
    "ErrorRate",
    "Latency",
    "ModelError",
    "ModelQuality",
    "Sequential",
    "Traffic",
]
