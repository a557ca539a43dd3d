"""The CPU KV cache's default size: what the model needs, within a share of free memory.

Pure logic over a model's config and the machine's free memory, so any model and machine
can be given; ``tests/test_cpu_defaults.py`` checks the size a real engine starts with, and
``tests/test_batch.py`` the size of a batch run's workers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vllm_service.testing import (
    batch_worker_configs,
    cpu_kv_cache_bytes_per_worker,
    cpu_kv_cache_need,
    kv_bytes_per_token,
)

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


# ----- a batch run's CPU workers -----


@pytest.mark.parametrize(
    ("workers", "sequences", "available", "expected"),
    [
        (1, 8, 20 * GiB, 8 * 4096 * 23040),  # 8 sequences of the run's max_model_len
        (2, 8, 20 * GiB, 8 * 4096 * 23040),  # ... each worker, within its own share
        (1, 256, 20 * GiB, 3 * GiB),  # vLLM's max_num_seqs of full sequences: the share
        (2, 256, 20 * GiB, 3 * GiB // 2),  # ... split between the workers
        (4, 1, 2 * GiB, 4096 * 23040),  # one sequence, though that is more than the share
    ],
)
def test_a_batch_worker_holds_its_chunks_sequences_within_its_share_of_free_memory(
    workers: int, sequences: int, available: int, expected: int
) -> None:
    assert cpu_kv_cache_bytes_per_worker(
        workers, available, bytes_per_token=23040, max_model_len=4096, sequences=sequences,
    ) == expected


def test_without_the_models_figures_or_the_sequences_a_batch_worker_gets_its_share() -> None:
    assert cpu_kv_cache_bytes_per_worker(2, 20 * GiB) == 3 * GiB // 2
    assert cpu_kv_cache_bytes_per_worker(2, 20 * GiB, sequences=8) == 3 * GiB // 2
    assert cpu_kv_cache_bytes_per_worker(
        2, 20 * GiB, bytes_per_token=23040, max_model_len=4096,
    ) == 3 * GiB // 2


@pytest.fixture
def smollm2_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A model folder with the demo model's config.json, and no KV cache size from the user."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 8192, **SMOLLM2}
    ))
    return str(tmp_path)


def kv_sizes(model: str, worker_num: int = 1, **arguments: Any) -> list[int]:
    """Each local CPU worker's KV cache for a generate() with ``arguments`` (float32)."""
    configs = batch_worker_configs(
        model, worker_num, max_model_len=512, dtype="float32", gpus=[],
        cores=[[0], [1]], **arguments,
    )
    return [config.engine_args.get("kv_cache_memory_bytes") for config in configs]


def test_a_batch_workers_sequences_are_its_chunks_items_times_their_samples(
    smollm2_folder: str,
) -> None:
    one = 512 * kv_bytes_per_token(SMOLLM2, "float32")  # 22.5 MiB
    assert kv_sizes(smollm2_folder, items=8) == [8 * one]  # a chunk is all the items
    assert kv_sizes(smollm2_folder, 2, items=8) == [4 * one, 4 * one]  # half of them each
    assert kv_sizes(smollm2_folder, items=8, chunk_size=2, n=3) == [6 * one]
    # vLLM runs at most max_num_seqs at once: the user's, or its own (256 per rank on CPU).
    assert kv_sizes(smollm2_folder, items=100, engine_args={"max_num_seqs": 5}) == [5 * one]
    # 10 000 items: vLLM's 256 at once need 5.6 GiB, more than the share (at most 4 GiB).
    (many,) = kv_sizes(smollm2_folder, items=10_000)
    (share,) = kv_sizes(smollm2_folder)  # the sequences unknown
    assert many < 256 * one and many == pytest.approx(share, rel=0.05)  # free memory moves


def test_the_users_kv_cache_size_wins_over_a_batch_workers_own(
    smollm2_folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = {"kv_cache_memory_bytes": 300 * MiB}
    assert kv_sizes(smollm2_folder, items=8, engine_args=given) == [300 * MiB]
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM's own variable, read by vLLM
    assert kv_sizes(smollm2_folder, items=8) == [None]
