"""REST routes of training, the same in the WebUI (`--api`) and in the standalone app (`python -m lora_ext ui`).

    POST /lora_ext/train                the configuration as JSON (the keys of the TOML file the CLI reads; the server
                                        sets output_dir/runs_dir) -> {"id": ..., "state": ...}
    POST /lora_ext/dataset/preview      the same JSON -> the dataset preview (counts, buckets, steps, problems)
    GET  /lora_ext/jobs                 every job, newest first
    GET  /lora_ext/jobs/{id}            id, state (queued | running | finished | failed | cancelled), step,
                                        total_steps, output, error, losses, lr, it_s, eta_s, samples, log_tail, ...
    POST /lora_ext/jobs/{id}/cancel     stop now (a checkpoint is written at the end of the step in progress)
    POST /lora_ext/jobs/{id}/stop       stop after the next scheduled checkpoint
    POST /lora_ext/jobs/{id}/save       write a checkpoint after the step in progress; training goes on
    POST /lora_ext/jobs/{id}/resume     a new job continuing that job's run
    GET  /lora_ext/jobs/{id}/events     server-sent events: the run's events as they are written (`?after=N`: from
                                        line N+1; each message's id is its line number, so a client can reconnect)
    GET  /lora_ext/runs                 stopped runs that can be resumed
    GET  /lora_ext/tools                the model tools, and the checkpoints and LoRAs their forms offer
    POST /lora_ext/tools/{tool}         run a model tool as a job (merge-model, merge-loras, resize, extract,
                                        convert; JSON as `TrainService.tool_args` reads it) -> {"id": ..., ...};
                                        follow it with /jobs/{id} (its `report` when it has finished)

Bad input is answered with 4xx and {"detail": "what is wrong and what to do"} (FastAPI's convention), plus "field"
when one option is at fault; nothing starts. 400: invalid option, 403: a path outside the server's roots, 404: unknown
job, 409: a job is already running (one at a time). With credentials (the WebUI's `--api-auth`, the app's `--auth`),
every route needs HTTP Basic authentication.

Routes take plain JSON (no pydantic models), so FastAPI 0.94 / pydantic 1 (A1111) and the newest work alike. No
`from __future__ import annotations` here: FastAPI reads the route functions' annotations (`Request`) at runtime.
"""

import asyncio
import base64
import binascii
import json
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from lora_ext.errors import ConfigError, LoraExtError
from lora_ext.train.jobs import JobConflict, JobNotFound
from lora_ext.ui.service import PathNotAllowed, TrainService

PREFIX = "/lora_ext"
SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0


def error_status(err: Exception) -> int:
    if isinstance(err, JobNotFound):
        return 404
    if isinstance(err, JobConflict):
        return 409
    if isinstance(err, PathNotAllowed):
        return 403
    return 400


def error_body(err: Exception) -> dict[str, Any]:
    body: dict[str, Any] = {"detail": str(err)}
    field = getattr(err, "field", None)
    if field:
        body["field"] = field
    return body


def check_basic_auth(header: str | None, credentials: Mapping[str, str]) -> bool:
    """True when `header` ("Basic base64(user:password)") matches one of `credentials` (user -> password)."""
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = credentials.get(user)
    return expected is not None and secrets.compare_digest(password.encode(), expected.encode())


def parse_credentials(text: str | None) -> dict[str, str]:
    """`user:pass[,user2:pass2]` (A1111's --api-auth format) -> {user: pass}."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if ":" in item:
            user, password = item.strip().split(":", 1)
            out[user] = password
    return out


def add_train_routes(app: Any, service: TrainService, *, credentials: Mapping[str, str] | None = None) -> None:
    """Add the routes above to a FastAPI app."""
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    def auth(request: Request) -> None:
        if credentials and not check_basic_auth(request.headers.get("authorization"), credentials):
            raise HTTPException(status_code=401, detail="authentication required (HTTP Basic, the server's "
                                                        "--api-auth / --auth credentials)",
                                headers={"WWW-Authenticate": "Basic"})

    deps = [Depends(auth)]

    def answer(fn: Callable[[], Any], status: int = 200) -> Any:
        try:
            return JSONResponse(fn(), status_code=status)
        except (LoraExtError, ValueError) as err:
            return JSONResponse(error_body(err), status_code=error_status(err))

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"the request body is not JSON ({exc}); send the options as a JSON object") from None
        if not isinstance(data, dict):
            raise ConfigError("the request body must be a JSON object of options (the TOML file's keys)")
        return data

    async def post_train(request: Request) -> Any:
        try:
            values = await body(request)
        except ConfigError as err:
            return JSONResponse(error_body(err), status_code=400)
        return answer(lambda: _job_summary(service.start(values)), 201)

    async def post_preview(request: Request) -> Any:
        try:
            values = await body(request)
        except ConfigError as err:
            return JSONResponse(error_body(err), status_code=400)
        return answer(lambda: {k: v for k, v in service.preview(values).items()})

    def get_jobs() -> Any:
        return answer(lambda: {"jobs": [j.to_dict() for j in service.runner.jobs()]})

    def get_job(job_id: str) -> Any:
        return answer(lambda: service.view(job_id))

    def post_cancel(job_id: str) -> Any:
        return answer(lambda: _job_summary(service.runner.cancel(job_id)))

    def post_stop(job_id: str) -> Any:
        return answer(lambda: _job_summary(service.runner.stop_after_checkpoint(job_id)))

    def post_save(job_id: str) -> Any:
        return answer(lambda: _job_summary(service.runner.save(job_id)))

    def post_resume(job_id: str) -> Any:
        return answer(lambda: _job_summary(service.resume(job_id)), 201)

    def get_runs() -> Any:
        return answer(lambda: {"runs": service.resumable_runs()})

    def get_events(job_id: str, after: int = 0) -> Any:
        try:
            service.runner.get(job_id)
        except JobNotFound as err:
            return JSONResponse(error_body(err), status_code=404)
        return StreamingResponse(sse_stream(service, job_id, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def get_tools() -> Any:
        from lora_ext.tools.job import TOOLS

        return answer(lambda: {"tools": list(TOOLS), "models": service.model_choices(),
                               "loras": service.lora_choices(), "checkpoint_dir": str(service.checkpoint_dir),
                               "lora_dir": str(service.roots.lora_dir)})

    async def post_tool(tool: str, request: Request) -> Any:
        try:
            values = await body(request)
        except ConfigError as err:
            return JSONResponse(error_body(err), status_code=400)
        return answer(lambda: _job_summary(service.run_tool(tool, values)), 201)

    kw: dict[str, Any] = {"dependencies": deps, "response_model": None}
    app.add_api_route(f"{PREFIX}/tools", get_tools, methods=["GET"], **kw)
    app.add_api_route(PREFIX + "/tools/{tool}", post_tool, methods=["POST"], **kw)
    app.add_api_route(f"{PREFIX}/train", post_train, methods=["POST"], **kw)
    app.add_api_route(f"{PREFIX}/dataset/preview", post_preview, methods=["POST"], **kw)
    app.add_api_route(f"{PREFIX}/jobs", get_jobs, methods=["GET"], **kw)
    app.add_api_route(PREFIX + "/jobs/{job_id}", get_job, methods=["GET"], **kw)
    app.add_api_route(PREFIX + "/jobs/{job_id}/cancel", post_cancel, methods=["POST"], **kw)
    app.add_api_route(PREFIX + "/jobs/{job_id}/stop", post_stop, methods=["POST"], **kw)
    app.add_api_route(PREFIX + "/jobs/{job_id}/save", post_save, methods=["POST"], **kw)
    app.add_api_route(PREFIX + "/jobs/{job_id}/resume", post_resume, methods=["POST"], **kw)
    app.add_api_route(PREFIX + "/jobs/{job_id}/events", get_events, methods=["GET"], **kw)
    app.add_api_route(f"{PREFIX}/runs", get_runs, methods=["GET"], **kw)


def _job_summary(job: Any) -> dict[str, Any]:
    return {"id": job.id, "state": job.state, "name": job.name, "run_dir": job.run_dir}


async def sse_stream(service: TrainService, job_id: str, after: int = 0) -> AsyncIterator[bytes]:
    """Server-sent events of a job: each event of its run (`id:` line number, `event:` type, `data:` JSON), then a
    final `end` event with the job's state once it has ended and every event was sent."""
    sent, idle = after, 0.0
    while True:
        job = service.runner.get(job_id)
        ended = job.state not in ("queued", "running")
        fresh = list(service.events(job_id, sent))
        for n, event in fresh:
            sent = n
            yield f"id: {n}\nevent: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n".encode()
        if ended and not fresh:
            yield f"event: end\ndata: {json.dumps({'id': job.id, 'state': job.state})}\n\n".encode()
            return
        if fresh:
            idle = 0.0
        else:
            idle += SSE_POLL_S
            if idle >= SSE_KEEPALIVE_S:
                idle = 0.0
                yield b": keep-alive\n\n"
        await asyncio.sleep(SSE_POLL_S)
