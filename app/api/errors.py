"""Error bodies: the reason, never internals.

Routes answer every foreseeable failure themselves with a 4xx or 503; this handler is the last
resort for a bug, so that even then the client gets JSON without a stack trace (which goes to
the server's log instead).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

log = logging.getLogger(__name__)


async def internal_error(request: Request, exc: Exception) -> Response:
    """500 with a plain reason; the traceback is logged, not sent."""
    log.error(
        "%s %s failed with %s", request.method, request.url.path, type(exc).__name__, exc_info=exc
    )
    return JSONResponse({"detail": "internal error"}, status_code=500)


def install(app: FastAPI) -> None:
    """Register the last-resort handler on ``app``."""
    app.add_exception_handler(Exception, internal_error)
