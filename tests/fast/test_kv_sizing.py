"""The CPU KV cache's default size: what the model needs, within a share of free memory.

Pure logic over a model's config and the machine's free memory, so any model and machine
can be given; ``tests/test_cpu_defaults.py`` checks the size a real engine starts with.
"""

from __future__ import annotations

import pytest

from vllm_service.testing import cpu_kv_cache_need, kv_bytes_per_token

GiB = 1 << 30
MiB = 1 << 20
# The demo model's config.json (SmolLM2-135M-Instruct), the parts the rule reads.
SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "hidden_size": 576}


def test_a_token_takes_keys_and_values_of_every_layer_and_kv_head() -> None:
    assert kv_bytes_per_token(SMOLLM2, "auto") == 2 * 30 * 3 * 64 * 2  # 22.5 KiB in bf16
    assert kv_bytes_per_token(SMOLLM2, "bfloat16") == kv_bytes_per_token(SMOLLM2, "float16")
    assert kv_bytes_per_token(SMOLLM2, "float32") == 2 * kv_bytes_per_token(SMOLLM2, "auto")
    assert kv_bytes_per_token(SMOLLM2, "float32", kv_cache_dtype="fp8_e4m3") == 2 * 30 * 3 * 64


def test_missing_figures_are_derived_or_leave_the_size_to_free_memory() -> None:
    # No num_key_value_heads: every head has its own (multi-head attention); no head_dim:
    # hidden_size over the heads.
    gpt_like = {"num_hidden_layers": 12, "num_attention_heads": 12, "hidden_size": 768}
    assert kv_bytes_per_token(gpt_like, "auto") == 2 * 12 * 12 * 64 * 2
    assert kv_bytes_per_token({}, "auto") is None
    assert kv_bytes_per_token({"num_hidden_layers": 30}, "auto") is None


def test_the_demo_model_gets_four_full_sequences_far_below_the_old_share() -> None:
    per_token = kv_bytes_per_token(SMOLLM2, "auto")
    size = cpu_kv_cache_need(per_token, 8192, available_bytes=20 * GiB)
    assert size == 4 * 8192 * per_token == 720 * MiB
    assert size < 3 * GiB  # the old rule: 15 % of free memory, at least 1 GiB


@pytest.mark.parametrize(
    ("max_num_seqs", "available", "expected"),
    [
        (2, 20 * GiB, 2 * 8192 * 23040),  # the user's max_num_seqs counts
        (256, 20 * GiB, 3 * GiB),  # what 256 full sequences need: at most 15 % of free memory
        (256, 100 * GiB, 4 * GiB),  # ... and at most 4 GiB
        (256, 2 * GiB, 1 * GiB),  # ... of which at least 1 GiB
    ],
)
def test_what_the_sequences_need_is_bounded_by_the_share_of_free_memory(
    max_num_seqs: int, available: int, expected: int
) -> None:
    assert cpu_kv_cache_need(23040, 8192, max_num_seqs, available) == expected


def test_one_full_sequence_fits_even_above_the_share_of_free_memory() -> None:
    # vLLM refuses to start without room for one sequence of max_model_len.
    per_token = 128 * 1024  # an 8B model in bf16
    assert cpu_kv_cache_need(per_token, 32768, available_bytes=8 * GiB) == 4 * GiB
    assert cpu_kv_cache_need(per_token, 65536, available_bytes=8 * GiB) == 8 * GiB


def test_without_the_models_figures_the_share_of_free_memory_stands() -> None:
    assert cpu_kv_cache_need(None, 8192, available_bytes=20 * GiB) == 3 * GiB
    assert cpu_kv_cache_need(23040, None, available_bytes=20 * GiB) == 3 * GiB
