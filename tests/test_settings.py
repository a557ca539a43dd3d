"""VLLMSettings: environment, .env, code overrides, validation messages. No engine needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_service import GenerationParams, VLLMSettings
from vllm_service.testing import worker_config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("VLLM_") and name != "VLLM_CPU_KVCACHE_SPACE":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_seed_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MODEL_PATH", "org/model")
    s = VLLMSettings()
    assert (s.gpu_memory_utilization, s.max_model_len, s.tensor_parallel_size) == (0.9, 32768, 1)
    assert (s.dtype, s.idle_ttl_seconds, s.trust_remote_code) == ("auto", 1800, False)
    assert (s.default_temperature, s.default_top_p, s.default_top_k) == (0.7, 0.95, -1)
    assert (s.default_max_tokens, s.default_repetition_penalty, s.mode) == (2048, 1.0, "local")
    assert s.api_url is None


def test_environment_and_dotenv_and_code_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("VLLM_MODEL_PATH=org/from-dotenv\nVLLM_MAX_MODEL_LEN=1024\n")
    assert VLLMSettings().model_path == "org/from-dotenv"
    monkeypatch.setenv("VLLM_MAX_MODEL_LEN", "2048")
    monkeypatch.setenv("VLLM_ENGINE_ARGS", '{"enforce_eager": true, "max_num_seqs": 8}')
    s = VLLMSettings()
    assert s.max_model_len == 2048  # the environment wins over .env
    assert s.engine_args == {"enforce_eager": True, "max_num_seqs": 8}
    assert VLLMSettings(max_model_len=512).max_model_len == 512  # code wins over both


def test_vllm_own_variables_are_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLLM_MODEL_PATH", "org/model")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    (tmp_path / ".env").write_text("VLLM_USE_V1=1\nVLLM_LOGGING_LEVEL=DEBUG\n")
    assert VLLMSettings().model_path == "org/model"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VLLM_GPU_MEMORY_UTILIZATION", "2"),
        ("VLLM_IDLE_TTL_SECONDS", "soon"),
        ("VLLM_MODE", "foo"),
        ("VLLM_MAX_MODEL_LEN", "lots"),
        ("VLLM_DTYPE", "int3"),
        ("VLLM_ENGINE_ARGS", "not json"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv("VLLM_MODEL_PATH", "org/model")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        VLLMSettings()


def test_missing_model_path_names_the_variable() -> None:
    with pytest.raises(ValueError, match="VLLM_MODEL_PATH"):
        VLLMSettings()


def test_local_model_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="VLLM_MODEL_PATH.*does not exist"):
        VLLMSettings(model_path=tmp_path / "nope")
    # a hub id is passed on to vLLM; in remote mode the path lives on the server
    assert VLLMSettings(model_path="org/model").model_path == "org/model"
    remote = VLLMSettings(model_path="/srv/models/x", mode="remote", api_url="http://127.0.0.1:1/v1")
    assert remote.model_path == "/srv/models/x"


def test_remote_mode_needs_url() -> None:
    with pytest.raises(ValueError, match="VLLM_API_URL"):
        VLLMSettings(model_path="org/model", mode="remote")


def test_api_key_is_never_shown() -> None:
    s = VLLMSettings(model_path="org/model", mode="remote", api_url="http://x/v1", api_key="sk-secret-123")
    assert "sk-secret-123" not in repr(s) and "sk-secret-123" not in str(s)
    assert "sk-secret-123" not in repr(worker_config(s))
    with pytest.raises(ValueError) as info:
        VLLMSettings(model_path="org/model", api_key="sk-secret-123", startup_timeout_seconds=-1)
    assert "sk-secret-123" not in str(info.value)


def test_engine_args_pass_through(tmp_path: Path) -> None:
    s = VLLMSettings(model_path=tmp_path, engine_args={"enforce_eager": False, "seed": 7}, dtype="bfloat16")
    config = worker_config(s)
    assert config.engine_args["model"] == str(tmp_path.resolve())
    assert config.engine_args["dtype"] == "bfloat16"
    assert config.engine_args["enforce_eager"] is False and config.engine_args["seed"] == 7


def test_generation_params_validation_and_merge() -> None:
    with pytest.raises(ValueError, match="temperature"):
        GenerationParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(top_p=1.5)
    base = GenerationParams(temperature=0.9, max_tokens=100)
    merged = base.merged({"temperature": 0.1})
    assert (merged.temperature, merged.max_tokens) == (0.1, 100)
    with pytest.raises(TypeError, match="tempurature"):
        base.merged({"tempurature": 0.1})


def test_every_setting_is_documented() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    example = (root / ".env.example").read_text()
    for name in VLLMSettings.model_fields:
        variable = f"VLLM_{name.upper()}"
        assert f"`{variable}`" in readme, f"{variable} missing from the README's table"
        assert variable in example, f"{variable} missing from .env.example"
