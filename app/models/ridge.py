"""The default model: a ridge forecaster on lag features, judged by a few robust detectors.

Forecast
    Each channel has a linear model of its next *change* (``y[t] - y[t-1]``) on features that
    do not depend on the level: the last ``LAGS`` values minus the latest one, the rolling mean
    of the last ``WINDOW`` values minus the latest one, and the time of day (sine and cosine
    of ``ts``). Fitted with scikit-learn's ``RidgeCV`` in the trainer pool, the coefficients
    are folded into one weight per value of the window (they sum to one), so predicting is a
    dot product with the last ``WINDOW`` values: no scikit-learn call on the hot path, and a
    model fitted at one level keeps working after a level shift or along a trend.

    On a series like a random walk the ridge forecast loses to the last value (persistence),
    so the published forecast is a blend of the two, ``last + w·(ridge − last)``. Each channel
    keeps a faded mean absolute error (``err += (|e| − err) / BLEND_FADE``) of each candidate
    ``w`` in ``BLEND_WEIGHTS``, updated by every in-order reading from the candidates published
    after the reading before; the forecast uses the ``w`` with the least (the larger ``w`` on
    a tie, so the ridge forecast until the errors say otherwise). The detectors judge the
    residual of the ridge forecast itself, whose scale the fit measured.

Anomaly score
    A reading is judged against what the model expected of it, given its own ``ts``. Each
    channel gives a robust z-score: the residual divided by the median absolute deviation of
    the training residuals. Four statistics are divided by their thresholds:

    - ``|z|`` over a per-sensor adaptive threshold (spikes, level shifts);
    - a two-sided CUSUM of the clipped ``z`` (drift: small residuals of one sign);
    - the mean of the clipped ``z**2`` over the last ``VAR_SPAN`` readings (noise bursts);
    - the run of identical values against the run the training window makes unlikely
      (stuck sensors);
    - with several channels, the Mahalanobis distance of the residual vector under a robust
      covariance (``MinCovDet``) fitted in the trainer (broken correlation between channels).

    The largest ratio ``a`` makes ``is_anomaly = a > 1`` and ``anomaly_score = a²/(1 + a²)``:
    0.5 at the threshold, 0.8 at twice it. A reading whose residual is an anomaly enters the
    window as the forecast instead (for at most ``MAX_IMPUTED`` readings in a row, so a real
    level shift is learnt), which keeps one spike from spoiling the next forecasts.

Order
    Lags follow the order of readings; time features use each reading's own ``ts``, so
    irregular spacing places the seasonality correctly. A reading older than the sensor's
    latest is scored against the current expectation (at its own ``ts``) and its forecast is
    the current one, but it never enters the window or the detectors' state.

Retraining
    Inline, in the model process, at points that depend only on the sensor's readings: the
    first fit once ``warmup_readings`` are in, then each time the readings seen have doubled,
    then every ``retrain_every_readings`` readings or ``retrain_interval_s`` of event time
    (the readings' ``ts``), and early when the CUSUM says the residuals drift. A candidate
    replaces the current model only if its median absolute error on the last quarter of the
    window (which the candidate was not fitted on) is not worse than the current model's,
    within ``ACCEPT_TOLERANCE``.

Alarms
    An :class:`~app.models.alarms.AlarmTracker` turns the flags into episodes, from twice the
    warm-up on (the thresholds of the first fit are rough: its flags stay flags). While an alarm
    is raised the fault is not learnt: readings enter the window marked (the fit leaves them
    out) and refits wait. The detectors soon follow a sustained shift (the forecasts start
    from the latest values), so the alarm is held while the mean of the last ``SMOOTH``
    readings is nearer the level of the alarm's readings than the level of the
    ``BASELINE_READINGS`` readings before it, on the channels the fault moved (their mean
    during the alarm ``BASELINE_K`` robust spreads or more from that level) and that were
    flat before it (their spread within ``BASELINE_FLAT`` noise scales); when no channel
    judges, the flags alone hold it. When the tracker declares a new normal, the marks are
    lifted and the model refits on it at once.

Explanation
    Each anomalous reading names the (channel, detector) pairs over their thresholds, with
    shares in proportion to how far over they are; the Mahalanobis detector's share is split
    over the channels by their terms of the distance.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from itertools import chain
from typing import Any, NamedTuple

import numpy as np

from app.models.alarms import AlarmEvent, AlarmTracker, Explanation
from app.models.base import BoolArray, FloatArray, ModelOptions, Observation

LAGS = 8
WINDOW = 16
HORIZON = 32
"""Readings ahead of the level forecaster, which sees slow drifts the one-step one follows."""
SMOOTH = 8
HORIZON_LAGS = False
THRESHOLD_FACTOR = 2.8
LEVEL_MIN_READINGS = 256
"""Readings in the window before the level detector is used: its residuals are slow, so its
scale needs a long window to be judged."""
LEVEL_FACTOR = 4.0
LEVEL_MIN_THRESHOLD = 3.0
TAIL = WINDOW + HORIZON - 1
"""Values kept per channel for scoring: the one-step window and the level window."""
DAY_S = 86_400.0
OMEGA = 2 * math.pi / DAY_S

CUSUM_K = 0.5
"""Slack of the CUSUM, in residual z units: drifts smaller than this are not accumulated."""
CUSUM_H = 10.0
"""CUSUM level that makes the residuals drift and the model refit early."""
Z_CLIP = 3.0
FALSE_RATE = 1e-3
"""Rate per reading at which each detector's statistic may exceed its threshold on the
sensor's own training window (see ``_threshold``)."""
MIN_Z_THRESHOLD = 4.5
MAX_Z_THRESHOLD = 30.0
MIN_NOISE_THRESHOLD = 4.2
"""Bounds of the mean clipped z² over ``SMOOTH`` readings that makes a noise burst (it is at
most ``Z_CLIP**2``)."""
MAX_NOISE_THRESHOLD = 8.0
MAX_IMPUTED = 3
MULTI_WIDEN = 0.12
ACCEPT_TOLERANCE = 0.2
STUCK_PROBABILITY = 1e-4
BASELINE_READINGS = 64
"""Readings before an alarm that make the level it is judged against while it lasts."""
BASELINE_FLAT = 2.0
"""A channel whose spread before the alarm is within this many noise scales is flat enough
for that level to stand for its normal."""
BASELINE_K = 3.0
"""How far (in robust spreads of those readings) a channel's mean during the alarm must be
from that level for the channel to judge whether the fault lasts."""
MIN_NEW_READINGS = 16
"""Readings needed since the last refit before a time- or drift-triggered refit."""
BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Weights ``w`` of the ridge forecast against the last value, ``last + w·(ridge − last)``,
among which each channel's published forecast is chosen (0: persistence, 1: the ridge)."""
BLEND_FADE = 128.0
"""Readings over which the candidates' absolute errors are averaged (exponentially faded)."""
_FADE_RATE = 1.0 / BLEND_FADE


def _dot(w: tuple[float, ...], x: list[float]) -> float:
    """The dot product of ``WINDOW`` (16) weights and values, written out: the products added
    left to right, in doubles, from ``0.0``.

    About half the cost of ``sum(map(mul, w, x))`` for the two dot products each reading of
    each channel takes (see ``RidgeForecaster._take`` and ``_score``), and the same double on
    every Python: ``sum`` added floats left to right until 3.11 (so this is its result there,
    to the last bit) and compensates its rounding since 3.12, which made the last bits of
    the forecasts depend on the interpreter.

    Examples:
        >>> rng = np.random.default_rng(3)
        >>> w, x = tuple(rng.standard_normal(WINDOW).tolist()), rng.standard_normal(WINDOW)
        >>> total = 0.0
        >>> for a, b in zip(w, x.tolist(), strict=True):
        ...     total += a * b
        >>> _dot(w, x.tolist()) == total
        True
    """
    return (
        0.0 + w[0] * x[0] + w[1] * x[1] + w[2] * x[2] + w[3] * x[3]
        + w[4] * x[4] + w[5] * x[5] + w[6] * x[6] + w[7] * x[7]
        + w[8] * x[8] + w[9] * x[9] + w[10] * x[10] + w[11] * x[11]
        + w[12] * x[12] + w[13] * x[13] + w[14] * x[14] + w[15] * x[15]
    )  # fmt: skip


assert WINDOW == 16, "_dot is written out for WINDOW values"


class Linear(NamedTuple):
    """A fitted forecaster folded into weights on a window of values."""

    weights: tuple[float, ...]
    """(WINDOW,): applied to ``WINDOW`` consecutive values, oldest first."""
    intercept: float
    w_sin: float
    w_cos: float


class ChannelFit(NamedTuple):
    """The fitted forecasters and residual scales of one channel."""

    step: Linear
    """The next value from the last ``WINDOW`` values."""
    scale: float
    """Robust scale of its residuals (1.4826 × median absolute deviation)."""
    threshold: float
    """``|z|`` beyond which a residual is an anomaly (adaptive, at least ``MIN_Z_THRESHOLD``)."""
    horizon: Linear
    """The value ``HORIZON`` readings later, from a window that ends ``HORIZON`` readings back."""
    level_scale: float
    """Robust scale of its residuals averaged over ``SMOOTH`` readings."""
    level_threshold: float
    stuck_run: int
    """Repeats of the same value that the training window makes unlikely."""
    noise_threshold: float = 4.2
    """Mean clipped z² over ``SMOOTH`` readings that makes a noise burst."""


class Fitted(NamedTuple):
    """What the trainer sends back: the model and how it compared with the current one."""

    channels: tuple[ChannelFit, ...]
    precision: tuple[tuple[float, ...], ...] | None
    """Robust precision matrix of the channels' z-scores, for the Mahalanobis distance."""
    mv_threshold: float
    interval_s: float
    """Median spacing of the readings: the forecast is for ``ts + interval_s``."""
    accepted: bool
    error_new: float
    error_current: float


# ---------------------------------------------------------------------------------------------
# Fitting (inline, in the model process), vectorised with numpy over the whole window


def _design(
    ts: FloatArray, series: FloatArray, horizon: int
) -> tuple[FloatArray, FloatArray, FloatArray, int]:
    """Windows, features and targets of one channel for a forecast ``horizon`` readings ahead.

    Returns ``(tails, features, target, first)``: row ``r`` predicts reading ``first + r``
    from the ``WINDOW`` values ending ``horizon`` readings before it; the target is the
    change from the last of those values.
    """
    first = WINDOW + horizon - 1
    tails = np.lib.stride_tricks.sliding_window_view(series[: len(series) - horizon], WINDOW)
    last = tails[:, -1:]
    lag_diffs = tails[:, WINDOW - LAGS : WINDOW - 1][:, ::-1] - last  # y[t-2] .. y[t-LAGS]
    mean_diff = tails.mean(axis=1, keepdims=True) - last
    phase = OMEGA * ts[first:]
    features = np.column_stack([lag_diffs, mean_diff, np.sin(phase), np.cos(phase)])
    target = series[first:] - last[:, 0]
    return tails, features, target, first


def _fold(coef: FloatArray, intercept: float) -> Linear:
    """Turn the coefficients on the level-free features into weights on the window."""
    weights = np.zeros(WINDOW)
    weights[-1] = 1.0  # the forecast is the last value plus the predicted change
    for j in range(2, LAGS + 1):
        weights[WINDOW - j] += coef[j - 2]
        weights[-1] -= coef[j - 2]
    c_mean = coef[LAGS - 1]
    weights += c_mean / WINDOW
    weights[-1] -= c_mean
    return Linear(
        tuple(weights.tolist()), float(intercept), float(coef[LAGS]), float(coef[LAGS + 1])
    )


def _expect(linear: Linear, tails: FloatArray, ts: FloatArray) -> FloatArray:
    phase = OMEGA * ts
    expected: FloatArray = (
        tails @ np.asarray(linear.weights)
        + linear.intercept
        + linear.w_sin * np.sin(phase)
        + linear.w_cos * np.cos(phase)
    )
    return expected


ALPHAS = (0.1, 1.0, 10.0, 100.0)
"""Ridge penalties tried on standardised features; the one with the least leave-one-out
error is kept (as scikit-learn's ``RidgeCV`` does, in closed form)."""


def _ridge(features: FloatArray, target: FloatArray, daily: bool, lags: bool = True) -> Linear:
    """Ridge regression with the penalty chosen by efficient leave-one-out error.

    One SVD of the centred, standardised design gives every penalty's fit and hat-matrix
    diagonal at O(n·p) each. Written in numpy because fits run inline in the shard process
    (see ``RidgeForecaster``): at this size (hundreds of rows, a dozen features) a
    scikit-learn estimator's per-call overhead is ten times the arithmetic.
    """
    if not lags:
        features = features.copy()
        features[:, : LAGS - 1] = 0.0
    if not daily:
        # A window shorter than most of a day cannot place a daily cycle: the time features
        # would only extrapolate noise.
        features = features[:, :-2]
    # Standardise so one penalty suits lags and time features alike.
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    x = features / scale
    x_mean = x.mean(axis=0)
    y_mean = float(target.mean())
    u, s, vt = np.linalg.svd(x - x_mean, full_matrices=False)
    centred = target - y_mean
    uty = u.T @ centred
    u2 = u * u
    s2 = s * s
    n = len(target)
    best_error, best_alpha = math.inf, ALPHAS[0]
    for alpha in ALPHAS:
        shrink = s2 / (s2 + alpha)
        residual = centred - u @ (shrink * uty)
        leverage = u2 @ shrink + 1.0 / n
        # The mean of the squares, summed as np.mean sums (without its per-call cost).
        error = float(np.add.reduce(np.square(residual / np.maximum(1.0 - leverage, 1e-9)))) / n
        if error < best_error:
            best_error, best_alpha = error, alpha
    coef_std = vt.T @ (s / (s2 + best_alpha) * uty)
    coef = coef_std / scale
    intercept = y_mean - float(x_mean @ coef_std)
    if not daily:
        coef = np.concatenate([coef, [0.0, 0.0]])
    return _fold(coef, intercept)


def _median(a: FloatArray) -> float:
    """``float(np.median(a))`` of a non-empty 1-d array, without ``np.median``'s per-call cost.

    The same partition as ``np.median`` (around the middle element, or the two middle ones,
    and the last, so that a NaN comes to the end), then the same arithmetic: the NaN if there
    is one, else the mean of the middle element(s), summed from zero as ``np.mean`` sums (so
    that a median of ``-0.0`` is ``0.0``).

    Examples:
        >>> _median(np.array([3.0, 1.0, 2.0])), _median(np.array([4.0, 1.0, 2.0, 3.0]))
        (2.0, 2.5)
    """
    n = len(a)
    half = n // 2
    odd = n % 2
    part = np.partition(a, [half, -1] if odd else [half - 1, half, -1])
    last = float(part[-1])
    if last != last:
        return last
    middle: list[float] = part[half - 1 + odd : half + 1].tolist()
    return sum(middle) / len(middle)


def _quantile(a: FloatArray, q: float) -> float:
    """``float(np.quantile(a, q))`` of a 1-d array of at least two values, without
    ``np.quantile``'s per-call cost (it is called on every fit).

    The same order statistics (found by a partition, with the last, so that a NaN comes to
    the end) and the same arithmetic as numpy's default ``linear`` method: the virtual index
    ``(n - 1) q``, and the interpolation between its neighbours computed from the upper one
    when the fraction is at least one half.

    Examples:
        >>> a = np.random.default_rng(1).standard_normal(501)
        >>> all(_quantile(a[:n], q) == float(np.quantile(a[:n], q))
        ...     for n in range(2, 501, 7) for q in (0.0, 0.1, 0.5, 0.9, 0.97, 1.0))
        True
    """
    n = len(a)
    virtual = (n - 1) * q
    below = math.floor(virtual)
    if below >= n - 1:
        below = n - 2
    part = np.partition(a, sorted({below, below + 1, n - 1}))
    last = float(part[-1])
    if last != last:
        return last
    lower, upper = float(part[below]), float(part[below + 1])
    gamma = virtual - below
    diff = upper - lower
    return upper - diff * (1 - gamma) if gamma >= 0.5 else lower + diff * gamma


def _robust_scale(residuals: FloatArray, floor: float) -> float:
    if len(residuals) == 0:
        return max(floor, 1e-12)
    mad = _median(np.abs(residuals - _median(residuals))) * 1.4826
    return max(mad, 0.1 * float(residuals.std()), floor)


def _threshold(stat: FloatArray, factor: float, floor: float, cap: float) -> float:
    """Adaptive threshold: well beyond the bulk of this sensor's own training statistic.

    The larger of two rules, clipped to ``[floor, cap]``:

    - ``factor`` times the 90th percentile ``u`` (1.64 for ``|z|`` on Gaussian residuals),
      which the few anomalies a window may hold barely move;
    - the level exceeded at ``FALSE_RATE`` per reading when the tail above ``u`` is taken as
      exponential (peaks over a threshold), ``P(s > u + x) = 0.1 exp(-x / b)``, that is
      ``u + b ln(0.1 / FALSE_RATE)``, with the tail's scale ``b`` from the median excess
      (``b ln 2``), again robust to a few anomalies. On Gaussian residuals the first rule
      decides; heavy-tailed sensors (bursty counts, spiky loads), whose ordinary readings
      reach far beyond a multiple of their bulk, get the second.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> round(_threshold(np.abs(rng.standard_normal(4000)), 2.8, 0.0, 99.0), 1)
        4.6
        >>> round(_threshold(np.abs(rng.laplace(size=4000)), 2.8, 0.0, 99.0), 1)  # exact: 6.9
        6.8
    """
    if len(stat) < 20:
        return floor
    u = _quantile(stat, 0.9)
    excess = stat[stat > u] - u
    b = _median(excess) / math.log(2) if len(excess) else 0.0
    return float(np.clip(max(factor * u, u + b * math.log(0.1 / FALSE_RATE)), floor, cap))


def _spoilt(outlier: BoolArray, span: int) -> BoolArray:
    """Rows whose window of ``span`` values up to and including their own holds an outlier."""
    return np.convolve(outlier.astype(np.float64), np.ones(span))[: len(outlier)] > 0


def _fit_channel(
    ts: FloatArray,
    series: FloatArray,
    flagged: BoolArray,
    design: tuple[FloatArray, FloatArray, FloatArray, int],
) -> tuple[ChannelFit, FloatArray, BoolArray]:
    """Fit one channel, leaving out rows whose target or window holds an outlier (a large
    residual, or a reading the model in use flagged). ``design`` is ``_design(ts, series, 1)``.

    Returns the fit, the one-step z-scores of rows ``WINDOW..n-1`` and the mask of kept rows.
    """
    deltas = np.diff(series)
    # A signal the model predicts (almost) exactly must not get a scale of rounding errors,
    # which would make every last digit an anomaly: at least 2 % of its typical change.
    floor = max(1e-9 * (1.0 + abs(_median(series))), 0.02 * float(deltas.std()))
    daily = bool(ts[-1] - ts[0] >= 0.75 * DAY_S)
    # Readings that repeat the previous two are a stuck sensor, not data to learn from.
    repeats = np.zeros(len(series), dtype=bool)
    repeats[2:] = (series[2:] == series[1:-1]) & (series[1:-1] == series[:-2])
    if repeats.mean() > 0.2:
        repeats[:] = False  # a sensor that often repeats itself
    tails, features, target, first = design
    keep = np.ones(len(target), dtype=bool)
    for _ in range(3):
        step = _ridge(features[keep], target[keep], daily)
        residuals = series[first:] - _expect(step, tails, ts[first:])
        scale = _robust_scale(residuals[keep], floor)
        outlier = repeats.copy()
        outlier[first:] |= np.abs(residuals) > 5 * scale
        spoilt = _spoilt(outlier, WINDOW + 1)[first:]
        new_keep = ~spoilt
        if new_keep.sum() < max(8, len(keep) // 2) or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    z = residuals / scale
    # The thresholds are judged on every row whose lag window holds no outlier, its own
    # residual included (in scoring, a flagged reading enters the window as its forecast),
    # so that the tail they are set in is the one scoring sees.
    judged = ~_spoilt(outlier, WINDOW)[first - 1 : len(series) - 1]
    threshold = _threshold(np.abs(z[judged]), THRESHOLD_FACTOR, MIN_Z_THRESHOLD, MAX_Z_THRESHOLD)
    burst = np.convolve(np.minimum(z * z, Z_CLIP * Z_CLIP), np.ones(SMOOTH) / SMOOTH, "valid")
    burst_judged = np.convolve(judged, np.ones(SMOOTH), "valid") >= SMOOTH - 0.5
    noise_threshold = _threshold(burst[burst_judged], 0.0, MIN_NOISE_THRESHOLD, MAX_NOISE_THRESHOLD)

    horizon = Linear((0.0,) * WINDOW, 0.0, 0.0, 0.0)
    level_scale, level_threshold = 1.0, math.inf
    if len(series) >= LEVEL_MIN_READINGS:
        h_tails, h_features, h_target, h_first = _design(ts, series, HORIZON)
        h_spoilt = _spoilt(outlier, WINDOW + HORIZON)[h_first:]
        # The level forecaster also leaves out what the model in use flagged (a drift is
        # not an outlier of the one-step forecaster), but its scale is judged on every row
        # a large outlier does not spoil, so that flags cannot make the scale ever tighter.
        h_fit = ~(h_spoilt | _spoilt(outlier | flagged, WINDOW + HORIZON)[h_first:])
        if h_fit.sum() >= 32:
            horizon = _ridge(h_features[h_fit], h_target[h_fit], daily, lags=HORIZON_LAGS)
        e = series[h_first:] - _expect(horizon, h_tails, ts[h_first:])
        smooth = np.convolve(e, np.ones(SMOOTH) / SMOOTH, "valid")
        clean = ~np.convolve(~h_fit, np.ones(SMOOTH), "valid").astype(bool)
        if h_fit.sum() >= 32 and clean.sum() >= 16:
            level_scale = _robust_scale(smooth[clean], floor)
            level_threshold = _threshold(
                np.abs(smooth[clean]) / level_scale,
                LEVEL_FACTOR,
                LEVEL_MIN_THRESHOLD,
                MAX_Z_THRESHOLD,
            )

    p_same = float(np.mean(np.abs(deltas) <= 1e-12 * (1.0 + np.abs(series[1:]))))
    if p_same == 0.0:
        stuck_run = 3
    elif p_same >= 0.5:
        stuck_run = 1_000_000_000  # a sensor that often repeats itself is never "stuck"
    else:
        stuck_run = max(3, math.ceil(math.log(STUCK_PROBABILITY) / math.log(p_same)))
    fit = ChannelFit(
        step, scale, threshold, horizon, level_scale, level_threshold, stuck_run, noise_threshold
    )
    return fit, z, keep


def _multivariate(z: FloatArray) -> tuple[tuple[tuple[float, ...], ...] | None, float]:
    """Robust precision matrix of the z-score vectors and the distance threshold.

    The covariance is reweighted once (as the last step of a minimum covariance
    determinant estimate): rows far out under the plain estimate are left out, so the few
    anomalies a window holds do not widen it.
    """
    c = z.shape[1]
    if c < 2 or len(z) < 4 * c + 8:
        return None, math.inf
    ridge = 1e-3 * np.eye(c)
    covariance = np.cov(z, rowvar=False)
    for _ in range(2):
        precision = np.linalg.inv(covariance + ridge)
        d2 = np.einsum("ij,jk,ik->i", z, precision, z)
        inliers = d2 <= _quantile(d2, 0.9)
        if inliers.sum() < 2 * c + 4:
            break
        covariance = np.cov(z[inliers], rowvar=False)
    precision = np.linalg.inv(covariance + ridge)
    d = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, precision, z), 0.0))
    threshold = _threshold(d, THRESHOLD_FACTOR, MIN_Z_THRESHOLD, MAX_Z_THRESHOLD)
    return tuple(tuple(row) for row in precision.tolist()), threshold


def fit_window(
    ts: FloatArray, values: FloatArray, current: Fitted | None, flagged: BoolArray | None = None
) -> Fitted:
    """Fit a model on a window; compare it with ``current`` on the window's last quarter.

    Raises:
        ValueError: the window is too short to fit.
    """
    n, c = values.shape
    if flagged is None:
        flagged = np.zeros(n, dtype=bool)
    if n < WINDOW + 8:
        raise ValueError(f"{n} readings are too few to fit (need {WINDOW + 8})")
    error_new = error_current = math.nan
    accepted = True
    split = n - n // 4
    designs = [_design(ts, values[:, o], 1) for o in range(c)]
    if current is not None and len(current.channels) == c and split - WINDOW >= 24:
        # The candidate sees only the first three quarters; both are judged on the rest.
        error_new = error_current = 0.0
        daily = bool(ts[split - 1] - ts[0] >= 0.75 * DAY_S)
        for o in range(c):
            tails, features, target, first = designs[o]
            head = _ridge(features[: split - first], target[: split - first], daily)
            rows, rows_ts = tails[split - first :], ts[split:]
            actual = values[split:, o]
            norm = current.channels[o].scale
            new = np.abs(actual - _expect(head, rows, rows_ts))
            old = np.abs(actual - _expect(current.channels[o].step, rows, rows_ts))
            error_new += _median(new) / norm
            error_current += _median(old) / norm
        accepted = error_new <= error_current * (1 + ACCEPT_TOLERANCE)
    fits: list[ChannelFit] = []
    zs: list[FloatArray] = []
    kept = np.ones(n - WINDOW, dtype=bool)
    for o in range(c):
        fit, z, keep = _fit_channel(ts, values[:, o], flagged, designs[o])
        fits.append(fit)
        zs.append(z)
        kept &= keep
    precision, mv_threshold = _multivariate(np.column_stack(zs)[kept])
    gaps = np.diff(ts)
    gaps = gaps[gaps > 0]
    interval = _median(gaps) if len(gaps) else 1.0
    return Fitted(
        tuple(fits), precision, mv_threshold, interval, accepted, error_new, error_current
    )


# ---------------------------------------------------------------------------------------------
# Scoring (in the shard workers), one reading at a time in plain Python floats: with a handful
# of readings per sensor per batch, that is several times faster than numpy's per-call cost.


class RidgeForecaster:
    """Ridge forecaster on lag features with robust anomaly detectors (the default model).

    See the module docstring for the method. Implements :class:`app.models.base.SensorModel`.
    """

    def __init__(
        self, sensor_id: str, channels: tuple[str, ...], options: ModelOptions | None = None
    ) -> None:
        options = options or ModelOptions()
        self.sensor_id = sensor_id
        self.channels = channels
        self.version = 0
        self.options = options
        c = len(channels)
        self._history = max(options.history_readings, WINDOW + 32)
        self._warmup = max(options.warmup_readings, WINDOW + 16)
        self._ts: deque[float] = deque(maxlen=self._history)
        self._values: deque[tuple[float, ...]] = deque(maxlen=self._history)
        self._flagged: deque[bool] = deque(maxlen=self._history)
        self._tails: list[list[float]] = [[] for _ in range(c)]
        self._windows: list[list[float]] = [[] for _ in range(c)]
        """Per channel, the last ``WINDOW`` values of its tail, while a model is fitted (made
        from the tails by ``_refresh``; not part of the state)."""
        self._baseline: list[list[float] | None] | None = None
        """Per channel, its level and spread before the raised alarm, and what the alarm's
        readings say of it (see ``_level_before``): the fault is judged against it while the
        alarm lasts, since the detectors soon follow a sustained shift."""
        self._last_ts = -math.inf
        self._last_raw: list[float] = [math.nan] * c
        self._fit: Fitted | None = None
        self._lag_part: list[float] = [0.0] * c
        self._cusum_up = [0.0] * c
        self._cusum_down = [0.0] * c
        self._var_ring = [[0.0] * SMOOTH for _ in range(c)]
        self._var_sum = [0.0] * c
        self._level_ring = [[0.0] * SMOOTH for _ in range(c)]
        self._level_sum = [0.0] * c
        self._ring_at = 0
        self._same = [0] * c
        self._imputed = 0
        self._seen = 0
        """In-order readings taken, over the model's life."""
        self._since_fit = 0
        self._fit_ts = -math.inf
        self._fit_seen = 0
        self._every = self._fit_every()
        """Readings after a fit that make the next one due (see ``_maybe_refit``); follows
        ``_fit_seen``, not part of the state."""
        self._drift = False
        self._relearn = False
        """A new normal was declared: refit at once, on everything in the window."""
        self._level_mute = 0
        """Readings left before the level detector speaks again, after an alarm."""
        self._last_row: Sequence[float] = [math.nan] * c
        """The latest in-order reading as it came (the window may hold its forecast instead)."""
        self._ridge_next: list[float] = [math.nan] * c
        """The ridge forecast of each channel published after the latest in-order reading."""
        self._blend_error = [[0.0] * len(BLEND_WEIGHTS) for _ in range(c)]
        """Per channel, the faded mean absolute error of each candidate of ``BLEND_WEIGHTS``."""
        self._blend_w = [BLEND_WEIGHTS[-1]] * c
        """Per channel, the weight of the candidate with the least error (see ``_score``)."""
        self._alarm = AlarmTracker(sensor_id, options.alarms)
        self.fit_seconds: list[float] = []
        """Durations of the fits since the service last read them (for metrics)."""
        self.fit_failures = 0

    # The Protocol ----------------------------------------------------------------------------

    def observe(self, ts: FloatArray, values: FloatArray) -> Observation:
        return self.observe_lists(ts.tolist(), values.tolist())

    def observe_lists(self, ts: list[float], rows: list[Sequence[float]]) -> Observation:
        """``observe`` on plain lists (see :class:`app.models.base.ListObserver`)."""
        c = len(self.channels)
        forecasts: list[list[float] | None] = []
        scores: list[float] = []
        flags: list[bool] = []
        explanations: list[Explanation] = []
        alarms: list[tuple[int, AlarmEvent]] = []
        versions: list[int] = []
        nan_row = [math.nan] * c
        # The largest of c channels' statistics exceeds a threshold more often than one
        # channel's: widen the thresholds with the number of channels.
        widen = 1.0 + MULTI_WIDEN * math.log(c)
        for t, row in zip(ts, rows, strict=True):
            fit = self._fit
            in_order = t >= self._last_ts
            versions.append(self.version)
            if fit is None:
                if in_order:
                    self._take(t, row, False)
                    self._last_row = row
                    self._maybe_refit(t)
                forecasts.append(nan_row)
                scores.append(math.nan)
                flags.append(False)
                explanations.append(())
                continue
            ratio, clean, zs, found = self._score(fit, t, row, in_order, widen)
            flagged = ratio > 1.0
            precision = fit.precision
            if precision is not None:
                d2 = 0.0
                terms = []
                for i in range(c):
                    zi, prow = zs[i], precision[i]
                    term = 0.0
                    for j in range(c):
                        term += zi * prow[j] * zs[j]
                    terms.append(term)
                    d2 += term
                r = math.sqrt(d2 if d2 > 0 else 0.0) / fit.mv_threshold
                if r > 1.0:
                    flagged = True
                    positive = sum(x for x in terms if x > 0) or 1.0
                    found.extend(
                        (self.channels[i], "multi-channel", r * x / positive)
                        for i, x in enumerate(terms)
                        if x > 0
                    )
                if r > ratio:
                    ratio = r
            score = ratio * ratio / (1.0 + ratio * ratio)
            explanation = _shares(found) if flagged else ()
            if in_order:
                self._ring_at = (self._ring_at + 1) % SMOOTH
                if self._level_mute:
                    self._level_mute -= 1
                # Counted until a reading fits again, so a lasting shift is learnt, not masked.
                self._imputed = self._imputed + 1 if flagged else 0
                event = (
                    self._alarm.update(
                        t,
                        score,
                        flagged,
                        explanation,
                        None if self._baseline is None else self._away(row),
                    )
                    if self._seen >= 2 * self._warmup
                    else None
                )
                self._take(t, clean, flagged or self._alarm.active)
                self._last_row = row
                if event is not None:
                    alarms.append((len(scores), event))
                    self._alarm_changed(event)
                self._maybe_refit(t)
            forecasts.append(self._forecast(self._fit or fit, in_order))
            scores.append(score)
            flags.append(flagged)
            explanations.append(explanation)
        return Observation(forecasts, scores, flags, explanations, versions, alarms)  # type: ignore[arg-type]

    def state(self) -> Any:
        state: dict[str, Any] = {key: getattr(self, key) for key in _STATE}
        state["_ts"] = list(self._ts)
        state["_values"] = list(self._values)
        state["_flagged"] = list(self._flagged)
        state["_alarm"] = self._alarm.state()
        return state

    def restore(self, state: Any) -> None:
        for key, value in state.items():
            if key in ("_ts", "_values", "_flagged"):
                getattr(self, key).extend(value)
            elif key == "_alarm":
                self._alarm.restore(value)
            elif key in _STATE:
                setattr(self, key, value)
        self._every = self._fit_every()
        if self._fit is not None:
            self._refresh()

    # Internals -------------------------------------------------------------------------------

    @property
    def fitted(self) -> Fitted | None:
        """The model in use, None while warming up."""
        return self._fit

    @property
    def alarm_active(self) -> bool:
        return self._alarm.active

    def _score(
        self, fit: Fitted, t: float, row: Sequence[float], in_order: bool, widen: float
    ) -> tuple[float, list[float], list[float], list[tuple[str, str, float]]]:
        """Judge one reading: (largest ratio, value to keep, z per channel, detectors over).

        Updates the detectors' state when the reading is in order.
        """
        sin_t, cos_t = math.sin(OMEGA * t), math.cos(OMEGA * t)
        ratio = 0.0
        zs: list[float] = []
        clean: list[float] = []
        found: list[tuple[str, str, float]] = []
        at = self._ring_at
        tails = self._tails
        ridge_next, last_row = self._ridge_next, self._last_row
        blend_error, blend_w = self._blend_error, self._blend_w
        for o, ch in enumerate(fit.channels):
            step = ch.step
            expected = self._lag_part[o] + step.w_sin * sin_t + step.w_cos * cos_t
            y = row[o]
            z = (y - expected) / ch.scale
            zs.append(z)
            spike = abs(z) / ch.threshold
            if spike > 1.0:
                clean.append(expected if self._imputed < MAX_IMPUTED else y)
            else:
                clean.append(y)
            if not in_order:
                r = spike
                if r > 1.0:
                    found.append((self.channels[o], "spike", r))
            else:
                # The candidate forecasts published after the reading before, scored against
                # this one: the weight of the next forecast (ties go to the larger weight).
                ridge = ridge_next[o]
                last = last_row[o]
                if ridge == ridge and last == last:  # not NaN: a forecast was published
                    change = ridge - last
                    miss = y - last
                    errors = blend_error[o]
                    best, best_w = math.inf, BLEND_WEIGHTS[-1]
                    for k, w in enumerate(BLEND_WEIGHTS):
                        e = miss - w * change
                        err = errors[k]
                        err += ((e if e >= 0.0 else -e) - err) * _FADE_RATE
                        errors[k] = err
                        if err <= best:
                            best, best_w = err, w
                    blend_w[o] = best_w
                # Drift of the one-step residuals (CUSUM): asks for an early refit.
                zc = Z_CLIP if z > Z_CLIP else -Z_CLIP if z < -Z_CLIP else z
                up = self._cusum_up[o] + zc - CUSUM_K
                down = self._cusum_down[o] - zc - CUSUM_K
                self._cusum_up[o] = up = 0.0 if up < 0.0 else up
                self._cusum_down[o] = down = 0.0 if down < 0.0 else down
                if up > CUSUM_H or down > CUSUM_H:
                    self._drift = True
                    self._cusum_up[o] = self._cusum_down[o] = 0.0
                # Noise bursts: mean clipped z² over the last readings.
                zq = z * z if z * z < Z_CLIP * Z_CLIP else Z_CLIP * Z_CLIP
                ring = self._var_ring[o]
                self._var_sum[o] += zq - ring[at]
                ring[at] = zq
                noise = self._var_sum[o] / (SMOOTH * ch.noise_threshold) / widen
                # Slow drifts and shifts: the value against the forecast made HORIZON
                # readings ago, averaged over the last readings. (The imputed value, when
                # there is one: a spike is the one-step detector's, and must not linger in
                # this average.)
                h = ch.horizon
                e = clean[o] - (
                    h.intercept + _dot(h.weights, tails[o]) + h.w_sin * sin_t + h.w_cos * cos_t
                )
                ring = self._level_ring[o]
                self._level_sum[o] += e - ring[at]
                ring[at] = e
                level = (
                    abs(self._level_sum[o]) / (SMOOTH * ch.level_scale * ch.level_threshold)
                ) / widen
                if self._level_mute:
                    level = 0.0
                # A stuck sensor repeats its value.
                same = self._same[o] + 1 if y == self._last_raw[o] else 0
                self._same[o] = same
                self._last_raw[o] = y
                stuck = same / ch.stuck_run
                spike /= widen
                # max(spike, level, noise, stuck), without the call: the first of the largest.
                r = level if level > spike else spike
                if noise > r:
                    r = noise
                if stuck > r:
                    r = stuck
                if r > 1.0:
                    name = self.channels[o]
                    for detector, value in (
                        ("spike", spike), ("level", level), ("noise", noise), ("stuck", stuck)
                    ):  # fmt: skip
                        if value > 1.0:
                            found.append((name, detector, value))
            if r > ratio:
                ratio = r
        return ratio, clean, zs, found

    def _fit_every(self) -> int:
        """Readings after the last fit that make the next one due: early fits are rough, so
        the model refits each time the readings seen have doubled, then every
        ``retrain_every_readings``."""
        return min(self.options.retrain_every_readings, max(self._warmup, self._fit_seen))

    def _maybe_refit(self, t: float) -> None:
        """Refit now if due: called after each in-order reading is taken."""
        self._seen += 1
        self._since_fit = since = self._since_fit + 1
        if self._alarm.active:
            return  # the fault is not learnt while the alarm lasts
        if self._fit is None:
            due = len(self._values) >= self._warmup
        else:
            due = (
                self._relearn
                or since >= self._every
                or (
                    since >= MIN_NEW_READINGS
                    and (self._drift or t - self._fit_ts >= self.options.retrain_interval_s)
                )
            )
        if due:
            self._refit(t)

    def _refit(self, t: float) -> None:
        relearn = self._relearn
        self._since_fit = 0
        self._fit_ts = t
        self._fit_seen = self._seen
        self._every = self._fit_every()
        self._drift = False
        self._relearn = False
        # From the deques by iteration (np.array would inspect each row as a sequence first).
        n, c = len(self._values), len(self.channels)
        values = np.fromiter(chain.from_iterable(self._values), np.float64, n * c).reshape(n, c)
        flagged = np.fromiter(self._flagged, bool, n)
        started = time.perf_counter()
        try:
            fitted = fit_window(
                np.fromiter(self._ts, np.float64, n),
                values,
                None if relearn else self._fit,
                flagged,
            )
        except Exception:
            self.fit_failures += 1
            return
        self.fit_seconds.append(time.perf_counter() - started)
        if fitted.accepted and len(fitted.channels) == len(self.channels):
            self._fit = fitted
            self._refresh()
            # The level detector's recent residuals were the old forecaster's (before the
            # first level fit, the raw values): averaged with the new one's they would make a
            # shift out of nothing.
            c = len(self.channels)
            self._level_ring = [[0.0] * SMOOTH for _ in range(c)]
            self._level_sum = [0.0] * c
            self.version += 1

    def _alarm_changed(self, event: AlarmEvent) -> None:
        if event.state == "raised":
            if self._baseline is None:
                self._baseline = self._level_before()
            return
        self._baseline = None
        # The detectors' recent state holds the fault (the level forecaster's window for the
        # next TAIL readings too): start them afresh, or its end would be flagged as a shift.
        c = len(self.channels)
        self._level_ring = [[0.0] * SMOOTH for _ in range(c)]
        self._level_sum = [0.0] * c
        self._var_ring = [[0.0] * SMOOTH for _ in range(c)]
        self._var_sum = [0.0] * c
        self._level_mute = TAIL
        if event.reason == "new_normal":
            # What the alarm kept out of the fit is the sensor's normal now.
            self._flagged = deque([False] * len(self._flagged), maxlen=self._history)
            self._relearn = True

    def _level_before(self) -> list[list[float] | None]:
        """Each channel's ``[level, spread, sum, count, judges]`` over the unflagged readings
        before the alarm (``sum`` and ``count`` gather the alarm's own readings, and
        ``judges`` turns 1 once they show the fault moved the channel, all from 0).

        None for a channel whose level moved more than its noise over those readings (a
        daily cycle, a trend): its level before the alarm says little of its normal later.
        """
        rows = [v for v, f in zip(self._values, self._flagged, strict=True) if not f]
        rows = rows[-BASELINE_READINGS:] or list(self._values)[-BASELINE_READINGS:]
        fit = self._fit
        out: list[list[float] | None] = []
        for o in range(len(self.channels)):
            column = np.array([row[o] for row in rows], dtype=np.float64)
            level = _median(column)
            noise = fit.channels[o].scale if fit is not None else 1e-9
            spread = _robust_scale(column - level, noise)
            flat = spread <= BASELINE_FLAT * noise
            out.append([level, spread, 0.0, 0.0, 0.0] if flat else None)
        return out

    def _away(self, row: Sequence[float]) -> bool | None:
        """While an alarm is raised: is the mean of the last readings (this one included)
        still nearer the level of the alarm's readings than the level before it? None when
        that cannot be told.

        Only the channels the fault moved judge: those whose mean over the alarm's readings
        (``SMOOTH`` of them at least, so that one noisy reading does not make a channel
        judge) has been ``BASELINE_K`` spreads or more from their level before it; until one
        does, the flags decide. Judging by the halfway point rather than by a fixed distance
        from the old level holds a fault of a few σ as firmly as a large one, and lets the
        alarm clear when a large one ends even if the level has wandered meanwhile.
        """
        baseline = self._baseline
        if baseline is None or not any(baseline):
            return None
        # The last readings of the window (a deque: indexed from its end, not copied whole).
        values = self._values
        recent = range(-min(SMOOTH - 1, len(values)), 0)
        judged = away = False
        for o, channel in enumerate(baseline):
            if channel is None:
                continue
            channel[2] += row[o]
            channel[3] += 1.0
            level, spread, total, count, judges = channel
            shift = total / count - level
            if not judges:
                if count < SMOOTH or abs(shift) < BASELINE_K * spread:
                    continue
                channel[4] = 1.0
            judged = True
            if not away:
                mean = (row[o] + sum(values[i][o] for i in recent)) / (len(recent) + 1)
                away = (mean - level) * shift > 0.5 * shift * shift
        return away if judged else None

    def _take(self, t: float, row: Sequence[float], flagged: bool) -> None:
        """Append an in-order reading to the window and the lag tails."""
        self._ts.append(t)
        self._values.append(tuple(row))
        self._flagged.append(flagged)
        self._last_ts = t
        fit = self._fit
        for o, v in enumerate(row):
            tail = self._tails[o]
            tail.append(v)
            if len(tail) > TAIL:
                del tail[0]
            elif len(tail) < TAIL:
                tail[:0] = [tail[0]] * (TAIL - len(tail))
            if fit is not None:
                window = self._windows[o]
                window.append(v)
                del window[0]
                step = fit.channels[o].step
                self._lag_part[o] = step.intercept + _dot(step.weights, window)

    def _refresh(self) -> None:
        fit = self._fit
        assert fit is not None
        for o, tail in enumerate(self._tails):
            if tail and len(tail) < TAIL:
                tail[:0] = [tail[0]] * (TAIL - len(tail))
            self._windows[o] = window = tail[-WINDOW:]
            step = fit.channels[o].step
            self._lag_part[o] = step.intercept + _dot(step.weights, window)

    def _forecast(self, fit: Fitted, in_order: bool = True) -> list[float]:
        """The published forecast: per channel, the blend of the ridge forecast and the last
        value that has done best lately. Depends only on the in-order readings, so a late
        reading gets the current forecast; only an in-order one's become the candidates the
        next reading scores (a late reading may come before any in-order one has had one)."""
        t = OMEGA * (self._last_ts + fit.interval_s)
        sin_t, cos_t = math.sin(t), math.cos(t)
        out: list[float] = []
        for o, ch in enumerate(fit.channels):
            ridge = self._lag_part[o] + ch.step.w_sin * sin_t + ch.step.w_cos * cos_t
            if in_order:
                self._ridge_next[o] = ridge
            w = self._blend_w[o]
            last = self._last_row[o]
            out.append(ridge if w == 1.0 or last != last else last + w * (ridge - last))
        return out


_STATE = (
    "version", "fit_failures", "_ts", "_values", "_flagged", "_tails", "_baseline", "_last_ts",
    "_last_raw", "_fit", "_lag_part", "_cusum_up", "_cusum_down", "_var_ring", "_var_sum",
    "_level_ring", "_level_sum", "_ring_at", "_same", "_imputed", "_seen", "_since_fit",
    "_fit_ts", "_fit_seen", "_drift", "_relearn", "_level_mute", "_last_row", "_ridge_next",
    "_blend_error", "_blend_w", "_alarm",
)  # fmt: skip
"""What ``RidgeForecaster.state`` keeps: every attribute but those of ``_NOT_STATE``. Named,
not read from ``vars()``: the compiled model's instances have no ``__dict__`` (see
``app.models.compiled``); a test checks that every attribute is in one of the two."""
_NOT_STATE = (
    "options", "sensor_id", "channels", "_history", "_warmup", "fit_seconds", "_windows",
    "_every",
)  # fmt: skip
"""The settings (``options`` and what follows from them), the fit durations not yet read,
and what ``restore`` recomputes."""


def _shares(found: list[tuple[str, str, float]]) -> Explanation:
    """(channel, detector, share) from how far each pair is over its threshold.

    Examples:
        >>> _shares([("a", "spike", 3.0), ("b", "level", 1.0)])
        (('a', 'spike', 0.75), ('b', 'level', 0.25))
    """
    merged: dict[tuple[str, str], float] = {}
    for channel, detector, value in found:
        merged[(channel, detector)] = merged.get((channel, detector), 0.0) + value
    total = sum(merged.values())
    if total <= 0:
        return ()
    ranked = sorted(merged.items(), key=lambda kv: -kv[1])
    return tuple((channel, detector, round(v / total, 4)) for (channel, detector), v in ranked)
