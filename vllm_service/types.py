"""What a caller passes in (:class:`GenerationParams`) and gets back (:class:`GenerationResult`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["stop", "length", "error"]

# vLLM keeps counts in 32-bit tensors and sends seeds as 64-bit integers; a larger value
# fails deep inside the engine, so it is refused here.
MAX_INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1


class GenerationParams(BaseModel):
    """Sampling parameters; a field left as ``None`` falls back to the service's default.

    Bad values (a negative temperature, ``top_p`` above 1, a seed beyond 64 bits, NaN, ...)
    raise ``ValueError`` here, before anything reaches the worker. The ranges are vLLM's own.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32, description="-1 or 0 disables top-k.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: list[str] | None = Field(None, description="Stop strings; a single str is one.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    ignore_eos: bool | None = Field(
        None, description="Keep generating past the end-of-sequence token (benchmarks)."
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and any(isinstance(v, str) and not v for v in value):
            raise ValueError("stop strings must not be empty")
        return value

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


WorkerState = Literal["stopped", "starting", "ready", "retiring", "stopping"]


@dataclass(frozen=True)
class ServiceStatus:
    """What the service's worker is doing now, from :meth:`VLLMInferenceService.status`.

    Asking never starts a worker and never keeps one alive. Times are epoch seconds.
    """

    state: WorkerState
    """``"stopped"`` (no worker; the next call starts one), ``"starting"`` (loading the model),
    ``"ready"``, ``"retiring"`` (idle TTL passed, exiting) or ``"stopping"`` (shut down)."""
    pid: int | None
    """The worker process's pid, or ``None`` when there is none."""
    mode: Literal["local", "remote"]
    model: str
    """The model as configured, or as the worker loaded or found it once ready."""
    dtype: str | None
    """The dtype the engine runs in (local mode, once ready), e.g. ``"float32"``."""
    started_at: float | None
    """When the current worker was started."""
    load_seconds: float | None
    """How long the current worker took to become ready."""
    in_flight: int
    """Requests sent to the worker and not finished yet."""
    requests_served: int
    """Requests finished (with a result or an error result) since the service was made."""
    restarts: int
    """Workers started after the first (idle TTL, crashes)."""
    last_error: str | None
    """The last worker failure (a failed start, a dead worker), if any."""
    expires_at: float | None
    """When the worker retires if nothing comes; ``None`` while busy or with no worker."""
    memory_bytes: int
    """Resident memory of the worker and its engine processes, 0 with no worker."""
