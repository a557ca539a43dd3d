"""What a caller passes in (:class:`GenerationParams`) and gets back (:class:`GenerationResult`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "error"]


class GenerationParams(BaseModel):
    """Sampling parameters; a field left as ``None`` falls back to the service's default.

    Bad values (a negative temperature, ``top_p`` above 1, ...) raise ``ValueError`` here,
    before anything reaches the worker.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float | None = Field(None, ge=0, description="0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 disables top-k.")
    max_tokens: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    ignore_eos: bool | None = Field(
        None, description="Keep generating past the end-of-sequence token (benchmarks)."
    )

    def merged(self, overrides: dict[str, Any]) -> GenerationParams:
        """These parameters with ``overrides`` (keyword arguments of a call) on top."""
        unknown = set(overrides) - set(type(self).model_fields)
        if unknown:
            raise TypeError(
                f"unknown generation parameter(s) {sorted(unknown)}; "
                f"known: {sorted(type(self).model_fields)}"
            )
        values = self.model_dump(exclude_none=True)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationParams(**values)


@dataclass(frozen=True)
class GenerationResult:
    """One generated completion.

    ``finish_reason`` is ``"stop"`` (the model ended or a stop string matched),
    ``"length"`` (``max_tokens`` reached) or ``"error"``; on ``"error"`` the message is in
    :attr:`error` and :attr:`text` is empty.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    error: str | None = None

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens
