"""The asyncio service on the real engine, sharing the session's worker (``service=``)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from _reference_engine import ReferenceEngine
from _waiting import engine_cpu_percent

from vllm_service import AsyncVLLMInferenceService, VLLMInferenceService, VLLMSettings

PROMPT = "The capital of France is"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 16}
ENDLESS: dict[str, Any] = {"max_tokens": 1500, "ignore_eos": True}


@pytest.fixture(scope="module")
def aservice(service: VLLMInferenceService) -> AsyncVLLMInferenceService:
    return AsyncVLLMInferenceService(service=service)


def test_every_call_gives_vllms_answer(
    aservice: AsyncVLLMInferenceService, reference: ReferenceEngine
) -> None:
    async def main() -> None:
        assert aservice.is_ready()
        await aservice.warmup()  # a worker that is ready stays as it is
        one = await aservice.generate(PROMPT, **GREEDY)
        assert one.text == reference.generate(PROMPT, **GREEDY)
        batch = await aservice.generate_batch([PROMPT, "Paris is"], **GREEDY)
        assert [r.text for r in batch] == [one.text, reference.generate("Paris is", **GREEDY)]
        chat = await aservice.chat(FRANCE, **GREEDY)
        assert chat.text == reference.chat(FRANCE, **GREEDY)
        chats = await aservice.chat_batch([FRANCE, FRANCE], **GREEDY)
        assert [r.text for r in chats] == [chat.text, chat.text]
        chunks = [c async for c in aservice.stream(PROMPT, **GREEDY)]
        assert "".join(c.text for c in chunks) == chunks[-1].result.text == one.text
        chunks = [c async for c in aservice.chat_stream(FRANCE, **GREEDY)]
        assert "".join(c.text for c in chunks) == chat.text
        status = await aservice.status()
        assert status.state == "ready" and status.in_flight == 0
        with pytest.raises(ValueError, match="temperature"):
            await aservice.generate(PROMPT, temperature=5)

    asyncio.run(main())


def test_a_thousand_tasks_make_no_thread_each(aservice: AsyncVLLMInferenceService) -> None:
    async def main() -> list[Any]:
        threads_before = threading.active_count()
        most = threads_before

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, threading.active_count())
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(
            *(aservice.generate(f"{k} + {k} =", temperature=0, max_tokens=1) for k in range(1000))
        )
        watcher.cancel()
        assert most <= threads_before + 1, f"{most - threads_before} threads were added"
        return results

    results = asyncio.run(main())
    assert len(results) == 1000 and all(r.completion_tokens == 1 for r in results)


def test_cancelling_a_task_aborts_its_request(aservice: AsyncVLLMInferenceService) -> None:
    pid = aservice.service.status().pid
    assert pid is not None

    async def main() -> None:
        task = asyncio.create_task(aservice.generate(PROMPT, **ENDLESS))
        await asyncio.sleep(2)
        assert (await aservice.status()).in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        stream = aservice.stream(PROMPT, **ENDLESS)
        await anext(stream)
        reader = asyncio.create_task(anext(stream))
        await asyncio.sleep(0)
        reader.cancel()  # cancelled while waiting for the next chunk
        with pytest.raises(asyncio.CancelledError):
            await reader

        async with aservice.stream(PROMPT, **ENDLESS) as stream:
            await anext(stream)

    asyncio.run(main())
    time.sleep(1.5)  # the engine settles (about 0.5 s of CPU) after an abort
    assert aservice.service.status().in_flight == 0
    assert engine_cpu_percent(pid) < 30, "the engine still generates for a cancelled task"


def test_own_worker_context_manager_and_shutdown(demo_model: Any) -> None:
    settings = VLLMSettings(model_path=demo_model, max_model_len=1024)
    with pytest.raises(TypeError, match="not both"):
        AsyncVLLMInferenceService(settings, service=VLLMInferenceService(settings))

    async def main() -> None:
        async with AsyncVLLMInferenceService(settings) as aservice:
            assert (await aservice.status()).state == "stopped"
        # shut down without ever starting: nothing ran, and later calls are refused
        with pytest.raises(Exception, match="shut down"):
            await aservice.generate(PROMPT)

    asyncio.run(main())
