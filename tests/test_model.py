"""The default model, the model Protocol and the simulator, in process on synthetic arrays."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from app.models.alarms import AlarmOptions
from app.models.base import ModelOptions, ModelPathError, load_model_class
from app.models.ridge import (
    BLEND_WEIGHTS,
    OMEGA,
    WINDOW,
    Fitted,
    RidgeForecaster,
    _expect,
    fit_window,
)
from app.simulate import KINDS, SensorSim, make_sensors

OPTIONS = ModelOptions(
    history_readings=512, warmup_readings=64, retrain_every_readings=1_000, retrain_interval_s=1e9
)


def drive(
    model: RidgeForecaster, ts: np.ndarray, values: np.ndarray, chunk: int = 5
) -> dict[str, Any]:
    """Feed readings in chunks; the model refits inline where it is due."""
    k, c = values.shape
    out = {
        "forecast": np.full((k, c), np.nan),
        "score": np.full(k, np.nan),
        "flag": np.zeros(k, dtype=bool),
        "version": np.zeros(k, dtype=int),
    }
    alarms: list[Any] = []
    explanations: list[Any] = []
    for i in range(0, k, chunk):
        obs = model.observe(ts[i : i + chunk], values[i : i + chunk])
        out["forecast"][i : i + chunk] = np.asarray(obs.forecast, dtype=float).reshape(-1, c)
        out["score"][i : i + chunk] = obs.score
        out["flag"][i : i + chunk] = obs.is_anomaly
        out["version"][i : i + chunk] = obs.versions
        explanations.extend(obs.explanation or [])
        alarms.extend((i + row, event) for row, event in obs.alarms or [])
    return {**out, "alarms": alarms, "explanation": explanations}


def noise(n: int, seed: int = 0, level: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ts = 1.78e9 + np.arange(n) * 60.0
    return ts, level + rng.normal(0, 1, (n, 1))


def test_warms_up_then_scores() -> None:
    """Scores are NaN until the first fit, made inline at warmup_readings; then in [0, 1]."""
    ts, values = noise(200)
    model = RidgeForecaster("s", ("value",), OPTIONS)
    obs = model.observe(ts[:63], values[:63])
    assert np.isnan(obs.score).all() and np.isnan(obs.forecast).all() and model.version == 0
    obs = model.observe(ts[63:64], values[63:64])
    assert model.version == 1 and obs.versions == [0], "fitted right after the 64th reading"
    obs = model.observe(ts[64:100], values[64:100])
    score = np.asarray(obs.score)
    assert np.isfinite(score).all() and ((score >= 0) & (score <= 1)).all()
    assert abs(float(np.mean(obs.forecast)) - 10.0) < 1.0


@pytest.mark.parametrize("channels", [1, 3])
def test_predictions_do_not_depend_on_how_readings_are_split(channels: int) -> None:
    """One reading per call, 7 per call or all at once: the same predictions, fits included."""
    sim = SensorSim("s", channels=channels, seed=21, anomaly_rate=0.01)
    ts, values, _ = sim.take(1_500)
    runs = [
        drive(RidgeForecaster("s", sim.names, OPTIONS), ts, values, chunk)
        for chunk in (1, 7, 1_500)
    ]
    for other in runs[1:]:
        for key in ("forecast", "score"):
            assert np.array_equal(runs[0][key], other[key], equal_nan=True), key
        for key in ("flag", "version"):
            assert np.array_equal(runs[0][key], other[key]), key
        assert list(runs[0]["alarms"]) == list(other["alarms"])
    assert runs[0]["version"].max() >= 4


def test_forecast_beats_persistence_on_a_daily_cycle() -> None:
    """On a daily cycle plus noise the forecast's MAE is under 0.8 × the last value's."""
    sim = SensorSim("s", seed=4, anomaly_rate=0.0, profile="seasonal")
    ts, values, _ = sim.take(2_000)
    out = drive(RidgeForecaster("s", sim.names, OPTIONS), ts, values)
    after = slice(600, len(values) - 1)
    ours = np.abs(out["forecast"][after, 0] - values[601:, 0]).mean()
    persistence = np.abs(values[after, 0] - values[601:, 0]).mean()
    assert ours < 0.8 * persistence


def test_online_forecast_matches_the_fitted_model() -> None:
    """The per-reading Python scoring computes what the vectorised fit describes."""
    ts, values = noise(300, seed=2)
    model = RidgeForecaster("s", ("value",), OPTIONS)
    drive(model, ts[:200], values[:200])
    fitted = model.fitted
    assert fitted is not None
    obs = model.observe(ts[200:201], values[200:201])
    tail = values[200 - WINDOW + 1 : 201, 0][None, :]
    expected = _expect(fitted.channels[0].step, tail, np.array([ts[200] + fitted.interval_s]))
    assert np.asarray(obs.forecast)[0][0] == pytest.approx(expected[0], rel=1e-9)
    assert OMEGA > 0


def square_steps_and_random_walk(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Levels held for 20-200 readings with small noise, plus a random walk: the last value
    forecasts them better than a model of the window does."""
    rng = np.random.default_rng(seed)
    ts = 1.78e9 + np.arange(n) * 300.0
    levels = np.repeat(rng.normal(0, 5, n // 20), rng.integers(20, 200, n // 20))[:n]
    walk = np.cumsum(rng.normal(0, 0.3, n))
    return ts, (50 + levels + walk + rng.normal(0, 0.05, n))[:, None]


def test_the_blend_does_no_worse_than_the_ridge_forecast() -> None:
    """On square steps plus a random walk the published forecast (blended with the last value)
    has an error at most the pure ridge forecast's, and below it by a margin."""
    ts, values = square_steps_and_random_walk(3_000, seed=40)
    model = RidgeForecaster("s", ("value",), OPTIONS)
    blend = np.full(len(values), np.nan)
    ridge = np.full(len(values), np.nan)
    for i in range(len(values)):
        obs = model.observe(ts[i : i + 1], values[i : i + 1])
        blend[i] = obs.forecast[0][0]
        ridge[i] = model._ridge_next[0]
    after = slice(300, len(values) - 1)
    actual = values[301:, 0]
    ours = np.abs(blend[after] - actual).mean()
    pure = np.abs(ridge[after] - actual).mean()
    persistence = np.abs(values[after, 0] - actual).mean()
    assert ours <= pure and ours < 0.9 * pure, (ours, pure, persistence)
    assert ours < 1.05 * persistence
    assert model._blend_w[0] < 1.0


def test_the_blend_takes_the_candidate_with_the_least_faded_error() -> None:
    """Each in-order reading adds (|e| - err) / 128 to each candidate's error, e from the
    forecasts published after the reading before; the least error wins, ties the larger w."""
    ts, values = noise(100, seed=41)
    model = RidgeForecaster("s", ("value",), OPTIONS)
    drive(model, ts[:80], values[:80])
    weights = np.asarray(BLEND_WEIGHTS)
    assert list(weights) == [0.0, 0.25, 0.5, 0.75, 1.0]

    def step(ridge: float, last: float, y: float) -> list[float]:
        before = np.asarray(model._blend_error[0])
        model._ridge_next, model._last_row = [ridge], [last]
        fit = model.fitted
        assert fit is not None
        model._score(fit, float(ts[80]), [y], True, 1.0)  # scores the candidates in order
        after: list[float] = model._blend_error[0]
        assert after == pytest.approx(
            before + (np.abs(y - last - weights * (ridge - last)) - before) / 128
        )
        return after

    model._blend_error = [[0.0] * 5]
    step(12.0, 12.0, 11.0)  # the ridge forecast was the last value: every candidate ties
    assert model._blend_w == [1.0]
    model._blend_error = [[0.0] * 5]
    step(12.0, 10.0, 11.0)  # halfway between: the w = 1/2 candidate was exact
    assert model._blend_w == [0.5]
    step(12.0, 10.0, 10.0)  # the last value was exact
    assert model._blend_w == [0.0]
    for _ in range(3):
        step(12.0, 10.0, 12.0)  # the ridge forecast was exact
    assert model._blend_w == [1.0]

    # The published forecast uses the chosen weight: last + w·(ridge - last).
    model._blend_error = [[0.0] * 5]
    step(12.0, 10.0, 11.0)
    obs = model.observe(ts[80:81], values[80:81])
    last, ridge, w = values[80, 0], model._ridge_next[0], model._blend_w[0]
    assert w < 1.0 and obs.forecast[0][0] == pytest.approx(last + w * (ridge - last), rel=1e-12)


def test_a_late_reading_gets_a_finite_forecast() -> None:
    """A late reading, right after the first fit or once the blend has left the ridge
    forecast, is given the current forecast, finite, and changes nothing after it."""
    ts, values = square_steps_and_random_walk(900, seed=42)
    for upto in (64, 65, 600):
        a = RidgeForecaster("s", ("value",), OPTIONS)
        b = RidgeForecaster("s", ("value",), OPTIONS)
        before = drive(a, ts[:upto], values[:upto], chunk=1)
        drive(b, ts[:upto], values[:upto], chunk=1)
        late = a.observe(ts[[upto - 30, upto - 5]], values[[10, 20]] + 7.0)
        forecast = np.asarray(late.forecast, dtype=float)
        assert np.isfinite(forecast).all() and np.isfinite(late.score).all()
        if upto > 64:
            assert (forecast == before["forecast"][upto - 1, 0]).all()
        after_a = a.observe(ts[upto:], values[upto:])
        after_b = b.observe(ts[upto:], values[upto:])
        assert np.isfinite(np.asarray(after_a.forecast, dtype=float)).all()
        assert np.array_equal(after_a.forecast, after_b.forecast)
        assert np.array_equal(after_a.score, after_b.score)
    assert a._blend_w[0] < 1.0


def test_the_blend_survives_a_state_round_trip() -> None:
    """The candidates' errors are model state: a restored model publishes the same blend."""
    ts, values = square_steps_and_random_walk(1_200, seed=43)
    a = RidgeForecaster("s", ("value",), OPTIONS)
    drive(a, ts[:700], values[:700])
    b = RidgeForecaster("s", ("value",), OPTIONS)
    b.restore(pickle.loads(pickle.dumps(a.state())))
    assert b._blend_error == a._blend_error and b._blend_w == a._blend_w
    oa = a.observe(ts[700:], values[700:])
    ob = b.observe(ts[700:], values[700:])
    assert np.array_equal(oa.forecast, ob.forecast)


@pytest.mark.parametrize("kind", ["spike", "stuck"])
def test_flags_an_injected_anomaly_and_little_else(kind: str) -> None:
    """A spike or a stuck value is flagged; ordinary noise around it is not."""
    ts, values = noise(1_000, seed=3)
    if kind == "spike":
        values[800, 0] += 12
        event = slice(800, 801)
    else:
        values[800:830, 0] = values[799, 0]
        event = slice(800, 830)
    out = drive(RidgeForecaster("s", ("value",), OPTIONS), ts, values)
    assert out["flag"][event].any()
    assert out["score"][event].max() > 0.5
    normal = np.ones(len(values), dtype=bool)
    normal[:300] = False
    normal[event.start : event.stop + 60] = False
    assert out["flag"][normal].mean() < 0.01


def test_a_spike_does_not_spoil_the_next_forecasts() -> None:
    """The reading after a spike is judged against a forecast that ignored the spike."""
    ts, values = noise(700, seed=5)
    values[650, 0] += 50
    out = drive(RidgeForecaster("s", ("value",), OPTIONS), ts, values)
    assert out["flag"][650]
    assert abs(out["forecast"][650, 0] - 10.0) < 2.0
    assert not out["flag"][651:660].any()


def fit_points(model: RidgeForecaster, ts: np.ndarray, values: np.ndarray) -> list[int]:
    """Readings (1-based counts) after which the model fitted, fed one at a time."""
    points = []
    for i in range(len(values)):
        before = len(model.fit_seconds)
        model.observe(ts[i : i + 1], values[i : i + 1])
        if len(model.fit_seconds) > before:
            points.append(i + 1)
    return points


def test_retrains_after_r_readings_and_early_on_drift() -> None:
    """Fits at warm-up, each time the readings seen doubled, then every retrain_every_readings;
    sooner when the residuals drift (alarms out of the way: they hold refits while raised)."""
    options = OPTIONS._replace(
        retrain_every_readings=300, alarms=AlarmOptions(raise_count=1000, raise_window=1000)
    )
    ts, values = noise(1_500, seed=6)
    model = RidgeForecaster("s", ("value",), options)
    assert fit_points(model, ts[:900], values[:900]) == [64, 128, 256, 512, 812]
    steady = model.version
    assert steady >= 4

    ts2, values2 = noise(400, seed=7)
    drift = 10.0 + np.linspace(0, 30, 400)[:, None] + values2 - 10.0
    out = drive(model, ts[900:1300], drift)
    assert model.version > steady
    first_new = int(np.argmax(out["version"] > steady))
    assert first_new < 150, "the drift should trigger a refit well before 300 readings"


def test_event_time_triggers_a_refit() -> None:
    """After retrain_interval_s of the readings' own time, a refit is due (at least 16 new)."""
    options = OPTIONS._replace(retrain_interval_s=10 * 60.0)  # readings are 60 s apart
    ts, values = noise(130, seed=8)
    model = RidgeForecaster("s", ("value",), options)
    assert fit_points(model, ts, values) == [64, 80, 96, 112, 128]


def test_a_worse_candidate_is_not_installed() -> None:
    """fit refuses a candidate that does worse than the current model on recent data."""
    ts, good = noise(600, seed=9)
    current = fit_window(ts[:512], good[:512], None)
    # Three quarters of a wild random walk, then data like the current model's.
    rng = np.random.default_rng(10)
    window = good[:512].copy()
    window[:384, 0] = 10 + np.cumsum(rng.normal(0, 5, 384)) * np.sign(np.arange(384) % 7 - 3)
    candidate = fit_window(ts[:512], window, current)
    assert not candidate.accepted and candidate.error_new > candidate.error_current


def test_a_late_reading_is_scored_but_leaves_the_window_alone() -> None:
    """A reading older than the last is predicted, and the next forecast is unchanged."""
    ts, values = noise(300, seed=11)
    a = RidgeForecaster("s", ("value",), OPTIONS)
    b = RidgeForecaster("s", ("value",), OPTIONS)
    before = drive(a, ts[:250], values[:250])
    drive(b, ts[:250], values[:250])
    late = a.observe(np.array([ts[100]]), np.array([[55.0]]))
    assert late.is_anomaly[0] and 0 <= late.score[0] <= 1
    assert np.asarray(late.forecast)[0][0] == before["forecast"][249, 0]
    after_a = a.observe(ts[250:260], values[250:260])
    after_b = b.observe(ts[250:260], values[250:260])
    assert np.allclose(after_a.forecast, after_b.forecast)
    assert np.allclose(after_a.score, after_b.score)


def test_state_round_trips_through_pickle() -> None:
    """A model restored from its pickled state continues exactly like the original."""
    ts, values = noise(400, seed=12)
    a = RidgeForecaster("s", ("value",), OPTIONS)
    drive(a, ts[:300], values[:300])
    b = RidgeForecaster("s", ("value",), OPTIONS)
    b.restore(pickle.loads(pickle.dumps(a.state())))
    assert a.fitted is not None and b.fitted is not None
    assert b.version == a.version and b.fitted.channels == a.fitted.channels
    oa = a.observe(ts[300:], values[300:])
    ob = b.observe(ts[300:], values[300:])
    assert np.allclose(oa.forecast, ob.forecast) and np.allclose(oa.score, ob.score)


def test_several_channels_are_forecast_and_scored_together() -> None:
    """Four correlated channels: forecasts per channel, a one-channel spike is flagged."""
    sim = SensorSim("s", channels=4, seed=13, anomaly_rate=0.0)
    ts, values, _ = sim.take(900)
    values[850, 2] += 10 * sim.noise[2]
    model = RidgeForecaster("s", sim.names, OPTIONS)
    out = drive(model, ts, values)
    fitted = model.fitted
    assert isinstance(fitted, Fitted) and fitted.precision is not None
    assert out["forecast"].shape == (900, 4) and np.isfinite(out["forecast"][100:]).all()
    assert out["flag"][850]
    assert out["flag"][400:840].mean() < 0.02


def test_model_path_errors_are_one_line() -> None:
    """A bad SENSORCAST_MODEL path is reported in one line naming what is wrong."""
    with pytest.raises(ModelPathError, match="cannot import module 'no_such_module'"):
        load_model_class("no_such_module:Model")
    with pytest.raises(ModelPathError, match="has no attribute 'Nope'"):
        load_model_class("app.models.ridge:Nope")
    with pytest.raises(ModelPathError, match="not a class"):
        load_model_class("app.models.ridge:fit_window")
    with pytest.raises(ModelPathError, match="missing"):
        load_model_class("app.models.ridge:Linear")
    for path in ("app.models.ridge:RidgeForecaster", "app.models.simple:RollingZScore"):
        assert load_model_class(path) is not None
    assert load_model_class("tests.plugin_model:LastValue") is not None


def test_simulator_is_reproducible_and_labels_every_kind() -> None:
    """The same seed gives the same readings; events cover their labelled readings."""
    a = make_sensors(3, seed=5, anomaly_rate=0.02, start_ts=1.78e9)
    b = make_sensors(3, seed=5, anomaly_rate=0.02, start_ts=1.78e9)
    kinds: set[str] = set()
    for sa, sb in zip(a, b, strict=True):
        ta, va, la = sa.take(2_000)
        tb, vb, lb = sb.take(2_000)
        assert np.array_equal(ta, tb) and np.array_equal(va, vb) and la == lb
        assert (np.diff(ta) > 0).all()
        for event in sa.events:
            assert all(label == event.kind for label in la[event.start : event.end])
            kinds.add(event.kind)
        labelled = sum(e.end - e.start for e in sa.events if e.end <= 2_000)
        assert sum(1 for label in la if label) >= labelled
    assert kinds == set(KINDS)


def test_stuck_event_holds_the_value() -> None:
    """A stuck event repeats the last value before it on its channel."""
    sim = SensorSim("s", seed=1, anomaly_rate=0.05)
    ts, values, labels = sim.take(3_000)
    stuck = [e for e in sim.events if e.kind == "stuck" and e.end <= 3_000]
    assert stuck
    for e in stuck:
        held = values[e.start : e.end, e.channel]
        assert (held == held[0]).all()


def test_explanation_names_the_perturbed_channel() -> None:
    """A spike on one channel of four is explained by that channel, shares summing to 1."""
    sim = SensorSim("s", channels=4, seed=13, anomaly_rate=0.0)
    ts, values, _ = sim.take(900)
    values[850, 1] += 12 * sim.noise[1]
    out = drive(RidgeForecaster("s", sim.names, OPTIONS), ts, values)
    assert out["flag"][850]
    explanation = out["explanation"][850]
    assert explanation and explanation[0][0] == sim.names[1]
    assert sum(share for _, _, share in explanation) == pytest.approx(1.0, abs=1e-3)
    assert [share for _, _, share in explanation] == sorted(
        (share for _, _, share in explanation), reverse=True
    )
    assert all(detector in DETECTORS for _, detector, _ in explanation)
    assert out["explanation"][840] == ()


DETECTORS = {"spike", "level", "drift", "noise", "stuck", "multi-channel"}


def test_a_sustained_shift_raises_one_alarm_held_until_it_ends() -> None:
    """A 1 Hz sensor's channels shift together for 300 readings: one alarm, raised at the
    start, held while the shift lasts (the detectors follow it within a minute), cleared after."""
    sim = SensorSim("s", channels=3, seed=31, anomaly_rate=0.0, interval_s=1.0)
    ts, values, _ = sim.take(2_000)
    start, end = 1_200, 1_500
    values[start:end] += 6 * sim.noise
    out = drive(RidgeForecaster("s", sim.names, OPTIONS), ts, values)
    alarms = list(out["alarms"])
    assert [e.state for _, e in alarms] == ["raised", "cleared"], alarms
    (raised_at, raised), (cleared_at, cleared) = alarms
    assert start <= raised_at < start + 10
    assert end <= cleared_at < end + 30 and cleared.reason == "recovered"
    assert raised.alarm_id == cleared.alarm_id and cleared.peak_score > 0.5
    assert cleared.detectors and set(cleared.detectors) <= DETECTORS


def test_a_flapping_fault_is_one_episode() -> None:
    """A fault that clears and comes back within alarm_flap_window readings (288 by default)
    reopens the same episode, with the same alarm_id; one that comes back later is another."""
    sim = SensorSim("s", channels=3, seed=31, anomaly_rate=0.0, interval_s=1.0)
    ts, values, _ = sim.take(2_600)
    for start, end in ((1_200, 1_400), (1_550, 1_700), (2_100, 2_250)):
        values[start:end] += 6 * sim.noise
    out = drive(RidgeForecaster("s", sim.names, OPTIONS), ts, values)
    alarms = [event for _, event in out["alarms"]]
    assert [e.state for e in alarms] == ["raised", "cleared"] * 3, alarms
    first, again, later = (alarms[i].alarm_id for i in (0, 2, 4))
    assert again == first, "back 150 readings after the clear: the same episode"
    assert later != first, "back 380 readings after the clear: a new one"
    assert alarms[3].started_at == alarms[0].started_at == ts[1_200]


def test_sustained_faults_shift_several_channels_together_for_minutes() -> None:
    """A sustained fault shifts 2 channels or more of a 4-channel sensor (the one channel of a
    single-channel one) by the same 4-8 σ each, for 60-600 readings, labelled as such."""
    for channels in (1, 4):
        sim = SensorSim(
            "s", channels=channels, seed=7, anomaly_rate=0.01, interval_s=1.0,
            kinds=("sustained",), quiet_readings=50,
        )  # fmt: skip
        base = SensorSim("s", channels=channels, seed=7, anomaly_rate=0.0, interval_s=1.0)
        ts, values, labels = sim.take(6_000)
        _, clean, _ = base.take(6_000)
        events = [e for e in sim.events if e.end <= 6_000]
        assert len(events) >= 3 and all(e.kind == "sustained" for e in events)
        for e in events:
            assert 60 <= e.end - e.start <= 600
            assert len(e.channels) >= min(2, channels) and e.channel == e.channels[0]
            assert labels[e.start : e.end] == ["sustained"] * (e.end - e.start)
            shift = (values[e.start : e.end] - clean[e.start : e.end]) / sim.noise
            sigmas = shift[0, e.channels[0]]
            assert 4 <= abs(sigmas) <= 8
            moved = np.zeros(channels, dtype=bool)
            moved[list(e.channels)] = True
            assert np.allclose(shift[:, moved], sigmas) and np.allclose(shift[:, ~moved], 0)
        gaps = [b.start - a.end for a, b in zip(events, events[1:], strict=False)]
        assert min(gaps) >= 50
    with pytest.raises(ValueError, match="unknown anomaly kinds \\['leak'\\]"):
        SensorSim("s", kinds=("level", "leak"))


def test_adding_the_sustained_kind_keeps_the_earlier_events_of_a_seed() -> None:
    """A seed draws the same events as from the first five kinds alone, up to its first
    sustained fault: each earlier kind gives a sixth of its draws to the new one."""
    kept = 0
    for seed in range(10):
        six = SensorSim("s", channels=3, seed=seed, anomaly_rate=0.02)
        five = SensorSim("s", channels=3, seed=seed, anomaly_rate=0.02, kinds=KINDS[:5])
        _, v6, _ = six.take(2_000)
        _, v5, _ = five.take(2_000)
        first = next((e.start for e in six.events if e.kind == "sustained"), 2_000)
        assert [e for e in six.events if e.start < first] == [
            e for e in five.events if e.start < first
        ]
        assert np.array_equal(v6[:first], v5[:first])
        kept += sum(e.start < first for e in five.events)
    assert kept >= 50


@pytest.mark.parametrize(("channels", "seed"), [(4, 2), (4, 5), (1, 19), (1, 34)])
def test_a_simulated_sustained_fault_raises_one_alarm_held_then_cleared(
    channels: int, seed: int
) -> None:
    """A sustained fault of the simulator on a 1 Hz sensor (4 channels; 1 channel shifted by
    4.5-5 σ), after 1,500 normal readings: one alarm, raised within 10 readings, held for 90 %
    of the fault or more, cleared within 30 readings of its end."""
    sim = SensorSim(
        "s", channels=channels, seed=seed, anomaly_rate=0.0, interval_s=1.0,
        kinds=("sustained",), profile="seasonal",
    )  # fmt: skip
    parts = [sim.take(1_500)]
    sim.anomaly_rate = 1.0  # the next reading starts one
    parts.append(sim.take(1))
    sim.anomaly_rate = 0.0
    (fault,) = sim.events
    parts.append(sim.take(fault.end - fault.start + 200))
    ts = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[1] for p in parts])
    assert fault.start == 1_500 and len(fault.channels) >= min(2, channels)
    out = drive(RidgeForecaster("s", sim.names, ModelOptions()), ts, values, chunk=100)
    alarms = list(out["alarms"])
    assert [e.state for _, e in alarms] == ["raised", "cleared"], alarms
    (raised_at, _), (cleared_at, cleared) = alarms
    assert fault.start <= raised_at < fault.start + 10
    held = (min(cleared_at, fault.end) - raised_at) / (fault.end - fault.start)
    assert held >= 0.9
    assert fault.end <= cleared_at < fault.end + 30 and cleared.reason == "recovered"
    assert set(cleared.channels) <= {sim.names[o] for o in fault.channels}
