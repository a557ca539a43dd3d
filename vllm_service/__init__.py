"""vllm-service: LLM text generation with vLLM behind one thread-safe object.

>>> from vllm_service import VLLMInferenceService
>>> with VLLMInferenceService() as service:          # settings from VLLM_* variables
...     print(service.generate("What is the capital of France?").text)
"""

from .batch import generate
from .demo_model import demo_model_path
from .errors import (
    RemoteServerError,
    RequestTimeoutError,
    ServiceShutdownError,
    VLLMServiceError,
    WorkerDiedError,
    WorkerStartError,
)
from .service import VLLMInferenceService
from .settings import VLLMSettings
from .types import GenerationParams, GenerationResult, ServiceStatus

__all__ = [
    "GenerationParams",
    "GenerationResult",
    "RemoteServerError",
    "RequestTimeoutError",
    "ServiceShutdownError",
    "ServiceStatus",
    "VLLMInferenceService",
    "VLLMServiceError",
    "VLLMSettings",
    "WorkerDiedError",
    "WorkerStartError",
    "demo_model_path",
    "generate",
]
