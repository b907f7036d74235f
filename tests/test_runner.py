"""The shard runner on its own, with a real model process: order, checkpoints, a process
rebuilt and replayed exactly, a poison reading isolated."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import zlib
from concurrent.futures import BrokenExecutor
from typing import Any

import msgspec
import pytest

from app.models.base import ModelOptions
from app.pipeline import shard, wire
from app.pipeline.runner import ProcessSpec, ShardRunner
from app.schemas import Reading
from app.simulate import SensorSim
from tests.models import FAILS, POISON, REFITS, die_while_sending_a_result

RIDGE = "app.models.ridge:RidgeForecaster"
VOLATILE = ("ingested_at", "predicted_at", "swapped_at")


def readings(sensors: int, per_sensor: int, channels: int = 1, seed: int = 3) -> list[Reading]:
    """Interleaved readings of several simulated sensors, in ``ts`` order per sensor."""
    columns = []
    for s in range(sensors):
        sim = SensorSim(f"r{s}", channels=channels, seed=seed + s, anomaly_rate=0.01)
        ts, values, _ = sim.take(per_sensor)
        columns.append(
            [
                Reading(sim.sensor_id, str(i), t, sim.names, tuple(row), t)
                for i, (t, row) in enumerate(zip(ts.tolist(), values.tolist(), strict=True))
            ]
        )
    return [columns[s][i] for i in range(per_sensor) for s in range(sensors)]


def messages(outcomes: list[wire.BatchOutcome]) -> list[tuple[str, dict[str, Any]]]:
    """Every message of the outcomes, in order, without its wall-clock times."""
    out = []
    for outcome in outcomes:
        for kind, _, _, body in wire.decode_bodies(outcome.payload):
            fields = json.loads(body)
            for key in VOLATILE:
                fields.pop(key, None)
            out.append((kind, fields))
    return out


def chunks(items: list[Reading], size: int) -> list[list[Reading]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def run_all(runner: ShardRunner, batches: list[list[Reading]]) -> list[wire.BatchOutcome]:
    futures = [runner.submit(wire.pack(batch)) for batch in batches]
    return [(await f).outcome for f in futures]


async def test_outcomes_come_back_in_order_whatever_the_batch_sizes() -> None:
    """Batches of 1,000, or of 7: the same messages in the same order, fits included."""
    data = readings(sensors=5, per_sensor=300)
    got = []
    for size in (1_000, 7):
        async with ShardRunner(0, ProcessSpec(RIDGE)) as runner:
            got.append(messages(await run_all(runner, chunks(data, size))))
    assert got[0] == got[1]
    kinds = [kind for kind, _ in got[0]]
    assert kinds.count("prediction") == len(data)
    assert kinds.count("model") >= 5, "every sensor is fitted (its first fit at 48 readings)"


async def test_a_killed_process_is_rebuilt_and_replayed_exactly() -> None:
    """SIGKILL the process between batches: after the rebuild (checkpoint + replay) its
    predictions are exactly those of a process that never died."""
    data = chunks(readings(sensors=4, per_sensor=500), 200)
    async with ShardRunner(0, ProcessSpec(RIDGE)) as steady:
        expected = messages(await run_all(steady, data))
    async with ShardRunner(0, ProcessSpec(RIDGE), checkpoint_every_readings=700) as runner:
        before = await run_all(runner, data[:6])
        await runner.call(os.getpid)  # everything queued before it has completed
        assert runner.checkpoints == 1, "a checkpoint was taken after 700 readings"
        assert runner.pid is not None
        os.kill(runner.pid, signal.SIGKILL)
        after = await run_all(runner, data[6:])
        assert runner.recoveries == 1 and runner.rebuilds == 1 and runner.healthy
    assert messages(before + after) == expected


async def test_a_poison_reading_is_isolated_by_bisection() -> None:
    """A reading that kills the process every time gets an error; its neighbours do not."""
    data = [Reading(f"p{i % 5}", str(i), 1e9 + i, ("value",), (float(i),), 0.0) for i in range(300)]
    data[137] = msgspec.structs.replace(data[137], values=(POISON,))
    spec = ProcessSpec("tests.models:Poisoned", ModelOptions(warmup_readings=16))
    async with ShardRunner(0, spec) as runner:
        [outcome] = await run_all(runner, [data])
        assert runner.poisoned == 1
        # The shard carries on with what it had learnt.
        [later] = await run_all(runner, [data[:1]])
    statuses = {f["id"]: f["status"] for kind, f in messages([outcome]) if kind == "prediction"}
    assert len(statuses) == 300 and statuses["137"] == "error"
    assert all(status != "error" for i, status in statuses.items() if i != "137")
    assert messages([later])[0][1]["status"] == "ok"


def test_a_model_frame_after_a_failed_reading_carries_its_ts() -> None:
    """A model refitted on the reading after one it failed on: the model frame comes right
    after the failed reading's error prediction, with that reading's ``ts``."""
    shard.init_process("tests.models:RefitsThenFails", ModelOptions(warmup_readings=100))
    values = (1.0, 2.0, FAILS, REFITS, 3.0)
    data = [Reading("f", str(i), 1e9 + i, ("value",), (v,), 0.0) for i, v in enumerate(values)]
    outcome = shard.run_batch(wire.encode_readings(data))
    out = messages([outcome])
    kinds = [(kind, f.get("id"), f.get("status")) for kind, f in out]
    assert kinds == [
        ("prediction", "0", "warming_up"), ("prediction", "1", "warming_up"),
        ("prediction", "2", "error"), ("model", None, None),
        ("prediction", "3", "warming_up"), ("prediction", "4", "warming_up"),
    ]  # fmt: skip
    model = out[3][1]
    assert model["model_version"] == 1
    assert model["ts"] == out[2][1]["ts"] == "2001-09-09T01:46:42Z"


async def test_calls_queued_during_a_recovery_run_after_it_in_order() -> None:
    """Batches submitted while the runner recovers wait for the new process, in order."""
    data = chunks(readings(sensors=2, per_sensor=200), 50)
    async with ShardRunner(0, ProcessSpec(RIDGE)) as runner:
        await run_all(runner, data[:2])
        assert runner.pid is not None
        os.kill(runner.pid, signal.SIGKILL)
        futures = [runner.submit(wire.pack(batch)) for batch in data[2:]]
        done = await asyncio.gather(*futures)
    ids = [f["id"] for d in done for kind, f in messages([d.outcome]) if kind == "prediction"]
    assert ids == [r.id for batch in data[2:] for r in batch]


async def test_checkpoints_follow_the_reading_cadence() -> None:
    """A checkpoint right behind the batch that reaches ``checkpoint_every_readings``."""
    data = chunks(readings(sensors=2, per_sensor=500), 100)
    async with ShardRunner(0, ProcessSpec(RIDGE), checkpoint_every_readings=250) as runner:
        await run_all(runner, data)
        await runner.call(os.getpid)  # everything queued before it has completed
        assert runner.checkpoints == 3  # after 300, 600 and 900 readings


def test_exported_models_import_exactly_and_so_do_uncompressed_blobs() -> None:
    """A checkpoint is compressed and restores the models as they were; a plain pickle, as a
    Redis partition saved by an older worker holds, restores the same."""
    data = readings(sensors=3, per_sensor=400)
    shard.init_process(RIDGE, ModelOptions())
    shard.run_batch(wire.encode_readings(data[:900]))
    blob = shard.export_states()
    plain = pickle.dumps(pickle.loads(zlib.decompress(blob)), protocol=pickle.HIGHEST_PROTOCOL)
    assert len(blob) < 0.8 * len(plain)  # the simulator's noise compresses least
    expected = messages([shard.run_batch(wire.encode_readings(data[900:]))])
    for checkpoint in (blob, plain):
        shard.init_process(RIDGE, ModelOptions())
        assert sorted(shard.import_states(checkpoint)) == ["r0", "r1", "r2"]
        assert messages([shard.run_batch(wire.encode_readings(data[900:]))]) == expected


async def test_a_process_that_dies_half_way_through_a_result_is_rebuilt() -> None:
    """A model process gone in the middle of sending a result (the rest never comes) is
    found dead like any other, not waited on for ever: the call fails, the process is
    rebuilt, and the shard goes on."""
    data = chunks(readings(sensors=2, per_sensor=100), 50)
    async with ShardRunner(0, ProcessSpec(RIDGE)) as runner:
        await run_all(runner, data[:2])
        victim = runner.pid
        with pytest.raises(BrokenExecutor):
            await asyncio.wait_for(runner.call(die_while_sending_a_result), 30)
        assert runner.rebuilds >= 1 and runner.pid != victim
        done = await asyncio.wait_for(run_all(runner, data[2:]), 30)
    ids = [f["id"] for kind, f in messages(done) if kind == "prediction"]
    assert ids == [r.id for batch in data[2:] for r in batch]
