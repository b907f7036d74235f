"""Typed access to the objects the lifespan owns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Protocol, TypedDict

from fastapi import Depends, Request, WebSocket

from app.backends.base import Backend
from app.config import Settings
from app.metrics import ModelStage
from app.pipeline.batcher import BatchObserver
from app.pipeline.hub import PredictionHub
from app.schemas import Reading


class Ingest(Protocol):
    """What the API needs of the model stage: the embedded ``Pipeline`` or ``RemoteIngest``
    (chosen by the backend's scheme, see ``app/backends/__init__.py``)."""

    observer: BatchObserver | None
    """Told of each batch published here (the embedded topology only)."""
    on_evict: Callable[[list[str]], object] | None
    """Told the ids of sensors evicted for being idle (the embedded topology only)."""

    def __init__(self, settings: Settings, backend: Backend) -> None: ...

    @property
    def stage(self) -> ModelStage | None:
        """The model stage running in this process, for the metrics; None on Redis."""
        ...

    @property
    def last_seq(self) -> int:
        """The highest seq published from this process (0 where it publishes nothing)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def offer(
        self, readings: list[Reading], deadline: float | None = None
    ) -> tuple[int, int]:
        """Admit a request's readings whole: (accepted, duplicates). ``deadline`` (the event
        loop's clock) is how long the embedded pipeline may wait for room; None: at once."""
        ...

    async def checks(self) -> dict[str, bool]: ...

    def describe(self) -> dict[str, Any]: ...


class State(TypedDict):
    settings: Settings
    pipeline: Ingest
    hub: PredictionHub


# Coroutines on purpose: FastAPI runs a plain-function dependency in its thread pool, which
# costs more than the lookup itself on every request.
async def _settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def _pipeline(request: Request) -> Ingest:
    pipeline: Ingest = request.state.pipeline
    return pipeline


async def _hub(request: Request) -> PredictionHub:
    hub: PredictionHub = request.state.hub
    return hub


async def _ws_hub(websocket: WebSocket) -> PredictionHub:
    hub: PredictionHub = websocket.state.hub
    return hub


async def _ws_settings(websocket: WebSocket) -> Settings:
    settings: Settings = websocket.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(_settings)]
PipelineDep = Annotated[Ingest, Depends(_pipeline)]
HubDep = Annotated[PredictionHub, Depends(_hub)]
WsHubDep = Annotated[PredictionHub, Depends(_ws_hub)]
WsSettingsDep = Annotated[Settings, Depends(_ws_settings)]
