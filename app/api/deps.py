"""Typed access to the objects the lifespan owns."""

from __future__ import annotations

from typing import Annotated, TypedDict

from fastapi import Depends, Request, WebSocket

from app.config import Settings
from app.pipeline.hub import PredictionHub
from app.pipeline.pipeline import Pipeline


class State(TypedDict):
    settings: Settings
    pipeline: Pipeline
    hub: PredictionHub


def _settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


def _pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline = request.state.pipeline
    return pipeline


def _hub(request: Request) -> PredictionHub:
    hub: PredictionHub = request.state.hub
    return hub


def _ws_hub(websocket: WebSocket) -> PredictionHub:
    hub: PredictionHub = websocket.state.hub
    return hub


def _ws_settings(websocket: WebSocket) -> Settings:
    settings: Settings = websocket.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(_settings)]
PipelineDep = Annotated[Pipeline, Depends(_pipeline)]
HubDep = Annotated[PredictionHub, Depends(_hub)]
WsHubDep = Annotated[PredictionHub, Depends(_ws_hub)]
WsSettingsDep = Annotated[Settings, Depends(_ws_settings)]
