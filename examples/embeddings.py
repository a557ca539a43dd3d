"""Search a few documents by meaning: embed them and the question with the demo embedding
model (sentence-transformers' all-MiniLM-L6-v2, run as vLLM's pooling model), and rank the
documents by cosine similarity (docs/embeddings.md). Run: .venv/bin/python examples/embeddings.py
"""

from vllm_service import VLLMInferenceService, VLLMSettings, demo_embedding_model_path

DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "Bananas are rich in potassium.",
    "The Eiffel Tower was finished in 1889.",
    "Cats sleep for most of the day.",
]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))  # the vectors have unit length


if __name__ == "__main__":
    settings = VLLMSettings(model_path=demo_embedding_model_path(), runner="pooling")
    with VLLMInferenceService(settings) as service:
        question, *documents = service.embed(["Which city is France's capital?", *DOCUMENTS])
        print(len(question.embedding), "numbers per text")
        ranked = sorted(zip(documents, DOCUMENTS), key=lambda d: -cosine(question.embedding, d[0].embedding))
        for result, text in ranked:
            print(f"{cosine(question.embedding, result.embedding):.3f}  {text}")
