"""Calibration: raw scores of a learned stage -> probabilities a threshold can be trusted on.

The heads' raw probabilities are compressed toward the middle on small training sets, so a
fixed threshold on them would escalate nearly everything or decide wrongly. A calibrator is
fitted on held-out (out-of-fold) scores only, never on scores of examples the model was
trained on.

Both methods fit Platt's smoothed targets, (n1 + 1) / (n1 + 2) for violations and
1 / (n0 + 2) for safe examples, instead of 1 and 0: a calibrated confidence can never exceed
what the number of examples supports (probabilities are clipped to the smoothed targets),
so a stage with few examples cannot reach a high target precision: with 10 violating
examples no violation is ever called with more than 11/12 = 0.917.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from scipy.optimize import minimize
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import StratifiedKFold

Method = Literal["auto", "sigmoid", "isotonic"]
ISOTONIC_FROM = 1000  # below this many examples isotonic regression over-fits its steps


class Calibrator:
    """A monotone map from raw scores to P(violation), fitted on held-out scores.

    Plain numbers, so that a head can be saved and restored without a pickle (`arrays`,
    `from_arrays`): Platt's (a, b), or isotonic regression's thresholds (its predictions are
    the linear interpolation between them, clipped at the ends, as scikit-learn's).
    """

    def __init__(self, method: Literal["sigmoid", "isotonic"], bounds: tuple[float, float], params: np.ndarray):
        self.method = method
        self.bounds = bounds  # the smoothed targets: no probability outside them is supported
        self._params = params  # sigmoid: [a, b]; isotonic: [thresholds of x, their y]

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        # Clipped by np.maximum and np.minimum in place: np.clip's Python wrappers cost more
        # than the arithmetic on a poll batch's few dozen scores (called once a batch).
        scores = np.asarray(scores, dtype=float)
        low, high = self.bounds
        if self.method == "isotonic":
            probs = np.interp(scores, self._params[0], self._params[1])
        else:
            a, b = self._params
            z = a * scores + b
            probs = np.exp(np.minimum(np.maximum(z, -500.0, out=z), 500.0, out=z), out=z)
            probs += 1.0
            np.divide(1.0, probs, out=probs)
        return np.minimum(np.maximum(probs, low, out=probs), high, out=probs)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"method": np.array(self.method), "bounds": np.array(self.bounds), "params": self._params}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Calibrator:
        method = str(arrays["method"])
        if method not in ("sigmoid", "isotonic"):
            raise ValueError(f"unknown calibration method {method!r}")
        low, high = (float(x) for x in arrays["bounds"])
        return cls(method, (low, high), np.asarray(arrays["params"], dtype=float))  # type: ignore[arg-type]


def fit_calibrator(scores: np.ndarray, labels: np.ndarray, method: Method = "auto") -> Calibrator:
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=int)
    if method == "auto":
        method = "isotonic" if len(labels) >= ISOTONIC_FROM else "sigmoid"
    targets = _smoothed_targets(labels)
    bounds = (float(targets.min()), float(targets.max()))
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(scores, targets)
        return Calibrator("isotonic", bounds, np.stack([iso.X_thresholds_, iso.y_thresholds_]))
    return Calibrator("sigmoid", bounds, np.array(_platt(scores, targets)))


def calibration_error(scores: np.ndarray, labels: np.ndarray, method: Method = "auto", bins: int = 10) -> float:
    """Expected calibration error of calibrators fitted on other folds than the one they score."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=int)
    folds = min(5, int(np.bincount(labels, minlength=2).min()))
    if folds < 2:
        return float("nan")
    probs = np.empty(len(labels))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=0).split(scores, labels):
        probs[test] = fit_calibrator(scores[train], labels[train], method)(scores[test])
    which = np.minimum((probs * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(probs[inside].mean() - labels[inside].mean())
    return float(error)


def _smoothed_targets(labels: np.ndarray) -> np.ndarray:
    positives = int(labels.sum())
    negatives = len(labels) - positives
    return np.where(labels == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))


def _platt(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """Platt scaling: P = 1 / (1 + exp(a*s + b)) minimising log loss against smoothed targets."""

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        z = ab[0] * scores + ab[1]
        # log(1 + exp(z)) and log(1 + exp(-z)), computed without overflow
        log_one_minus_p = -np.logaddexp(0, -z)
        log_p = -np.logaddexp(0, z)
        value = -(targets * log_p + (1 - targets) * log_one_minus_p).sum()
        p = np.exp(log_p)
        d = targets - p  # d loss / d z
        return float(value), np.array([(d * scores).sum(), d.sum()])

    prior = np.log((len(targets) - targets.sum() + 1) / (targets.sum() + 1))
    result = minimize(loss, np.array([-1.0, prior]), jac=True, method="L-BFGS-B")
    return float(result.x[0]), float(result.x[1])
