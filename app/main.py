"""``create_app(settings)``: the FastAPI app and the lifespan that wires the pipeline.

Start-up enters, in data-flow order: the backend, the prediction hub, then the pipeline
(model processes warmed before readiness says yes). Shutdown runs in reverse: ingestion stops
and the batchers drain, the model processes stop, subscribers are flushed and closed with
1001, and the backend disconnects last.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope as AsgiScope, Send

from app import __version__
from app.access import Scope
from app.api import (
    alarms,
    dashboard,
    debug,
    docs,
    errors,
    health,
    metrics as metrics_api,
    predictions,
    readings,
    sensors,
)
from app.api.auth import Guard, require
from app.api.deps import Ingest, State
from app.api.hosts import HostPolicy, TrustedHostMiddleware
from app.backends import backend_from_url, load, topology_of
from app.config import Settings
from app.edge import Edge
from app.logs import RequestIdMiddleware
from app.looplag import LoopLagMonitor
from app.metrics import Metrics
from app.models import COMPILED
from app.models.base import load_model_class
from app.pipeline.hub import PredictionHub
from app.pipeline.ingest import BodyBudget
from app.scheduling import shorten_loop_slice

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build a fresh app; nothing starts until the lifespan runs."""
    settings = settings or Settings()
    # Fail fast, in the parent, on a model path that cannot work.
    load_model_class(settings.model)
    guard = Guard.from_settings(settings)
    metrics = Metrics()
    loop_lag = LoopLagMonitor()
    edge = Edge(settings)
    metrics.edge = edge.refusals
    hosts = HostPolicy.for_settings(settings.trusted_hosts, settings.host)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        guard.on_startup()
        log.info(
            "the default model runs %s",
            "compiled (app/models/_compiled)"
            if COMPILED
            else "from its Python source (`python -m app.models.build` compiles it)",
        )
        if hosts.any:
            log.info("any Host header is served (SENSORCAST_TRUSTED_HOSTS lists the names)")
        else:
            log.info("Host names served: %s", ", ".join(hosts.patterns))
        async with AsyncExitStack() as stack:
            shorten_loop_slice(settings.loop_slice_us)
            await stack.enter_async_context(loop_lag)
            topology = topology_of(settings.backend)
            backend = backend_from_url(
                settings.backend,
                timeout_s=settings.redis_timeout_s,
                min_replicas=settings.redis_min_replicas,
                replica_timeout_ms=settings.redis_replica_timeout_ms,
                max_pending_messages=settings.publish_max_pending_messages,
            )
            await backend.connect()
            stack.push_async_callback(backend.disconnect)
            hub = PredictionHub(
                backend,
                history_max_frames=settings.history_max_frames,
                history_max_bytes=settings.history_max_bytes,
                history_max_age_s=settings.history_max_age_s,
                subscriber_queue_frames=settings.subscriber_queue_frames,
                policy=settings.slow_client_policy,
                stall_timeout_s=settings.ws_stall_timeout_s,
            )
            await stack.enter_async_context(hub)
            # Embedded: the model stage runs here. API replica on Redis: readings go to
            # Redis and ``sensorcast worker`` runs the model stage.
            pipeline: Ingest = load(topology.ingest, topology.extra)(settings, backend)
            pipeline.observer = metrics.observe_batch
            metrics.bind(pipeline.stage, hub, loop_lag)
            pipeline.on_evict = hub.evict
            stack.callback(metrics.bind, None, None, None)

            async def drain() -> None:
                # Graceful stop: refuse readings, finish accepted ones, deliver them, close.
                await pipeline.stop()
                await hub.settle(pipeline.last_seq, settings.shutdown_timeout_s)
                await hub.close_subscribers(timeout_s=min(5.0, settings.shutdown_timeout_s))

            stack.push_async_callback(drain)
            await pipeline.start()
            app.state.drain = drain
            # What start-up made lives as long as the process: keep it out of every full
            # collection, whose pauses stall the event loop.
            gc.freeze()
            # Start-up stalls the loop by design; it is not lag anyone should be paged for.
            loop_lag.reset()
            log.info(
                "sensorcast %s ready: backend %s, %d workers, model %s",
                __version__, backend.url, settings.workers, settings.model,
            )  # fmt: skip
            yield {"settings": settings, "pipeline": pipeline, "hub": hub}

    app = Service(
        title="sensorcast",
        version=__version__,
        summary="Live predictions on sensor streams.",
        lifespan=lifespan,
        # Served by app.api.docs from bundled assets: FastAPI's own pages need the internet.
        docs_url=None,
        redoc_url=None,
    )
    app.state.drain = _nothing_to_drain
    app.state.guard = guard
    app.state.edge = edge
    app.state.bodies = BodyBudget(
        settings.max_pending_body_bytes,
        large_body_bytes=settings.max_body_bytes // 8,
        max_body_bytes=settings.max_body_bytes,
    )
    errors.install(app)
    app.state.metrics = metrics
    app.state.loop_lag = loop_lag
    app.include_router(readings.router)
    app.include_router(predictions.router)
    app.include_router(sensors.router, dependencies=[require(Scope.subscribe)])
    app.include_router(alarms.router)
    app.include_router(health.router)
    app.include_router(metrics_api.router, dependencies=[require(Scope.admin)])
    app.include_router(dashboard.router)
    app.include_router(docs.router)
    app.include_router(debug.router, dependencies=[require(Scope.admin)])
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    app.mount(docs.ASSETS_URL, StaticFiles(directory=docs.ASSETS_DIR), name="static-docs")
    # Request ids, the access log and request metrics wrap everything, then the trusted-host
    # check. The ingest route is served ahead of the framework (see Service), behind the same
    # two, and again inside them for an app served without Service.__call__.
    app.add_middleware(readings.IngestEndpoint)
    app.add_middleware(TrustedHostMiddleware, policy=hosts, refusals=edge.refusals)
    app.add_middleware(
        RequestIdMiddleware, access=settings.access_log, observe=metrics.requests.observe
    )
    app.ingest_front = RequestIdMiddleware(
        TrustedHostMiddleware(
            readings.IngestEndpoint(app.framework), policy=hosts, refusals=edge.refusals
        ),
        access=settings.access_log,
        observe=metrics.requests.observe,
    )
    return app


class Service(FastAPI):
    """The FastAPI app, with POST /v1/readings taken before the framework's own layers.

    A single-reading POST does little work of its own, so the layers every request passes
    through before the routes (the framework's error and telemetry middleware, its body
    limit, the app's call) took about a sixth of its CPU. :attr:`ingest_front` serves that one route
    with only what it needs: request ids, access log and request metrics, the trusted-host
    check and :class:`~app.api.readings.IngestEndpoint`, which answers a failure nobody
    foresaw with the same JSON 500 as the app's last-resort handler.
    """

    ingest_front: ASGIApp | None = None

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        front = self.ingest_front
        if (
            front is not None
            and scope["type"] == "http"
            and scope["path"] == readings.PATH
            and scope["method"] == "POST"
            and not self.root_path
        ):
            scope["app"] = self
            await front(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def framework(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        """The app through the framework's layers, for whatever the front does not serve."""
        await FastAPI.__call__(self, scope, receive, send)


async def _nothing_to_drain() -> None:
    return None


Drain = Callable[[], Awaitable[None]]
