"""Remote mode against a real vLLM OpenAI-compatible server started by this module.

One server engine serves the whole module, started with ``--api-key`` and two served model
names; the last test stops it and starts it again without either (the service must recover),
which covers the key-less server and the default naming (by path). Tests run in file order:
keep the restart test last.

Failures the real server does not make on demand (5xx answers, silence, another model) come
from a small stand-in HTTP server on loopback (:class:`StandIn`), in place of the real one or
in front of it, passing on what it does not answer itself and counting requests.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import http.server
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from _lora_adapter import PeftScorer, make_adapter
from _reference_engine import ReferenceEngine, engine_dtype
from _waiting import wait_until
from pydantic import BaseModel, Field

from vllm_service import (
    AsyncVLLMInferenceService,
    GenerationParams,
    RemoteServerError,
    RequestAbortedError,
    ServiceShutdownError,
    VLLMInferenceService,
    VLLMSettings,
)
from vllm_service.testing import worker_config

API_KEY = "remote-test-key-5f3a9c"
SERVED_NAMES = ["smol-a", "smol-b"]
LORA_NAME = "smol-lora"
STARTUP_SECONDS = 240  # about 40 s alone; the machine is shared with other engines


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` in its own process group."""

    def __init__(self, model: Path, log_path: Path, extra_args: list[str] | None = None) -> None:
        self.model = str(model)
        self.extra_args = extra_args or []  # on every start
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, api_key: str | None = None, served_names: list[str] | None = None) -> None:
        # The server reads VLLM_* variables itself (VLLM_API_KEY is its key): pass on only
        # the ones meant for it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
        env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # for load_lora / unload_lora
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            "2048",
            "--enforce-eager",
            # The dtype the service's own engines get on this processor (float32 without
            # native bf16), or VLLM_DTYPE.
            "--dtype",
            engine_dtype(),
        ]
        command += self.extra_args
        if api_key:
            command += ["--api-key", api_key]
        if served_names:
            command += ["--served-model-name", *served_names]
        # A file, not a pipe: vLLM's engine processes keep inherited pipes open.
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(
            f"vLLM server not healthy within {STARTUP_SECONDS} s; see {self.log_path}"
        )

    def stop(self) -> None:
        """SIGTERM to the server alone, which shuts its engine down and lets it remove its
        /dev/shm segments; SIGKILL only for what of its group is left after a grace period.
        (SIGTERM to the whole group, then SIGKILL once the server had exited, killed the
        engine mid-shutdown and left 400 MB of its segments in /dev/shm per run.)"""
        if self.process is None:
            return
        group = self.process.pid
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        if not wait_until(lambda: not _group_alive(group), 30):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.process = None


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What a stand-in does with one request (the handler, the JSON body of a POST): answer it and
# return True, or return False to pass it on to the real server.
Answer = Callable[[http.server.BaseHTTPRequestHandler, dict | None], bool]


class StandIn:
    """A small HTTP server on loopback, in place of (or in front of) a vLLM server.

    Each request goes to ``answer``; the ones it declines go to the server on
    ``upstream_port``, whose answer is passed back as it comes (streams included). Every
    request is recorded in ``requests`` as (method, path, JSON body).
    """

    def __init__(self, answer: Answer | None = None, upstream_port: int | None = None) -> None:
        self.answer = answer or (lambda handler, body: False)
        self.upstream_port = upstream_port
        self.requests: list[tuple[str, str, dict | None]] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandInHandler)
        self.httpd.stand_in = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> StandIn:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def posts(self) -> list[dict]:
        return [body for method, _, body in self.requests if method == "POST" and body]

    def forward(self, handler: http.server.BaseHTTPRequestHandler, raw_body: bytes) -> None:
        assert self.upstream_port is not None, "this stand-in has no server behind it"
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=600)
        headers = {k: v for k, v in handler.headers.items() if k.lower() in _FORWARDED_HEADERS}
        try:
            upstream.request(handler.command, handler.path, raw_body or None, headers)
            answer = upstream.getresponse()
            handler.send_response(answer.status)
            handler.send_header("Content-Type", answer.getheader("Content-Type", "text/plain"))
            handler.end_headers()  # no length: the body ends when the connection closes
            while piece := answer.read1(65536):
                handler.wfile.write(piece)
                handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up; closing upstream makes the server stop the request
        finally:
            upstream.close()


_FORWARDED_HEADERS = ("authorization", "content-type")


class _StandInHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._handle(b"")

    def do_POST(self) -> None:
        self._handle(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def _handle(self, raw_body: bytes) -> None:
        stand_in: StandIn = self.server.stand_in  # type: ignore[attr-defined]
        body = json.loads(raw_body) if raw_body else None
        stand_in.requests.append((self.command, self.path, body))
        if not stand_in.answer(self, body):
            stand_in.forward(self, raw_body)

    def log_message(self, *args: object) -> None:
        pass


def send_json(handler: http.server.BaseHTTPRequestHandler, status: int, value: object) -> None:
    body = json.dumps(value).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def model_list(served: dict[str, str]) -> dict:
    """A ``GET /v1/models`` answer as vLLM gives it; ``served`` maps name -> root."""
    cards = [
        {"id": name, "object": "model", "root": root, "max_model_len": 2048}
        for name, root in served.items()
    ]
    return {"object": "list", "data": cards}


def vllm_error(status: int, message: str) -> dict:
    """An error answer's body as vLLM gives it."""
    return {"error": {"message": message, "type": "Error", "param": None, "code": status}}


@pytest.fixture(scope="module")
def remote_adapter(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (made with peft) the server serves as ``LORA_NAME``."""
    return make_adapter(demo_model, tmp_path_factory.mktemp("adapter") / LORA_NAME, seed=0)


@pytest.fixture(scope="module")
def server(
    demo_model: Path, remote_adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServer]:
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    lora = ["--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"{LORA_NAME}={remote_adapter}"]
    # A chat_template given per request is refused by a server without it; the tool tests
    # compare the local service's parsing with this server's hermes parser.
    tools = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    srv = VLLMServer(demo_model, log_path, [*lora, "--trust-request-chat-template", *tools])
    try:
        srv.start(api_key=API_KEY, served_names=SERVED_NAMES)
        yield srv
    finally:
        srv.stop()


def remote_settings(server: VLLMServer, **values) -> VLLMSettings:
    values.setdefault("api_url", server.url)
    values.setdefault("api_key", API_KEY)
    values.setdefault("model_path", server.model)
    values.setdefault("idle_ttl_seconds", 3600)
    return VLLMSettings(mode="remote", **values)


@pytest.fixture(scope="module")
def remote(server: VLLMServer) -> Iterator[VLLMInferenceService]:
    """One remote-mode service for the tests that only generate."""
    with VLLMInferenceService(remote_settings(server)) as svc:
        svc.warmup()
        yield svc


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def vllm_says(reference: ReferenceEngine) -> dict[str, str]:
    """vLLM's own greedy answers (a plain vllm.LLM) to the prompts these tests send."""
    france = "The capital of France is"
    return {
        "paris5": reference.generate(france, temperature=0, max_tokens=5),
        "paris20_stop": reference.generate(france, temperature=0, max_tokens=20, stop=["."]),
        "count5": reference.generate("1, 2, 3, 4,", temperature=0, max_tokens=5),
        "france20": reference.chat(FRANCE, temperature=0, max_tokens=20),
    }


# ----- every public method, and the same greedy answers as local mode -----


def test_warmup_and_is_ready(server: VLLMServer) -> None:
    service = VLLMInferenceService(remote_settings(server))
    try:
        assert not service.is_ready()
        service.warmup()
        assert service.is_ready()
        assert "remote" in repr(service)
    finally:
        service.shutdown()
    assert not service.is_ready()
    service.shutdown()  # twice is fine
    with pytest.raises(ServiceShutdownError):
        service.generate("Hello")


def test_chat_greedy_answer(remote: VLLMInferenceService, vllm_says: dict[str, str]) -> None:
    result = remote.chat(FRANCE, temperature=0, max_tokens=20)
    assert result.text == vllm_says["france20"]
    assert result.finish_reason == "stop"
    assert result.prompt_tokens > 5
    assert 0 < result.completion_tokens <= 20


def test_generate_greedy_answer_and_token_counts(
    remote: VLLMInferenceService, vllm_says: dict[str, str]
) -> None:
    result = remote.generate("The capital of France is", temperature=0, max_tokens=5)
    assert result.text == vllm_says["paris5"]
    assert result.finish_reason == "length"
    assert result.completion_tokens == 5
    assert result.prompt_tokens == 5  # "The capital of France is": five tokens, no BOS
    assert result.total_tokens == 10
    assert result.error is None


def test_generate_batch_and_chat_batch_keep_order(
    remote: VLLMInferenceService, vllm_says: dict[str, str]
) -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,", "The capital of France is"]
    results = remote.generate_batch(prompts, GenerationParams(temperature=0, max_tokens=5))
    assert results[0].text == vllm_says["paris5"]
    assert results[2].text == results[0].text
    assert results[1].text == vllm_says["count5"]

    conversations = [FRANCE, [{"role": "user", "content": "Say hello."}], FRANCE]
    chats = remote.chat_batch(conversations, temperature=0, max_tokens=20)
    assert chats[0].text == vllm_says["france20"]
    assert chats[0].text == chats[2].text
    assert remote.generate_batch([]) == []


def test_stop_strings_and_sampling_params_reach_the_server(
    remote: VLLMInferenceService, vllm_says: dict[str, str]
) -> None:
    result = remote.generate("The capital of France is", temperature=0, max_tokens=20, stop=["."])
    assert result.text == vllm_says["paris20_stop"]
    assert result.finish_reason == "stop"
    # top_k=1 makes sampling greedy even at a high temperature: it reached the server.
    params = GenerationParams(temperature=1.5, top_k=1, seed=7, max_tokens=5)
    assert remote.generate("The capital of France is", params).text == vllm_says["paris5"]
    # So did repetition_penalty (extra body) and the OpenAI penalties: they change greedy text.
    prompt, greedy = "1, 2, 1, 2, 1, 2,", {"temperature": 0, "max_tokens": 12}
    plain = remote.generate(prompt, **greedy).text
    assert remote.generate(prompt, repetition_penalty=1.8, **greedy).text != plain
    assert remote.generate(prompt, frequency_penalty=2.0, **greedy).text != plain


def test_streamed_answers_equal_the_servers_plain_answers(
    server: VLLMServer, remote: VLLMInferenceService
) -> None:
    """The service streams; what it puts together is what the server answers unstreamed."""
    client = openai.OpenAI(base_url=server.url, api_key=API_KEY)
    greedy = {"temperature": 0, "max_tokens": 24, "stop": ["\n\n"]}
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
    for prompt, result in zip(prompts, remote.generate_batch(prompts, **greedy)):
        plain = client.completions.create(model="smol-a", prompt=prompt, **greedy)
        assert (result.text, result.finish_reason) == (
            plain.choices[0].text,
            plain.choices[0].finish_reason,
        )
        assert (result.prompt_tokens, result.completion_tokens) == (
            plain.usage.prompt_tokens,
            plain.usage.completion_tokens,
        )
    chat = remote.chat(FRANCE, temperature=0, max_tokens=20)
    plain_chat = client.chat.completions.create(
        model="smol-a", messages=FRANCE, temperature=0, max_tokens=20
    )
    assert (chat.text, chat.finish_reason) == (
        plain_chat.choices[0].message.content,
        plain_chat.choices[0].finish_reason,
    )
    assert (chat.prompt_tokens, chat.completion_tokens) == (
        plain_chat.usage.prompt_tokens,
        plain_chat.usage.completion_tokens,
    )


def test_sampling_split_between_openai_params_and_extra_body() -> None:
    from vllm_service.testing import split_sampling

    params, extra = split_sampling(
        {
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 5,
            "max_tokens": 7,
            "repetition_penalty": 1.1,
            "stop": ["x"],
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "seed": 3,
            "n": 2,
            "ignore_eos": True,
            "logprobs": 2,
            "structured_outputs": {"regex": "a+"},
        },
        is_chat=False,
    )
    assert params == {
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 7,
        "stop": ["x"],
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "seed": 3,
        "n": 2,
        "logprobs": 2,
    }
    assert extra == {
        "top_k": 5, "repetition_penalty": 1.1, "ignore_eos": True,
        "structured_outputs": {"regex": "a+"},
    }
    # the chat API names logprobs differently
    params, _ = split_sampling({"logprobs": 2}, is_chat=True)
    assert params == {"logprobs": True, "top_logprobs": 2}


def test_context_manager(server: VLLMServer, vllm_says: dict[str, str]) -> None:
    with VLLMInferenceService(remote_settings(server)) as service:
        assert service.chat(FRANCE, temperature=0, max_tokens=20).text == vllm_says["france20"]
        assert service.is_ready()
    assert not service.is_ready()
    with pytest.raises(ServiceShutdownError):
        service.chat(FRANCE)


# ----- errors -----


def test_rejected_prompt_fails_alone(
    remote: VLLMInferenceService, vllm_says: dict[str, str]
) -> None:
    too_long = "hello " * 3000  # more than the server's 2048-token context
    results = remote.generate_batch(
        ["The capital of France is", too_long, "The capital of France is"],
        temperature=0,
        max_tokens=5,
    )
    assert results[1].finish_reason == "error"
    assert "maximum context length" in results[1].error or "2048" in results[1].error
    assert results[1].text == ""
    assert results[0].text == results[2].text == vllm_says["paris5"]


def test_requests_failed_by_the_server_do_not_take_the_others_with_them(
    server: VLLMServer, vllm_says: dict[str, str]
) -> None:
    """A stand-in in front of the real server answers HTTP 500 to the prompts marked FAIL."""

    def fail_marked(handler: http.server.BaseHTTPRequestHandler, body: dict | None) -> bool:
        if body is not None and "FAIL" in json.dumps(body):
            send_json(handler, 500, vllm_error(500, "engine is broken"))
            return True
        return False

    with StandIn(fail_marked, upstream_port=server.port) as stand_in:
        settings = remote_settings(server, api_url=stand_in.url, api_max_retries=1)
        with VLLMInferenceService(settings) as service:
            prompts = ["The capital of France is", "FAIL one", "1, 2, 3, 4,", "FAIL two"]
            results = service.generate_batch(prompts, temperature=0, max_tokens=5)
            chats = service.chat_batch(
                [FRANCE, [{"role": "user", "content": "FAIL"}]], temperature=0, max_tokens=20
            )
            # Every request failed: the server is failing, and the call says so.
            with pytest.raises(RemoteServerError) as all_failed:
                service.generate_batch(["FAIL a", "FAIL b"], max_tokens=5)
            with pytest.raises(RemoteServerError) as one_failed:
                service.generate("FAIL alone", max_tokens=5)
            assert service.is_ready()

    assert results[0].text == vllm_says["paris5"] and results[0].error is None
    assert results[2].text == vllm_says["count5"]
    assert chats[0].text == vllm_says["france20"]
    error = f"Error from the vLLM server at {stand_in.url}: HTTP 500: engine is broken"
    for failed in (results[1], results[3], chats[1]):
        assert failed.finish_reason == "error" and failed.error == error
        assert failed.text == "" and failed.completion_tokens == 0
    assert str(all_failed.value) == f"{error} (all 2 requests of the call failed)"
    assert str(one_failed.value) == error
    # Retried once each (VLLM_API_MAX_RETRIES=1) before giving up; the others ran once.
    sent = [json.dumps(body) for body in stand_in.posts()]
    assert sum("FAIL one" in b for b in sent) == 2
    assert sum("The capital of France" in b for b in sent) == 1


def test_wrong_key_gives_authentication_error(server: VLLMServer, remote_adapter: Path) -> None:
    wrong = "wrong-key-8e1d"
    with VLLMInferenceService(remote_settings(server, api_key=wrong)) as service:
        with pytest.raises(RemoteServerError) as caught:
            service.warmup()
        assert not service.is_ready()
        # The parent's own calls to the server say the same, with the same fields.
        with pytest.raises(RemoteServerError) as lora_caught:
            service.load_lora("wrong-key-lora", remote_adapter)
        with pytest.raises(RemoteServerError) as listing_caught:
            service.lora_adapters()
    for error in (caught.value, lora_caught.value, listing_caught.value):
        assert (error.status_code, error.url) == (401, server.url)
        message = str(error)
        assert "Authentication failed" in message and "VLLM_API_KEY" in message
        assert server.url in message
        assert wrong not in message


def test_no_key_against_a_key_server_is_refused(server: VLLMServer) -> None:
    service = VLLMInferenceService(remote_settings(server, api_key=None))
    with service, pytest.raises(RemoteServerError, match="Authentication failed") as caught:
        service.generate("Hello")
    assert caught.value.status_code == 401


def test_server_that_is_down_gives_a_clear_error_quickly() -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nobody listens there
    settings = VLLMSettings(mode="remote", api_url=url, model_path="some-model", api_max_retries=2)
    started = time.monotonic()
    errors: list[RemoteServerError] = []
    with VLLMInferenceService(settings) as service:
        # The first call (which starts the worker) and the next one fail alike; so do the
        # calls the service makes to the server itself.
        for call in (lambda: service.generate("Hello"), lambda: service.chat(FRANCE),
                     service.lora_adapters, lambda: service.unload_lora("some-adapter")):
            with pytest.raises(RemoteServerError) as caught:
                call()
            errors.append(caught.value)
        assert not service.is_ready()
        assert service.status().last_error == str(errors[1]).split("\n")[0]
    assert time.monotonic() - started < 120  # 2 x (spawn + 3 refused connections), 2 x 3 more
    for error in errors:
        assert type(error) is RemoteServerError
        assert (error.status_code, error.url) == (None, url)
        message = str(error)
        assert f"Cannot reach the vLLM server at {url} after 3 attempt(s)" in message
        assert "check VLLM_API_URL and that the server is running" in message


def test_served_model_name_is_resolved(server: VLLMServer, vllm_says: dict[str, str]) -> None:
    # The server serves the folder under two other names: the folder path resolves to one of
    # them (the remote fixture already runs on that), a served name is used as it is, and a
    # name that matches none of several is a clear error.
    with VLLMInferenceService(remote_settings(server, model_path="smol-b")) as service:
        assert service.chat(FRANCE, temperature=0, max_tokens=20).text == vllm_says["france20"]
    service = VLLMInferenceService(remote_settings(server, model_path="not-served"))
    with service, pytest.raises(RemoteServerError) as caught:
        service.warmup()
    assert (caught.value.status_code, caught.value.url) == (None, server.url)
    message = str(caught.value)
    assert f"The vLLM server at {server.url} does not serve 'not-served'" in message
    assert f"['smol-a', 'smol-b', '{LORA_NAME}']" in message and "VLLM_MODEL_PATH" in message


def test_server_that_serves_only_another_model_is_an_error() -> None:
    def other_model(handler: http.server.BaseHTTPRequestHandler, body: dict | None) -> bool:
        send_json(handler, 200, model_list({"other-model": "/models/other-model"}))
        return True

    with StandIn(other_model) as stand_in:
        settings = VLLMSettings(mode="remote", api_url=stand_in.url, model_path="/models/mine")
        service = VLLMInferenceService(settings)
        with service, pytest.raises(RemoteServerError) as caught:
            service.warmup()
    message = str(caught.value)
    assert f"The vLLM server at {stand_in.url} does not serve '/models/mine'" in message
    assert "it serves ['other-model']. Set VLLM_MODEL_PATH" in message


def test_server_restarted_with_another_model_is_an_error(
    server: VLLMServer, vllm_says: dict[str, str]
) -> None:
    """A stand-in passes requests on to the real server, then plays a server restarted with
    another model: vLLM answers 404 to the old name and lists only the new model."""
    restarted = threading.Event()

    def after_restart(handler: http.server.BaseHTTPRequestHandler, body: dict | None) -> bool:
        if not restarted.is_set():
            return False
        if body is None:
            send_json(handler, 200, model_list({"other-model": "/models/other-model"}))
        else:
            send_json(handler, 404, vllm_error(404, f"The model `{body['model']}` does not exist."))
        return True

    with StandIn(after_restart, upstream_port=server.port) as stand_in:
        with VLLMInferenceService(remote_settings(server, api_url=stand_in.url)) as service:
            prompt = "The capital of France is"
            assert service.generate(prompt, temperature=0, max_tokens=5).text == vllm_says["paris5"]
            restarted.set()
            with pytest.raises(RemoteServerError) as caught:
                service.generate_batch([prompt, prompt], temperature=0, max_tokens=5)
            with pytest.raises(RemoteServerError):
                service.generate(prompt, max_tokens=5)  # no request went to the other model
    message = str(caught.value)
    assert (
        f"The vLLM server at {stand_in.url} does not serve {server.model!r} (it served it as "
        "'smol-a' until now: restarted with another model?); it serves ['other-model']. "
        "Set VLLM_MODEL_PATH" in message
    )
    assert all(body["model"] == "smol-a" for body in stand_in.posts())


def test_pick_served_model() -> None:
    from vllm_service.testing import pick_served_model

    served = {"/models/a": "/models/a", "b-chat": "/models/b", "b-alias": "/models/b"}
    assert pick_served_model("/models/a", served) == "/models/a"
    assert pick_served_model("/models/b", served) == "b-chat"
    assert pick_served_model("a", served) == "/models/a"
    assert pick_served_model("b", served) == "b-chat"
    assert pick_served_model("c", served) is None
    # A server that serves one model serves that one, not whatever is wanted.
    assert pick_served_model("/models/a", {"only": None}) is None
    assert pick_served_model("/models/a", {"/models/other": "/models/other"}) is None
    assert pick_served_model("/models/a", {"chat": "/models/a"}) == "chat"
    assert pick_served_model("/models/a", {"/srv/a": "/srv/a"}) == "/srv/a"


def test_hanging_server_times_out_within_attempts_x_timeout() -> None:
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        settings = VLLMSettings(
            mode="remote", api_url=url, model_path="m", api_timeout_seconds=1, api_max_retries=1
        )
        started = time.monotonic()
        service = VLLMInferenceService(settings)
        with service, pytest.raises(RemoteServerError) as caught:
            service.warmup()
        assert time.monotonic() - started < 30  # spawn + 2 attempts of 1 s + backoff
    assert f"Timed out waiting for the vLLM server at {url} (2 attempt(s)" in str(caught.value)
    assert (caught.value.status_code, caught.value.url) == (None, url)


def test_5xx_is_retried_a_bounded_number_of_times() -> None:
    def broken(handler: http.server.BaseHTTPRequestHandler, body: dict | None) -> bool:
        send_json(handler, 500, vllm_error(500, "engine is broken"))
        return True

    with StandIn(broken) as stand_in:
        settings = VLLMSettings(
            mode="remote", api_url=stand_in.url, model_path="m", api_max_retries=2
        )
        service = VLLMInferenceService(settings)
        with service, pytest.raises(RemoteServerError) as caught:
            service.warmup()
    assert [path for _, path, _ in stand_in.requests] == ["/v1/models"] * 3
    assert f"Error from the vLLM server at {stand_in.url}: HTTP 500: engine is broken" in str(
        caught.value
    )
    assert (caught.value.status_code, caught.value.url) == (500, stand_in.url)


def test_keep_alive_hold_and_unload_in_remote_mode(
    server: VLLMServer, vllm_says: dict[str, str]
) -> None:
    with VLLMInferenceService(remote_settings(server, idle_ttl_seconds=1)) as service:
        service.warmup()
        first = service.status().pid
        assert wait_until(lambda: service.status().state == "stopped", 15)  # idle TTL 1 s
        answer = service.generate("The capital of France is", temperature=0, max_tokens=5)
        assert answer.text == vllm_says["paris5"]
        assert service.status().pid not in (None, first) and service.status().restarts == 1

        with service.hold():
            service.generate("Hello", max_tokens=2)
            time.sleep(2.5)
            assert service.status().state == "ready" and service.status().held
        assert wait_until(lambda: service.status().state == "stopped", 15)

        service.generate("Hello", max_tokens=2, keep_alive=-1)
        time.sleep(2.5)
        assert service.status().state == "ready" and service.status().expires_at is None
        service.generate("Hello", max_tokens=2, keep_alive=0)
        assert wait_until(lambda: service.status().state == "stopped", 15)

        service.warmup()
        thread_outcome: list[BaseException] = []

        def long_call() -> None:
            try:
                service.generate("Tell me a story.", max_tokens=1500, ignore_eos=True)
            except BaseException as exc:
                thread_outcome.append(exc)

        caller = threading.Thread(target=long_call)
        caller.start()
        assert wait_until(lambda: server_running(server) == 1, 10)
        service.unload(wait=False)
        caller.join(30)
        assert len(thread_outcome) == 1 and isinstance(thread_outcome[0], RequestAbortedError)
        assert service.status().state == "stopped"
        assert wait_until(lambda: server_running(server) == 0, 10), "the server still generates"


def test_engine_samples_n_and_aborts(server: VLLMServer) -> None:
    """The worker's engine itself: n samples with their own token counts, and abort."""
    from vllm_service._worker.engines.remote import RemoteEngine
    from vllm_service._worker.protocol import Request, WorkerConfig

    config = WorkerConfig(mode="remote", model=server.model, api_url=server.url, api_key=API_KEY)
    engine = RemoteEngine(config)
    try:
        assert engine.info["max_model_len"] == 2048
        sampling = {"n": 3, "temperature": 1.0, "seed": 3, "max_tokens": 8, "ignore_eos": True}
        engine.add(Request(1, "Once upon a time", sampling))
        engine.add(Request(2, "Once upon a time", {"max_tokens": 2000, "ignore_eos": True}))
        engine.abort([2])
        finished = []
        deadline = time.monotonic() + 120
        while engine.has_unfinished() and time.monotonic() < deadline:
            finished += engine.step()
        assert [f.request_id for f in finished] == [1]
        (result,) = finished
        assert result.error is None and len(result.samples) == 3
        assert all(
            s.completion_tokens == len(s.token_ids) == 8 and s.finish_reason == "length"
            for s in result.samples
        )
        assert result.prompt_tokens == 4
        # The streamed samples, put together by index, are the server's unstreamed ones.
        client = openai.OpenAI(base_url=server.url, api_key=API_KEY)
        plain = client.completions.create(
            model=engine.model,
            prompt="Once upon a time",
            n=3,
            temperature=1.0,
            seed=3,
            max_tokens=8,
            extra_body={"ignore_eos": True},
        )
        plain_texts = [c.text for c in sorted(plain.choices, key=lambda c: c.index)]
        assert [s.text for s in result.samples] == plain_texts
    finally:
        engine.close()


# ----- generations longer than the HTTP timeout, and servers that stall -----


def test_generation_longer_than_the_timeout_runs_once(server: VLLMServer) -> None:
    """The answer is streamed: the 2 s timeout bounds the wait for each chunk, so a generation
    of several seconds completes, and the request reached the server once (counted by a
    stand-in passing everything on to the real server)."""
    timeout = 2
    with StandIn(upstream_port=server.port) as stand_in:
        settings = remote_settings(
            server, api_url=stand_in.url, api_timeout_seconds=timeout, api_max_retries=2
        )
        with VLLMInferenceService(settings) as service:
            service.warmup()
            started = time.monotonic()
            result = service.generate(
                "Once upon a time", temperature=0, max_tokens=250, ignore_eos=True
            )
            elapsed = time.monotonic() - started
    assert result.error is None
    assert result.finish_reason == "length" and result.completion_tokens == 250
    assert elapsed > 2 * timeout, elapsed  # one unstreamed attempt would have timed out
    assert [path for method, path, _ in stand_in.requests if method == "POST"] == [
        "/v1/completions"
    ]


@pytest.mark.parametrize("first_chunk", [False, True], ids=["silent", "stalls-midway"])
def test_server_that_stops_sending_times_out(first_chunk: bool) -> None:
    """Silent from the start: retried as before (nothing was started). Silent after a first
    chunk: the server had started the generation, so it fails without a retry."""
    release = threading.Event()

    def stall(handler: http.server.BaseHTTPRequestHandler, body: dict | None) -> bool:
        if body is None:
            send_json(handler, 200, model_list({"m": "m"}))
            return True
        if first_chunk:
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream")
            handler.end_headers()
            chunk = {"id": "c", "object": "text_completion", "created": 0, "model": "m"}
            chunk["choices"] = [{"index": 0, "text": " Once", "finish_reason": None}]
            handler.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            handler.wfile.flush()
        release.wait(60)
        return True

    with StandIn(stall) as stand_in:
        settings = VLLMSettings(
            mode="remote",
            api_url=stand_in.url,
            model_path="m",
            api_timeout_seconds=1,
            api_max_retries=1,
        )
        try:
            with VLLMInferenceService(settings) as service:
                service.warmup()
                started = time.monotonic()
                with pytest.raises(RemoteServerError) as caught:
                    service.generate("Once upon a time", max_tokens=5)
                assert time.monotonic() - started < 20  # 2 attempts of 1 s + backoff at most
        finally:
            release.set()
    message = str(caught.value)
    if first_chunk:
        assert message == (
            f"The answer stopped midway: the vLLM server at {stand_in.url} sent nothing for "
            "1 s (VLLM_API_TIMEOUT_SECONDS). Not retried, as the server had started the "
            "request; see VLLM_API_URL and the server's log."
        )
        assert len(stand_in.posts()) == 1
    else:
        assert f"Timed out waiting for the vLLM server at {stand_in.url} (2 attempt(s)" in message
        assert len(stand_in.posts()) == 2


def test_error_event_midway_through_the_answer() -> None:
    """vLLM reports a failure during generation as an error event in the stream: a 500 is the
    server's error, a 400 the request's."""

    def error_event(handler: http.server.BaseHTTPRequestHandler, body: dict | None) -> bool:
        if body is None:
            send_json(handler, 200, model_list({"m": "m"}))
            return True
        status = 400 if "bad" in body["prompt"] else 500
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        error = vllm_error(status, "it went wrong")
        handler.wfile.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
        return True

    with StandIn(error_event) as stand_in:
        settings = VLLMSettings(mode="remote", api_url=stand_in.url, model_path="m")
        with VLLMInferenceService(settings) as service:
            bad, failed = service.generate_batch(["bad prompt", "good prompt"], max_tokens=5)
    assert bad.error == "The server rejected the request (HTTP 400): it went wrong"
    assert failed.error == (
        f"Error from the vLLM server at {stand_in.url} midway through the answer: HTTP 500: "
        "it went wrong"
    )
    assert len(stand_in.posts()) == 2  # not retried


# ----- concurrency -----


def test_32_threads_each_get_their_own_answer(remote: VLLMInferenceService) -> None:
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def count_from(start: int) -> None:
        try:
            prompt = f"{start}, {start + 1}, {start + 2}, {start + 3},"
            results[start] = remote.generate(prompt, temperature=0, max_tokens=4).text
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=count_from, args=(10 * i + 1,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors
    assert len(results) == 32
    for start, text in results.items():
        assert text.strip().startswith(str(start + 4)), (start, text)


def test_batch_requests_are_in_flight_together(
    server: VLLMServer, remote: VLLMInferenceService
) -> None:
    """The server sees the prompts of one batch running at the same time, not one by one."""
    running: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as answer:
                for line in answer.read().decode().splitlines():
                    if line.startswith("vllm:num_requests_running"):
                        running.append(float(line.rsplit(" ", 1)[1]))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        prompts = [f"Count from {i} to 100: {i}," for i in range(16)]
        results = remote.generate_batch(prompts, temperature=0, max_tokens=64, ignore_eos=True)
    finally:
        done.set()
        watcher.join()
    assert all(r.completion_tokens == 64 and r.finish_reason == "length" for r in results)
    assert max(running) >= 8, running


def server_running(server: VLLMServer) -> float:
    """How many requests the server's engine runs now (its Prometheus metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("vllm:num_requests_running"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("the server reports no vllm:num_requests_running")


# ----- streaming and asyncio through the server -----


def test_streams_add_up_to_the_servers_answers(
    remote: VLLMInferenceService, vllm_says: dict[str, str]
) -> None:
    chunks = list(remote.chat_stream(FRANCE, temperature=0, max_tokens=20))
    assert len(chunks) > 5
    result = chunks[-1].result
    assert result is not None and "".join(c.text for c in chunks) == result.text == vllm_says["france20"]
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    chunks = list(remote.stream("The capital of France is", temperature=0, max_tokens=5))
    assert "".join(c.text for c in chunks) == vllm_says["paris5"]

    async def streamed() -> str:
        aservice = AsyncVLLMInferenceService(service=remote)
        texts = [c.text async for c in aservice.chat_stream(FRANCE, temperature=0, max_tokens=20)]
        answer = await aservice.chat(FRANCE, temperature=0, max_tokens=20)
        assert answer.text == vllm_says["france20"]
        return "".join(texts)

    assert asyncio.run(streamed()) == vllm_says["france20"]


def test_a_stream_given_up_stops_on_the_server(
    server: VLLMServer, remote: VLLMInferenceService
) -> None:
    endless = {"max_tokens": 1500, "ignore_eos": True}
    for _ in remote.stream("Tell me a story.", **endless):
        break
    assert wait_until(lambda: server_running(server) == 0, 10)

    stream = remote.stream("Tell me a story.", **endless)
    next(stream)
    assert server_running(server) == 1
    stream.close()
    assert wait_until(lambda: server_running(server) == 0, 10)

    async def cancelled() -> None:
        aservice = AsyncVLLMInferenceService(service=remote)
        task = asyncio.create_task(aservice.generate("Tell me a story.", **endless))
        assert await asyncio.to_thread(wait_until, lambda: server_running(server) == 1, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert wait_until(lambda: server_running(server) == 0, 10)
    assert remote.status().in_flight == 0


# ----- the API key stays secret -----


# ----- everything vLLM does per request, through the server -----


def test_token_ids_logprobs_and_prompt_ids_are_vllms(
    remote: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    prompt = "The capital of France is"
    result = remote.generate(prompt, temperature=0, max_tokens=10, logprobs=3)
    expected = reference.output("generate", prompt, temperature=0, max_tokens=10, logprobs=3)
    sample = expected["samples"][0]
    assert result.text == sample["text"] and result.token_ids == sample["token_ids"]
    assert result.prompt_token_ids == expected["prompt_token_ids"]
    assert result.completion_tokens == 10 and result.prompt_tokens == len(result.prompt_token_ids)
    assert result.logprobs is not None and len(result.logprobs) == 10
    for position, token_id, wanted in zip(result.logprobs, result.token_ids, sample["logprobs"]):
        assert position.token_id == token_id and position.token == wanted[token_id][2]
        assert position.logprob == pytest.approx(wanted[token_id][0], abs=1e-3)
        top = sorted((v for v in wanted.values() if v[1] <= 3), key=lambda v: v[1])
        assert [t.token for t in position.top] == [v[2] for v in top]
        assert [t.rank for t in position.top] == [1, 2, 3] and position.rank == 1
    assert result.cumulative_logprob == pytest.approx(sample["cumulative_logprob"], abs=1e-2)
    chat = remote.chat(FRANCE, temperature=0, max_tokens=10, logprobs=2)
    chat_expected = reference.output("chat", FRANCE, temperature=0, max_tokens=10, logprobs=2)
    assert chat.token_ids == chat_expected["samples"][0]["token_ids"]
    assert chat.prompt_token_ids == chat_expected["prompt_token_ids"]
    assert chat.logprobs is not None and [p.token_id for p in chat.logprobs] == chat.token_ids
    assert all(len(p.top) == 2 for p in chat.logprobs)
    # a prompt of token ids
    from_ids = remote.generate(result.prompt_token_ids, temperature=0, max_tokens=10)
    assert from_ids.token_ids == result.token_ids


def test_chat_options_reach_the_server_and_render_as_llm_chat(
    remote: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    from _chat_cases import CASES, GREEDY

    for case, (messages, options) in CASES.items():
        result = remote.chat(messages, **GREEDY, **options)
        expected = reference.chat_output(messages, options, **GREEDY)
        assert result.error is None, (case, result.error)
        assert result.prompt_token_ids == expected["prompt_token_ids"], case
        assert result.text == expected["samples"][0]["text"], case
    messages, options = CASES["template with a variable"]
    streamed = "".join(c.text for c in remote.chat_stream(messages, **GREEDY, **options))
    assert streamed == reference.chat_output(messages, options, **GREEDY)["samples"][0]["text"]


def test_n_samples_through_the_server(
    remote: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    sampling = {"n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 8}
    result = remote.generate("Once upon a time", **sampling)
    expected = reference.output("generate", "Once upon a time", **sampling)
    assert [s.token_ids for s in result.samples] == [s["token_ids"] for s in expected["samples"]]
    assert result.text == result.samples[0].text
    assert result.completion_tokens == sum(len(s.token_ids) for s in result.samples)


REMOTE_FIELDS = [
    {"stop_token_ids": [30]},
    {"bad_words": ["Paris"]},
    {"logit_bias": {7042: -100.0}},
    {"allowed_token_ids": [7042, 30, 13]},
    {"min_tokens": 10, "stop_token_ids": [30]},
    {"truncate_prompt_tokens": 2},
    {"stop": ["."], "include_stop_str_in_output": True},
    {"skip_special_tokens": False},
    {"temperature": 1.0, "seed": 3, "top_k": 3, "min_p": 0.2},
    {"repetition_penalty": 1.8, "presence_penalty": 1.0, "frequency_penalty": 1.0},
    {"regex": "[0-9]{3}-[0-9]{4}"},
    {"choice": ["alpha", "beta"]},
    {"grammar": 'root ::= "yes" | "no"'},
]


def test_every_request_field_reaches_the_server(
    remote: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    prompt = "The capital of France is"
    plain = reference.output("generate", prompt, temperature=0, max_tokens=10)["samples"][0]
    results = remote.generate_batch([prompt], temperature=0, max_tokens=10)  # warm
    for fields in REMOTE_FIELDS:
        sampling = {"temperature": 0, "max_tokens": 10, **fields}
        (result,) = remote.generate_batch([prompt], **sampling)
        constraint = {k: v for k, v in fields.items() if k in ("regex", "choice", "grammar")}
        wanted = {k: v for k, v in sampling.items() if k not in constraint}
        if constraint:
            wanted["structured_outputs"] = constraint
        expected = reference.output("generate", prompt, **wanted)["samples"][0]
        assert result.error is None, (fields, result.error)
        assert result.token_ids == expected["token_ids"], fields
        assert result.text == expected["text"], fields
        if "stop_token_ids" in fields and "min_tokens" not in fields:
            assert result.stop_reason == 30
        results.append(result)
    assert sum(r.token_ids != plain["token_ids"] for r in results[1:]) >= len(REMOTE_FIELDS) - 2


class Town(BaseModel):
    name: str = Field(max_length=20)
    is_capital: bool


def test_structured_outputs_through_the_server(
    remote: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    result = remote.chat(messages, json_schema=Town, temperature=0, max_tokens=60)
    assert isinstance(result.parsed, Town), result.text
    expected = reference.output("chat", messages, temperature=0, max_tokens=60,
                                structured_outputs={"json": Town.model_json_schema()})
    assert result.text == expected["samples"][0]["text"]
    bad, good = remote.generate_batch(["Answer:"], regex="(unclosed"), remote.generate(
        "Answer:", choice=["up", "down"], temperature=0)
    assert bad[0].finish_reason == "error" and "regex" in (bad[0].error or "")
    assert good.text in ("up", "down")


def test_a_lora_adapter_the_server_serves(
    remote: VLLMInferenceService, remote_adapter: Path, demo_model: Path,
    reference: ReferenceEngine,
) -> None:
    prompt = "The capital of France is"
    result = remote.generate(prompt, temperature=0, max_tokens=16, logprobs=0, lora=LORA_NAME)
    peft = PeftScorer(demo_model)
    peft.check(remote_adapter, result, reference.dtype)  # the server runs in the same dtype
    base = remote.generate(prompt, temperature=0, max_tokens=16)
    assert base.text == reference.generate(prompt, temperature=0, max_tokens=16)
    assert base.token_ids != result.token_ids
    unknown = remote.generate_batch([prompt], lora="nope")
    good = remote.generate(prompt, lora=LORA_NAME, temperature=0, max_tokens=16, logprobs=0)
    assert unknown[0].finish_reason == "error"
    assert "serves no LoRA adapter 'nope'" in (unknown[0].error or "")
    assert "--lora-modules nope=FOLDER" in (unknown[0].error or "")
    assert good.token_ids == result.token_ids


def test_fields_a_server_cannot_take_are_refused_at_the_call(remote: VLLMInferenceService) -> None:
    for fields, match in (({"detokenize": False}, "detokenize"),
                          ({"prompt_logprobs": 1}, "prompt_logprobs.*local mode"),
                          ({"extra_args": {"a": 1}}, "extra_args")):
        with pytest.raises(ValueError, match=match):
            remote.generate("Hi", **fields)


def test_lora_adapters_loaded_at_run_time(
    remote: VLLMInferenceService, server: VLLMServer, remote_adapter: Path, demo_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert remote.lora_adapters() == [LORA_NAME]
    second = make_adapter(demo_model, tmp_path_factory.mktemp("adapter2") / "second", seed=1)
    prompt = "The capital of France is"
    remote.load_lora("second", second)
    assert remote.lora_adapters() == sorted([LORA_NAME, "second"])
    peft, dtype = PeftScorer(demo_model), engine_dtype()
    result = remote.generate(prompt, temperature=0, max_tokens=16, logprobs=0, lora="second")
    peft.check(second, result, dtype)
    remote.load_lora("second", remote_adapter)  # replaced, as in local mode
    replaced = remote.generate(prompt, temperature=0, max_tokens=16, logprobs=0, lora="second")
    peft.check(remote_adapter, replaced, dtype)
    with pytest.raises(ValueError, match="refused to load LoRA adapter 'missing'"):
        remote.load_lora("missing", "/no/such/adapter")
    remote.unload_lora("second")
    assert remote.lora_adapters() == [LORA_NAME]
    with pytest.raises(KeyError, match="second"):
        remote.unload_lora("second")
    gone = remote.generate_batch([prompt], lora="second")[0]
    assert gone.finish_reason == "error" and "serves no LoRA adapter 'second'" in (gone.error or "")

    def without_runtime_loading(handler: http.server.BaseHTTPRequestHandler, body: dict | None) -> bool:
        if handler.path.endswith("_lora_adapter"):  # what vLLM answers without the variable
            send_json(handler, 404, {"detail": "Not Found"})
            return True
        return False

    with StandIn(without_runtime_loading, upstream_port=server.port) as stand_in:
        service = VLLMInferenceService(remote_settings(server, api_url=stand_in.url))
        with pytest.raises(RuntimeError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            service.load_lora("third", second)
        with pytest.raises(RuntimeError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            service.unload_lora(LORA_NAME)
        service.shutdown()


# ----- a remote-only install: the wheel with its base dependencies, no vLLM, no torch -----


ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from (the rest of a checkout, .git and .venv included, stays out).
_WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "vllm_service")
# Run in the remote-only environment: a remote-mode service does what the tests above check,
# and prints what it got as JSON.
_REMOTE_ONLY_PROGRAM = """
import json, sys
import vllm_service
from vllm_service import VLLMInferenceService, VLLMSettings

def main():
    url, key, model, adapter = sys.argv[1:]
    settings = VLLMSettings(mode="remote", api_url=url, api_key=key, model_path=model)
    prompt = "The capital of France is"
    with VLLMInferenceService(settings) as service:
        generated = service.generate(prompt, temperature=0, max_tokens=5)
        chat = service.chat([{"role": "user", "content": "What is the capital of France?"}],
                            temperature=0, max_tokens=20)
        service.load_lora("wheel-lora", adapter)
        loaded = service.lora_adapters()
        lora = service.generate(prompt, temperature=0, max_tokens=16, lora="wheel-lora")
        service.unload_lora("wheel-lora")
        unloaded = service.lora_adapters()
    print(json.dumps({
        "package": vllm_service.__file__, "generate": generated.text, "chat": chat.text,
        "loaded": loaded, "lora": lora.token_ids, "unloaded": unloaded,
    }))

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="session")
def remote_only_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with this checkout's wheel and its base dependencies only (no extras, so
    neither vLLM nor torch), from the package registries: what a remote-only user installs."""
    folder = tmp_path_factory.mktemp("remote-only")
    source = folder / "source"  # built from a copy: setuptools writes build/ next to it
    source.mkdir()
    for name in _WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    run = functools.partial(subprocess.run, check=True, capture_output=True, text=True, timeout=600)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", folder / "dist", source])
    [wheel] = (folder / "dist").glob("vllm_service-*.whl")
    run([sys.executable, "-m", "venv", folder / "venv"])
    python = folder / "venv" / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", wheel])
    return python


def test_a_remote_only_install_runs_remote_mode_loras_included(
    remote_only_python: Path, server: VLLMServer, remote: VLLMInferenceService,
    remote_adapter: Path, vllm_says: dict[str, str], tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("VLLM_")}
    for heavy in ("vllm", "torch"):
        found = subprocess.run([remote_only_python, "-c", f"import {heavy}"], env=env,
                               capture_output=True, text=True, timeout=60, check=False)
        assert found.returncode != 0 and "ModuleNotFoundError" in found.stderr, heavy
    program = tmp_path / "remote_only.py"  # outside the checkout: its folder is on sys.path
    program.write_text(_REMOTE_ONLY_PROGRAM)
    done = subprocess.run(
        [remote_only_python, program, server.url, API_KEY, server.model, str(remote_adapter)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert Path(got["package"]).is_relative_to(remote_only_python.parents[1])  # the wheel's
    assert got["generate"] == vllm_says["paris5"]
    assert got["chat"] == vllm_says["france20"]
    assert got["loaded"] == sorted([LORA_NAME, "wheel-lora"])
    # The same adapter's files as the one the server was started with, so the same answer.
    same = remote.generate("The capital of France is", temperature=0, max_tokens=16, lora=LORA_NAME)
    assert got["lora"] == same.token_ids
    assert got["unloaded"] == [LORA_NAME]


def test_api_key_never_shown(server: VLLMServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = remote_settings(server)
    assert API_KEY not in repr(settings) and API_KEY not in str(settings)
    with VLLMInferenceService(settings) as service:
        assert API_KEY not in repr(service)
        assert API_KEY not in repr(worker_config(service.settings))  # its worker starts with it
        service.generate("Hello", max_tokens=2)
        log_path = service.dispatcher.worker.log_path
        worker_log = log_path.read_text()
    assert API_KEY not in caplog.text
    assert API_KEY not in worker_log
    with pytest.raises(ValueError) as caught:
        VLLMSettings(mode="remote", api_url=server.url, model_path="m", api_key=123)
    assert "123" not in str(caught.value)


def test_remote_results_carry_request_ids_and_timings_and_metrics_count_them(
    server: VLLMServer,
) -> None:
    # Its own service: at the end of the module the server may have been restarted.
    with VLLMInferenceService(remote_settings(server)) as service:
        results = service.generate_batch(
            ["1, 2, 3,", "4, 5, 6,", "hello " * 3000], temperature=0, max_tokens=5,
            ignore_eos=True,
        )
        streamed = list(service.stream("7, 8, 9,", temperature=0, max_tokens=5, ignore_eos=True))
        answered = [*results[:2], streamed[-1].result]
        for result in answered:
            assert result is not None and result.completion_tokens == 5
            timings = result.timings
            assert timings is not None and timings.first_token_at is not None
            assert timings.queued_at <= timings.first_token_at <= timings.finished_at
        assert results[2].finish_reason == "error"  # longer than the server's context
        ids = {r.request_id for r in [*results, streamed[-1].result] if r is not None}
        assert len(ids) == 4
        metrics = service.metrics()
    assert metrics.mode == "remote" and metrics.finish_reasons == {"length": 3, "error": 1}
    assert metrics.errors == {"invalid_request": 1}
    assert metrics.generation_tokens == 15
    assert metrics.latency.count == 4 and metrics.time_to_first_token.count == 3
    assert metrics.latency.sum == pytest.approx(
        sum(r.timings.latency_seconds for r in [*results, streamed[-1].result] if r and r.timings)
    )


# ----- tools: the local service's parsing, the server's, and remote mode's reading of it -----

TOOL_CASES: dict[str, dict] = {
    "required": {"tool_choice": "required"},
    "required, one call": {"tool_choice": "required", "parallel_tool_calls": False},
    "named": {"tool_choice": "NAMED"},
    "auto": {"tool_choice": "auto", "regex": "HERMES_CALL"},
    "none": {"tool_choice": "none"},
}


@pytest.fixture(scope="module")
def hermes_local(demo_model: Path) -> Iterator[VLLMInferenceService]:
    """A local service with the server's tool parser."""
    settings = VLLMSettings(
        model_path=demo_model, max_model_len=2048, tool_parser="hermes", idle_ttl_seconds=3600
    )
    with VLLMInferenceService(settings) as svc:
        yield svc


def tool_options(case: str) -> dict:
    from _tool_cases import GREEDY, HERMES_CALL, NAMED, TOOLS

    options = {"tools": TOOLS, **GREEDY, **TOOL_CASES[case]}
    if options["tool_choice"] == "NAMED":
        options["tool_choice"] = NAMED
    if "regex" in options:
        options["regex"] = HERMES_CALL
    return options


def ask_server(server: VLLMServer, options: dict, stream: bool = False) -> Any:
    """The server's answer (or stream) to QUESTION with a tool case's options, through the
    openai SDK; the service's regex= goes as vLLM's structured_outputs."""
    from _tool_cases import QUESTION

    body = {k: v for k, v in options.items() if k != "regex"}
    extra = {"structured_outputs": {"regex": options["regex"]}} if "regex" in options else {}
    client = openai.OpenAI(base_url=server.url, api_key=API_KEY)
    return client.chat.completions.create(
        model="smol-a", messages=QUESTION, extra_body=extra, stream=stream, **body
    )


@pytest.mark.parametrize("case", TOOL_CASES)
def test_tool_calls_are_the_servers_locally_and_through_remote_mode(
    server: VLLMServer, remote: VLLMInferenceService, hermes_local: VLLMInferenceService,
    case: str,
) -> None:
    from _tool_cases import QUESTION

    options = tool_options(case)
    answer = ask_server(server, options).choices[0]
    expected = [(c.function.name, c.function.arguments) for c in answer.message.tool_calls or ()]
    if case != "none":
        assert expected, f"the server made no call: {answer}"  # else the test proves nothing
    for service in (hermes_local, remote):
        result = service.chat(QUESTION, **options)
        assert result.error is None, (case, result.error)
        assert [(c.name, c.arguments) for c in result.tool_calls] == expected, (case, service)
        assert result.finish_reason == answer.finish_reason, (case, service)
        assert result.text == (answer.message.content or ""), (case, service)
        assert all(c.id for c in result.tool_calls)
    if case == "auto":
        assert answer.finish_reason == "tool_calls"


def joined_stream(chunks: list) -> tuple[str, list[tuple[str | None, str | None, str]]]:
    """A chat stream's text and its calls (id, name, arguments) put together by index, from
    the openai SDK's chunks or the service's."""
    text, calls = [], {}
    for chunk in chunks:
        if hasattr(chunk, "choices"):  # the SDK's: (index, id, name, arguments) per piece
            delta = chunk.choices[0].delta if chunk.choices else None
            text.append((delta and delta.content) or "")
            pieces = [(p.index, p.id, p.function and p.function.name,
                       (p.function and p.function.arguments) or "")
                      for p in (delta and delta.tool_calls) or ()]
        else:
            text.append(chunk.text)
            pieces = [(p.index, p.id, p.name, p.arguments) for p in chunk.tool_calls]
        for index, call_id, name, arguments in pieces:
            call = calls.setdefault(index, [call_id, name, ""])
            call[0], call[1] = call[0] or call_id, call[1] or name
            call[2] += arguments
    return "".join(text), [tuple(calls[k]) for k in sorted(calls)]


@pytest.mark.parametrize("case", TOOL_CASES)
def test_streamed_tool_calls_are_the_servers_locally_and_through_remote_mode(
    server: VLLMServer, remote: VLLMInferenceService, hermes_local: VLLMInferenceService,
    case: str,
) -> None:
    from _tool_cases import QUESTION

    options = tool_options(case)
    chunks = list(ask_server(server, options, stream=True))
    finish_reason = next(c.choices[0].finish_reason for c in reversed(chunks)
                         if c.choices and c.choices[0].finish_reason)
    text, expected = joined_stream(chunks)
    if case != "none":
        assert expected, f"the server streamed no call: {chunks}"
    for service in (hermes_local, remote):
        ours = list(service.chat_stream(QUESTION, **options))
        result = ours[-1].result
        assert result is not None and result.error is None, (case, service)
        got_text, got = joined_stream(ours)
        assert [c[1:] for c in got] == [c[1:] for c in expected], (case, service)
        assert got_text == text == result.text, (case, service)
        assert result.finish_reason == finish_reason, (case, service)
        # The pieces join to the result's calls, each with an id.
        assert got == [(c.id, c.name, c.arguments) for c in result.tool_calls], (case, service)
        assert all(c.id for c in result.tool_calls)


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """``vllm serve`` of the demo embedding model as a pooling model."""
    from vllm_service import demo_embedding_model_path

    log_path = tmp_path_factory.mktemp("vllm-embedding-server") / "server.log"
    # The last --max-model-len wins: the model's own limit (VLLMServer gives 2048).
    srv = VLLMServer(demo_embedding_model_path(), log_path,
                     ["--runner", "pooling", "--max-model-len", "256"])
    try:
        srv.start(api_key=API_KEY)
        yield srv
    finally:
        srv.stop()


def test_remote_embed_gives_the_servers_vectors(embedding_server: VLLMServer) -> None:
    from _embedding_reference import TEXTS, assert_same_vectors, transformers_vectors

    expected, tokens = transformers_vectors(Path(embedding_server.model), TEXTS, "mean")
    client = openai.OpenAI(base_url=embedding_server.url, api_key=API_KEY)
    servers = client.embeddings.create(model=embedding_server.model, input=TEXTS).data
    with VLLMInferenceService(remote_settings(embedding_server)) as service:
        results = service.embed(TEXTS)
        assert all(r.error is None for r in results), [r.error for r in results]
        assert [r.embedding for r in results] == [d.embedding for d in servers]
        assert_same_vectors([r.embedding for r in results], expected)
        assert [r.prompt_tokens for r in results] == tokens
        raw = service.embed(TEXTS[:1], normalize=False)[0]
        assert not math.isclose(math.hypot(*raw.embedding), 1.0, rel_tol=0.01)
        # The server's refusal of one text is that text's error.
        mixed = service.embed([TEXTS[0], "word " * 600, ""])
        assert [r.error is None for r in mixed] == [True, False, False]
        assert "HTTP 400" in mixed[1].error  # type: ignore[operator]
        assert "the text is empty" in mixed[2].error  # type: ignore[operator]


# ----- last: the server goes away and comes back -----


def test_server_stopped_then_restarted(server: VLLMServer, vllm_says: dict[str, str]) -> None:
    service = VLLMInferenceService(remote_settings(server, api_max_retries=1))
    try:
        assert (
            service.generate("The capital of France is", temperature=0, max_tokens=5).text
            == vllm_says["paris5"]
        )
        server.stop()
        started = time.monotonic()
        with pytest.raises(RemoteServerError) as caught:
            service.generate("The capital of France is", max_tokens=5)
        assert time.monotonic() - started < 30
        assert f"Cannot reach the vLLM server at {server.url}" in str(caught.value)

        # Started again without a key (the service's key is then ignored) and named by its path.
        server.start()
        result = service.generate("The capital of France is", temperature=0, max_tokens=5)
        assert result.text == vllm_says["paris5"]
        assert service.is_ready()
    finally:
        service.shutdown()

    # No VLLM_API_KEY at all, and the folder's name for the model served under its path.
    settings = remote_settings(server, api_key=None, model_path=Path(server.model).name)
    with VLLMInferenceService(settings) as service:
        assert service.chat(FRANCE, temperature=0, max_tokens=20).text == vllm_says["france20"]
