"""The service in local mode, against the real demo model on vLLM (one engine for the session).

Answers are compared with vLLM's own (``reference``: a plain ``vllm.LLM``, same prompt and
settings), never with what the small model happens to know.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from _reference_engine import ReferenceEngine

from vllm_service import GenerationParams, GenerationResult, VLLMInferenceService, VLLMSettings

GREEDY = GenerationParams(temperature=0)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_greedy_answer(service: VLLMInferenceService, reference: ReferenceEngine) -> None:
    result = service.chat(FRANCE, GREEDY)
    assert result.text == reference.chat(FRANCE, temperature=0)
    assert result.text and result.finish_reason == "stop"
    assert result.error is None
    assert result.prompt_tokens > 10  # the chat template wraps the question
    assert result.total_tokens == result.prompt_tokens + result.completion_tokens


def test_generate_counts_tokens_and_stops_at_max_tokens(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    result = service.generate("The capital of France is", temperature=0, max_tokens=5)
    assert result.text == reference.generate("The capital of France is", temperature=0, max_tokens=5)
    assert result.finish_reason == "length"
    assert result.completion_tokens == 5
    assert result.prompt_tokens == 5


def test_stop_sequence(service: VLLMInferenceService, reference: ReferenceEngine) -> None:
    unstopped = reference.generate("1, 2, 3, 4,", temperature=0, max_tokens=30)
    # a character the greedy answer reaches half way
    stop = next(c for c in unstopped[len(unstopped) // 2 :] if not c.isspace())
    result = service.generate("1, 2, 3, 4,", temperature=0, max_tokens=30, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == unstopped[: unstopped.index(stop)]


def test_keyword_overrides_win_over_params(service: VLLMInferenceService) -> None:
    params = GenerationParams(temperature=0, max_tokens=30)
    result = service.generate("The capital of France is", params, max_tokens=2)
    assert result.completion_tokens == 2


def test_generate_batch_keeps_order(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    prompts = [f"{i}, {i + 1}, {i + 2}, {i + 3}," for i in (10, 20, 30, 40)]
    results = service.generate_batch(prompts, temperature=0, max_tokens=3)
    expected = [reference.generate(p, temperature=0, max_tokens=3) for p in prompts]
    assert [r.text for r in results] == expected
    assert len(set(expected)) == 4  # distinct answers, so a mix-up would show
    assert service.generate_batch([]) == []


def test_chat_batch_and_multi_turn(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    conversations = [
        FRANCE,
        [{"role": "system", "content": "You are a pirate. Answer like one."}, *FRANCE],
    ]
    results = service.chat_batch(conversations, GREEDY)
    assert [r.text for r in results] == [reference.chat(c, temperature=0) for c in conversations]
    follow_up = [*FRANCE, {"role": "assistant", "content": results[0].text},
                 {"role": "user", "content": "And what is the capital of Germany?"}]
    assert service.chat(follow_up, GREEDY).text == reference.chat(follow_up, temperature=0)


def test_bad_prompts_fail_alone(service: VLLMInferenceService, reference: ReferenceEngine) -> None:
    worker_pid = service.status().pid
    too_long = "hello " * 3000  # the service's max_model_len is 2048
    results = service.generate_batch(["", "The capital of France is", too_long], temperature=0, max_tokens=3)
    empty, good, long = results
    assert empty.finish_reason == "error" and "empty" in empty.error and empty.text == ""
    assert long.finish_reason == "error" and "maximum context length" in long.error
    assert good.finish_reason == "length"
    assert good.text == reference.generate("The capital of France is", temperature=0, max_tokens=3)
    # the worker survived and still answers
    assert service.status().pid == worker_pid
    assert service.chat(FRANCE, GREEDY).text == reference.chat(FRANCE, temperature=0)


def test_bad_arguments_raise_at_the_call(service: VLLMInferenceService) -> None:
    with pytest.raises(TypeError, match="prompt must be a str"):
        service.generate(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of prompts"):
        service.generate_batch("one prompt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'role' and 'content'"):
        service.chat([{"text": "hi"}])
    with pytest.raises(ValueError, match="temperature"):
        service.generate("hi", temperature=-1)
    with pytest.raises(ValueError, match="temperature"):
        service.generate("hi", temperature=2.5)  # vLLM's own limit is 2
    with pytest.raises(TypeError, match="unknown generation parameter"):
        service.generate("hi", temprature=0)


def test_32_threads_each_get_their_own_answer(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    starts = list(range(100, 132))
    results: dict[int, GenerationResult] = {}

    def prompt(start: int) -> str:
        return f"{start}, {start + 1}, {start + 2}, {start + 3},"

    def ask(start: int) -> None:
        results[start] = service.generate(prompt(start), temperature=0, max_tokens=8)

    threads = [threading.Thread(target=ask, args=(s,)) for s in starts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == starts
    for start, result in results.items():
        expected = reference.generate(prompt(start), temperature=0, max_tokens=8)
        assert result.text == expected, (start, result.text, expected)


def test_short_request_overtakes_a_long_one(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    finished_at: dict[str, float] = {}
    long_result: list[GenerationResult] = []

    def long_request() -> None:
        long_result.append(service.generate("Tell me a story.", max_tokens=400, ignore_eos=True))
        finished_at["long"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(2.0)  # the long one is generating by now
    short = service.generate("The capital of France is", temperature=0, max_tokens=4)
    finished_at["short"] = time.monotonic()
    thread.join(timeout=300)
    assert short.text == reference.generate("The capital of France is", temperature=0, max_tokens=4)
    assert long_result[0].completion_tokens == 400
    assert finished_at["short"] < finished_at["long"] - 1.0


def test_the_engine_gets_vllms_variables_and_none_of_the_services_settings(
    demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM warns about each ``VLLM_*`` name it does not know (or refuses it, with its strict
    validation) and takes ``VLLM_API_KEY`` for a server's key: the worker, which has its
    settings in its config, keeps the service's own out of what vLLM reads and inherits."""
    import psutil
    from vllm import envs

    from vllm_service.settings import is_service_variable

    # The one name both ours and vLLM's is its server's key, which no engine here needs.
    ours = {f"VLLM_{name.upper()}" for name in VLLMSettings.model_fields}
    assert ours & set(envs.environment_variables) == {"VLLM_API_KEY"}
    settings = VLLMSettings(model_path=demo_model, max_model_len=1024)
    # Read by nobody now: the service's settings are made.
    for name, value in {
        "VLLM_MODEL_PATH": "/nowhere", "VLLM_MODE": "local", "VLLM_API_KEY": "a-servers-key",
        "VLLM_IDLE_TTL_SECONDS": "5", "VLLM_ENGINE_STALL_SECONDS": "600",
    }.items():
        monkeypatch.setenv(name, value)
    # setproctitle writes a title over /proc's copy of the environment unless told not to.
    monkeypatch.setenv("SPT_NOENV", "1")
    # vLLM's engine core in a process of its own (on CPU it runs in the worker's otherwise):
    # /proc shows what that process, started by vLLM after the worker's start, inherited.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with VLLMInferenceService(settings) as service:
        service.warmup()  # a worker started with them in its parent's environment
        pid = service.status().pid
        assert pid is not None
        log = Path(os.readlink(f"/proc/{pid}/fd/1"))  # the worker's output goes to its log
        assert "Unknown vLLM environment variable" not in log.read_text(errors="replace")
        # /proc shows the environment a process was started with: the worker's still lists
        # them, its engine process (started after it took them out) does not.
        children = psutil.Process(pid).children(recursive=True)
        engines = [child for child in children if "EngineCore" in " ".join(child.cmdline())]
        assert engines, [child.cmdline()[:1] for child in children]
        for engine in engines:
            environ = engine.environ()
            assert not [name for name in environ if is_service_variable(name)]
            assert environ["VLLM_CPU_KVCACHE_SPACE"] == os.environ["VLLM_CPU_KVCACHE_SPACE"]


def test_is_ready_repr_and_status(service: VLLMInferenceService) -> None:
    service.generate("Hello", max_tokens=1)
    assert service.is_ready()
    assert "ready" in repr(service)
    status = service.status()
    assert status.state == "ready" and status.pid and status.mode == "local"
    assert status.in_flight == 0 and status.requests_served > 0
    assert status.load_seconds and status.load_seconds > 1
    assert status.expires_at and status.expires_at > time.time() + 1800  # the session's TTL
    assert status.memory_bytes > 100 << 20
    assert status.last_error is None


def test_results_carry_request_ids_and_timings_and_metrics_count_them(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    before = service.metrics()
    prompts = [f"{n}, {n + 1}, {n + 2}," for n in range(10, 18)]
    results: dict[str, GenerationResult] = {}

    def ask(prompt: str) -> None:
        results[prompt] = service.generate(prompt, temperature=0, max_tokens=6, ignore_eos=True)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    streamed = list(service.stream(prompts[0], temperature=0, max_tokens=6, ignore_eos=True))
    answered = [*results.values(), streamed[-1].result]
    assert len(answered) == 9 and all(r is not None for r in answered)
    for prompt, result in results.items():  # the deltas vLLM sends, merged, are its answer
        expected = reference.generate(prompt, temperature=0, max_tokens=6, ignore_eos=True)
        assert result.text == expected
    assert len({r.request_id for r in answered}) == 9
    for result in answered:
        timings = result.timings
        assert timings is not None and timings.first_token_at is not None
        assert timings.queued_at <= timings.first_token_at <= timings.finished_at
        assert timings.finished_at <= time.time()
        # Six tokens take five more steps after the first.
        assert 0 < timings.time_to_first_token_seconds < timings.latency_seconds < 60

    after = service.metrics()
    assert after.finish_reasons.get("length", 0) - before.finish_reasons.get("length", 0) == 9
    assert after.generation_tokens - before.generation_tokens == 9 * 6
    assert after.prompt_tokens - before.prompt_tokens == sum(r.prompt_tokens for r in answered)
    assert after.latency.count - before.latency.count == 9
    assert after.time_to_first_token.count - before.time_to_first_token.count == 9
    assert after.latency.sum - before.latency.sum == pytest.approx(
        sum(r.timings.latency_seconds for r in answered if r.timings)
    )
    assert (after.state, after.waiting, after.running) == ("ready", 0, 0)
    assert after.load_seconds == service.status().load_seconds
    status = service.status()
    assert status.log_path and status.waiting == 0 and status.gpu_memory_bytes is None
