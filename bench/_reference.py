"""Reference no-op endpoints, measured side by side with the service in the same run.

- ``POST /one``: a FastAPI route taking one reading as a pydantic model, answering 202: what
  the framework costs with the usual way of declaring a body.
- ``POST /parse-msgspec``: decodes a JSON array of readings with msgspec into typed structs
  and answers 202: the floor for parsing the same batch bodies the service takes.
- ``POST /parse-pydantic``: the same with a pydantic ``list[Reading]`` body parameter.

Nothing is kept: these only parse.
"""

from __future__ import annotations

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel


class Reading(BaseModel):
    sensor_id: str
    ts: float | None = None
    value: float


class ReadingStruct(msgspec.Struct):
    sensor_id: str
    value: float
    ts: float | None = None


_decode = msgspec.json.Decoder(list[ReadingStruct]).decode

app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/one", status_code=202)
async def one(reading: Reading) -> Response:
    return Response(status_code=202)


@app.post("/parse-pydantic", status_code=202)
async def parse_pydantic(readings: list[Reading]) -> Response:
    return Response(status_code=202)


@app.post("/parse-msgspec", status_code=202)
async def parse_msgspec(request: Request) -> Response:
    _decode(await request.body())
    return Response(status_code=202)
