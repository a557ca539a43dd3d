"""vllm-service: LLM text generation with vLLM behind one thread-safe object.

>>> from vllm_service import VLLMInferenceService
>>> with VLLMInferenceService() as service:          # settings from VLLM_* variables
...     print(service.generate("What is the capital of France?").text)
"""

from ._stream import AsyncGenerationStream, GenerationStream
from .async_service import AsyncVLLMInferenceService
from .batch import generate
from .demo_model import demo_model_path
from .errors import (
    EngineStalledError,
    RemoteServerError,
    RequestAbortedError,
    RequestTimeoutError,
    ServiceShutdownError,
    VLLMServiceError,
    WeightUpdateError,
    WorkerDiedError,
    WorkerStartError,
)
from .service import Hold, VLLMInferenceService
from .settings import VLLMSettings
from .types import GenerationParams, GenerationResult, ServiceStatus, StreamChunk

__all__ = [
    "AsyncGenerationStream",
    "AsyncVLLMInferenceService",
    "EngineStalledError",
    "GenerationParams",
    "GenerationResult",
    "GenerationStream",
    "Hold",
    "RemoteServerError",
    "RequestAbortedError",
    "RequestTimeoutError",
    "ServiceShutdownError",
    "ServiceStatus",
    "StreamChunk",
    "VLLMInferenceService",
    "VLLMServiceError",
    "VLLMSettings",
    "WeightUpdateError",
    "WorkerDiedError",
    "WorkerStartError",
    "demo_model_path",
    "generate",
]
