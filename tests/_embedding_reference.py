"""What transformers gives for a text: the reference the embedding tests hold vLLM's vectors
to (tests/test_embeddings.py, tests/test_remote.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

TEXTS = [
    "The capital of France is Paris.",
    "Bananas are yellow.",
    "A cat sleeps on the sofa.",
    "Die Hauptstadt von Frankreich ist Paris.",
]


def transformers_vectors(
    model: Path, texts: list[str], pooling: Literal["mean", "last"], normalize: bool = True
) -> tuple[list[list[float]], list[int]]:
    """Each text's vector from transformers (one text at a time: no padding) and its tokens:
    sentence-transformers' mean pooling, or the last token's hidden state (vLLM's pooling
    of a causal LM converted to embed)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    network = AutoModel.from_pretrained(model, dtype=torch.float32)
    vectors, tokens = [], []
    for text in texts:
        batch = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = network(**batch).last_hidden_state[0]
        vector = hidden.mean(0) if pooling == "mean" else hidden[-1]
        if normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        vectors.append(vector.tolist())
        tokens.append(int(batch["input_ids"].shape[1]))
    return vectors, tokens


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def assert_same_vectors(got: list[list[float]], expected: list[list[float]]) -> None:
    """As close as float32 (or bf16, on a processor that has it) arithmetic allows."""
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert len(a) == len(b), index
        assert cosine(a, b) > 0.999, (index, cosine(a, b))
        assert math.isclose(math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b)),
                            rel_tol=0.01), index
