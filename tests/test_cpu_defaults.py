"""The CPU adaptations: the dtype rule for both kinds of processor, and that the engine uses it.

The rule is pure logic over the processor's flags, checked here for both kinds whatever this
machine is; the engine's own report (``status().dtype``) shows the rule in effect here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _reference_engine import engine_dtype

from vllm_service import VLLMInferenceService
from vllm_service.testing import adapt_engine_args, cpu_dtype

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
