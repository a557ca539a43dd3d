"""A streaming chat endpoint: FastAPI, server-sent events, one AsyncVLLMInferenceService.

    .venv/bin/python examples/streaming_server.py --port 8000        # the demo model
    curl -N localhost:8000/chat -H 'content-type: application/json' -d '{"message": "Hi!"}'

Each answer streams as SSE events: ``data: {"text": ...}`` per piece, then
``data: {"done": true, ...}`` with the finish reason and token counts. A client that hangs
up stops its generation in the engine. ``GET /status`` shows the worker (``ServiceStatus``).
The model is the demo model unless VLLM_MODEL_PATH says otherwise; every other VLLM_*
setting applies as usual.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from vllm_service import AsyncVLLMInferenceService, VLLMSettings, demo_model_path


class ChatRequest(BaseModel):
    message: str
    max_tokens: int = 128
    temperature: float = 0.7


def make_app(settings: VLLMSettings) -> FastAPI:
    service = AsyncVLLMInferenceService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.warmup()  # load the model before the first request
        yield
        await service.shutdown()

    app = FastAPI(lifespan=lifespan)

    @app.post("/chat")
    async def chat(request: ChatRequest) -> StreamingResponse:
        try:  # checked now: a bad value gets an error answer, not a broken stream
            stream = service.chat_stream(
                [{"role": "user", "content": request.message}],
                max_tokens=request.max_tokens,
                temperature=request.temperature,
            )
        except (TypeError, ValueError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

        async def events() -> AsyncIterator[str]:
            async with stream:  # leaving early (the client hung up) aborts the request
                async for chunk in stream:
                    if chunk.text:
                        yield f"data: {json.dumps({'text': chunk.text})}\n\n"
                    if chunk.result is not None:
                        done = {
                            "done": True,
                            "finish_reason": chunk.result.finish_reason,
                            "error": chunk.result.error,
                            "prompt_tokens": chunk.result.prompt_tokens,
                            "completion_tokens": chunk.result.completion_tokens,
                        }
                        yield f"data: {json.dumps(done)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/status")
    async def status() -> dict:
        return dataclasses.asdict(await service.status())

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if "VLLM_MODEL_PATH" in os.environ:
        settings = VLLMSettings()
    else:
        settings = VLLMSettings(model_path=demo_model_path(), max_model_len=2048)
    uvicorn.run(make_app(settings), host=args.host, port=args.port)
