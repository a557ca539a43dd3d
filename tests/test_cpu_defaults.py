"""The CPU adaptations: the dtype rule for both kinds of processor, and that the engine uses it.

The rule is pure logic over the processor's flags, checked here for both kinds whatever this
machine is; the engine's own report (``status().dtype``) shows the rule in effect here. The
KV cache's default size (tests/fast/test_kv_sizing.py) is checked on a real engine too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from _reference_engine import engine_dtype

from vllm_service import VLLMInferenceService, VLLMSettings
from vllm_service.testing import (
    adapt_engine_args,
    cpu_dtype,
    cpu_kv_cache_bytes_per_worker,
    worker_config,
)

AVX2_ONLY = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}  # an AMD EPYC without AVX-512
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8", "avx512_fp16"}
ARM_BF16 = {"fp", "asimd", "sve", "bf16", "i8mm"}
ARM_OLD = {"fp", "asimd", "crc32"}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (AVX2_ONLY, "float32"),
        (AVX512_BF16, "auto"),
        (SAPPHIRE_RAPIDS, "auto"),
        (ARM_BF16, "auto"),
        (ARM_OLD, "float32"),
        (AVX2_ONLY | {"avx512f", "avx512bw"}, "float32"),  # AVX-512 without its bf16 part
        (set(), "auto"),  # flags unreadable: vLLM's choice stands
    ],
)
def test_auto_dtype_follows_native_bf16(flags: set[str], expected: str) -> None:
    assert cpu_dtype(flags) == expected


@pytest.mark.parametrize("flags", [AVX2_ONLY, SAPPHIRE_RAPIDS])
def test_an_explicit_dtype_always_wins_and_auto_is_logged(
    demo_model: Path, flags: set[str]
) -> None:
    for explicit in ("bfloat16", "float16", "float32"):
        args, choices = adapt_engine_args({"model": str(demo_model), "dtype": explicit}, flags)
        assert args["dtype"] == explicit
        assert not any("dtype" in choice for choice in choices)
    args, choices = adapt_engine_args({"model": str(demo_model), "dtype": "auto"}, flags)
    if flags is AVX2_ONLY:
        assert args["dtype"] == "float32"
        assert any("dtype=float32" in c and "VLLM_DTYPE" in c for c in choices), choices
    else:
        assert args["dtype"] == "auto" and not any("dtype" in c for c in choices)


def test_the_engine_runs_in_the_dtype_the_rule_picks_here(service: VLLMInferenceService) -> None:
    # The demo model is bf16: vLLM's "auto" keeps that where it is native. VLLM_DTYPE wins.
    expected = "float32" if engine_dtype() == "float32" else "bfloat16"
    assert service.status().dtype == expected


def test_the_default_kv_cache_fits_the_model_and_holds_less_memory_than_a_share_of_free_memory(
    demo_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The suite sizes its engines with VLLM_CPU_KVCACHE_SPACE=1; this worker gets the default.
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    caplog.set_level(logging.WARNING, logger="vllm_service")
    settings = VLLMSettings(model_path=demo_model, idle_ttl_seconds=-1)
    expected, _ = adapt_engine_args(worker_config(settings).engine_args)
    old_rule = cpu_kv_cache_bytes_per_worker(1)  # the former default: a share of free memory
    if old_rule < 2 * 2**30:  # the demo model's four sequences: 0.7 GiB in bf16, 1.4 in float32
        pytest.skip("so little memory is free here that its share is about what the model needs")

    def memory_after_one_answer(settings: VLLMSettings) -> int:
        with VLLMInferenceService(settings) as service:
            assert service.generate("Hello", temperature=0, max_tokens=4).finish_reason
            return service.status().memory_bytes

    sized = memory_after_one_answer(settings)
    gib = expected["kv_cache_memory_bytes"] / 2**30
    assert f"KV cache set to {gib:.2f} GiB for 4 sequences of max_model_len 8192" in caplog.text
    shared = memory_after_one_answer(
        settings.model_copy(update={"engine_args": {"kv_cache_memory_bytes": old_rule}})
    )
    # The KV cache is allocated (zeroed) at start, so the difference shows in resident memory.
    saved = old_rule - expected["kv_cache_memory_bytes"]
    assert sized < shared - saved // 2, (sized, shared, saved)


def test_the_users_kv_cache_size_and_max_num_seqs_win(
    demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    requested = {"model": str(demo_model), "max_model_len": 2048, "dtype": "float32"}
    args, _ = adapt_engine_args({**requested, "max_num_seqs": 2})
    assert args["kv_cache_memory_bytes"] == 2 * 2048 * (2 * 30 * 3 * 64 * 4)
    args, choices = adapt_engine_args({**requested, "kv_cache_memory_bytes": 300 << 20})
    assert args["kv_cache_memory_bytes"] == 300 << 20
    assert not any("KV cache" in choice for choice in choices)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM's own variable, read by vLLM
    args, choices = adapt_engine_args(requested)
    assert "kv_cache_memory_bytes" not in args
    assert not any("KV cache" in choice for choice in choices)
