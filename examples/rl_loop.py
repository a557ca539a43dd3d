"""A minimal RL-style loop: sample with logprobs, take a training step, push the weights, repeat.

    python examples/rl_loop.py [--steps 3]

The policy is the demo model (or ``VLLM_MODEL_PATH``), trained here with ``transformers``;
vllm-service samples from it with vLLM. Each step:

1. sample answers with the logprob of every token, and the version of the weights used;
2. score them (the toy reward: answers of at most 12 words), and check that the trainer's
   own logprobs of the sampled tokens match vLLM's (they differ when the weights do);
3. one REINFORCE step on the trainer's copy;
4. ``update_weights(policy.state_dict(), version=step)``: the engine has the new weights
   in about a second, without a restart, and the next samples say so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from vllm_service import GenerationResult, VLLMInferenceService, VLLMSettings, demo_model_path

PROMPTS = [
    "Name a colour.",
    "What is two plus two?",
    "Describe the sea.",
    "Who wrote Hamlet?",
    "Give me a word that rhymes with cat.",
    "What do bees make?",
    "Tell me about the moon.",
    "What is the capital of Italy?",
]
SAMPLING: dict[str, Any] = {"temperature": 1.0, "max_tokens": 24, "logprobs": 0}


def reward(text: str) -> float:
    """The toy goal: short answers."""
    return 1.0 if len(text.split()) <= 12 else 0.0


def run(
    service: VLLMInferenceService, model_path: Path, steps: int, lr: float = 1e-4,
    push_steps: int | None = None,
) -> list[dict[str, Any]]:
    """The loop; one dict of figures per step. Only the first ``push_steps`` steps (all when
    None) push their weights: after that the engine falls behind the trainer."""
    import torch
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    figures = []
    for step in range(1, steps + 1):
        results = service.chat_batch([[{"role": "user", "content": p}] for p in PROMPTS], **SAMPLING)
        versions = {r.weight_version for r in results}
        rewards = [reward(r.text) for r in results]
        baseline = statistics.mean(rewards)

        policy.train()
        gaps, loss = [], torch.zeros(())
        for result, score in zip(results, rewards, strict=True):
            logprobs = _trainer_logprobs(policy, result)
            vllm_logprobs = torch.tensor([t.logprob for t in result.logprobs or []])
            gaps.append((logprobs.detach() - vllm_logprobs).abs().mean().item())
            loss = loss - (score - baseline) * logprobs.sum()
        (loss / len(results)).backward()
        optimizer.step()
        optimizer.zero_grad()

        started = time.perf_counter()
        if push_steps is None or step <= push_steps:
            service.update_weights(policy.state_dict(), version=step)
        figures.append({
            "step": step,
            "sampled_with": versions.pop() if len(versions) == 1 else versions,
            "mean_reward": baseline,
            "logprob_gap": statistics.mean(gaps),
            "update_seconds": time.perf_counter() - started,
        })
        print(
            f"step {step}: sampled with weights {figures[-1]['sampled_with']!r}, mean reward "
            f"{baseline:.2f}, |trainer - vLLM| logprob {figures[-1]['logprob_gap']:.4f}, "
            f"update_weights {figures[-1]['update_seconds']:.2f} s",
            flush=True,
        )
    return figures


def _trainer_logprobs(policy: Any, result: GenerationResult) -> Any:
    """The trainer's logprob of each sampled token, given the prompt as vLLM saw it."""
    import torch

    prompt, answer = result.prompt_token_ids or [], result.token_ids
    ids = torch.tensor([prompt + answer])
    logits = policy(ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(answer)[:, None])[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_MAX_MODEL_LEN", "2048")
    model_path = Path(os.environ.get("VLLM_MODEL_PATH") or demo_model_path())
    with VLLMInferenceService(VLLMSettings(model_path=model_path)) as service:
        run(service, model_path, args.steps)


if __name__ == "__main__":
    main()
