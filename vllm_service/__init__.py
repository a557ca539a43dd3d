"""vllm-service: LLM text generation with vLLM behind one thread-safe object.

>>> from vllm_service import VLLMInferenceService
>>> with VLLMInferenceService() as service:          # settings from VLLM_* variables
...     print(service.generate("What is the capital of France?").text)
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version

from ._batch.openai_format import generate_openai_batch
from ._client.streams import AsyncGenerationStream, GenerationStream
from .async_service import AsyncVLLMInferenceService
from .batch import generate
from .demo_model import demo_embedding_model_path, demo_model_path
from .errors import (
    EngineStalledError,
    GenerationError,
    NotSupportedError,
    RemoteServerError,
    RequestAbortedError,
    RequestError,
    RequestTimeoutError,
    ServiceShutdownError,
    VLLMServiceError,
    WeightUpdateError,
    WorkerDiedError,
    WorkerError,
    WorkerStartError,
)
from .service import Hold, VLLMInferenceService
from .settings import VLLMSettings
from .types import (
    Duration,
    EmbeddingResult,
    ErrorType,
    GenerationParams,
    GenerationResult,
    Histogram,
    RequestTimings,
    ServiceMetrics,
    ServiceStatus,
    StreamChunk,
    ToolCall,
    ToolCallDelta,
)

# The installed distribution's version: pyproject.toml's, one place to change it.
try:
    __version__: str = _installed_version("vllm-service")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AsyncGenerationStream",
    "AsyncVLLMInferenceService",
    "Duration",
    "EmbeddingResult",
    "EngineStalledError",
    "ErrorType",
    "GenerationError",
    "GenerationParams",
    "GenerationResult",
    "GenerationStream",
    "Histogram",
    "Hold",
    "NotSupportedError",
    "RemoteServerError",
    "RequestAbortedError",
    "RequestError",
    "RequestTimeoutError",
    "RequestTimings",
    "ServiceMetrics",
    "ServiceShutdownError",
    "ServiceStatus",
    "StreamChunk",
    "ToolCall",
    "ToolCallDelta",
    "VLLMInferenceService",
    "VLLMServiceError",
    "VLLMSettings",
    "WeightUpdateError",
    "WorkerDiedError",
    "WorkerError",
    "WorkerStartError",
    "demo_embedding_model_path",
    "demo_model_path",
    "generate",
    "generate_openai_batch",
]
