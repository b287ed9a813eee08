"""Chat backends: the interface (`ChatRequest`, `ChatResult`, `ChatBackend`), an OpenAI-compatible
HTTP client, and an on-disk cache so that no call is paid for twice."""

from pvjax.llm.base import ChatBackend, ChatRequest, ChatResult, LLMError
from pvjax.llm.cache import CachedBackend, ChatCache
from pvjax.llm.openai_http import OpenAIChat

__all__ = [
    "CachedBackend",
    "ChatBackend",
    "ChatCache",
    "ChatRequest",
    "ChatResult",
    "LLMError",
    "OpenAIChat",
]
