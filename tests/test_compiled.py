"""The compiled default model (``app.models.compiled``): in use where it was built, the same
outputs as its Python source bit for bit, checkpoints that cross between the two, and never a
build of other sources."""

from __future__ import annotations

import doctest
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import app.models
from app.models import compiled
from tests.conftest import ROOT

SWITCHED_OFF = os.environ.get(compiled.SWITCH, "1") in ("0", "false", "no", "off")


def run_model(mode: str, steps: list[dict[str, Any]]) -> list[str]:
    """Run ``_drive`` in a fresh interpreter with the model compiled (``"1"``) or from its
    Python source (``"0"``); returns what each step printed."""
    env = {**os.environ, compiled.SWITCH: mode}
    out = subprocess.run(
        [sys.executable, "-c", "import sys, tests.test_compiled as t; t._drive(sys.argv[1])",
         json.dumps(steps)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _drive(spec: str) -> None:
    """Drive three sensors (one and three channels, anomalies, late readings) from a given
    reading to another, optionally from and to a checkpoint file; print whether the model is
    compiled and a digest of every output, floats to the last bit."""
    from app.models.base import ModelOptions
    from app.models.ridge import RidgeForecaster
    from app.simulate import SensorSim

    for step in json.loads(spec):
        start, stop, path = step["start"], step["stop"], step.get("checkpoint")
        options = ModelOptions(history_readings=600, warmup_readings=64)
        sims = [
            SensorSim(f"s{k}", channels=c, seed=k, anomaly_rate=0.01, profile=profile)
            for k, (c, profile) in enumerate([(1, "seasonal"), (1, "wander"), (3, "wander")])
        ]
        models = [RidgeForecaster(sim.sensor_id, sim.names, options) for sim in sims]
        if step.get("restore"):
            states = pickle.loads(Path(path).read_bytes())
            for model, state in zip(models, states, strict=True):
                model.restore(state)
        h = hashlib.sha256()
        for model, sim in zip(models, sims, strict=True):
            ts, values, _ = sim.take(stop)
            for i in range(start, stop, 7):
                obs = model.observe(ts[i : i + 7], values[i : i + 7])
                floats = [x for f in obs.forecast for x in (f or ())] + list(obs.score)
                if i % 91 == 0 and i > 0:  # a late reading now and then
                    late = model.observe(ts[i - 3 : i - 2], values[i - 3 : i - 2] + 1.0)
                    floats += list(late.score)
                h.update(" ".join(float(x).hex() for x in floats).encode())
                h.update(repr((obs.is_anomaly, obs.explanation, obs.versions)).encode())
                h.update(repr([(row, event) for row, event in obs.alarms or []]).encode())
        if step.get("save"):
            Path(path).write_bytes(pickle.dumps([model.state() for model in models]))
        print(compiled.active(), h.hexdigest())


@pytest.mark.skipif(SWITCHED_OFF, reason=f"{compiled.SWITCH}=0: the Python source was asked for")
def test_the_default_model_runs_compiled_where_it_was_built() -> None:
    """`make` builds it: the suite (and the service it starts) runs the compiled modules."""
    assert compiled.usable(), "no build of the current sources: run `python -m app.models.build`"
    assert app.models.COMPILED
    assert compiled.active()
    assert run_model("1", [{"start": 0, "stop": 1}])[0] == "True"
    assert run_model("0", [{"start": 0, "stop": 1}])[0] == "False"


@pytest.mark.skipif(not compiled.usable(), reason="the compiled model is not built")
def test_the_compiled_model_gives_the_sources_outputs_and_checkpoints_cross(
    tmp_path: Path,
) -> None:
    """Forecasts, scores, flags, explanations, versions and alarms are the same doubles and
    values compiled and from the source, including after a checkpoint taken by one and
    restored by the other."""
    whole = {"start": 0, "stop": 1_400}
    first = {"start": 0, "stop": 700, "save": True}
    second = {"start": 700, "stop": 1_400, "restore": True}
    digests: dict[tuple[str, str], tuple[str, str]] = {}
    for a in ("0", "1"):
        for b in ("0", "1"):
            path = str(tmp_path / f"{a}{b}.pickle")
            head = run_model(a, [{**first, "checkpoint": path}])
            tail = run_model(b, [{**second, "checkpoint": path}])
            assert (head[0], tail[0]) == (str(a == "1"), str(b == "1"))
            digests[(a, b)] = (head[1], tail[1])
    assert len(set(digests.values())) == 1, digests
    pure, native = run_model("0", [whole]), run_model("1", [whole])
    assert pure[1] == native[1]
    assert pure[1] != digests[("0", "0")][1]  # the digests do see the readings


def test_a_build_is_taken_only_for_the_sources_it_was_made_from(tmp_path: Path) -> None:
    package, built = tmp_path / "models", tmp_path / "models" / "_compiled"
    built.mkdir(parents=True)
    for name in compiled.MODULES:
        shutil.copy(compiled.PACKAGE / f"{name}.py", package / f"{name}.py")
    assert not compiled.usable(built, package)  # no manifest
    (built / compiled.MANIFEST).write_text(json.dumps({"digest": compiled.digest(package)}))
    assert compiled.usable(built, package)
    with (package / "ridge.py").open("a") as f:
        f.write("# an edit\n")
    assert not compiled.usable(built, package)
    (built / compiled.MANIFEST).write_text("{not json")
    assert not compiled.usable(built, package)


def source_of(name: str) -> ModuleType:
    """A compiled module's Python source, loaded under a name of its own."""
    path = compiled.PACKAGE / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_source_of_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.parametrize("name", compiled.MODULES)
def test_the_compiled_modules_doctests_pass_on_their_source(name: str) -> None:
    """pytest cannot collect doctests from an extension module (see the root conftest.py):
    they run here on the Python source."""
    module = source_of(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_every_attribute_of_the_model_is_state_or_named_as_not() -> None:
    """The model's state is a list of names (compiled instances have no ``vars()``): an
    attribute added to the source but to neither list would silently drop out of
    checkpoints."""
    ridge = source_of("ridge")
    model = ridge.RidgeForecaster("s", ("a", "b"))
    assert set(vars(model)) == set(ridge._STATE) | set(ridge._NOT_STATE)
    assert not set(ridge._STATE) & set(ridge._NOT_STATE)
    assert set(model.state()) == set(ridge._STATE)
