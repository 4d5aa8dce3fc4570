"""An OpenAI-compatible endpoint and a chat page on the device, in front of a split model.

The device holds the tokenizer, the head, the tail and the sampling, so text never leaves it:
the trunk server sees hidden states only, in the security mode the client was connected with.
``lambda-split local`` runs this; see README.md, "A local OpenAI-compatible endpoint".
"""

from __future__ import annotations

from lambda_split.local_api._app import build_app
from lambda_split.local_api._conversations import Conversation, ConversationCache
from lambda_split.local_api._engine import Completion, LocalEngine
from lambda_split.local_api._schema import APIError, ChatRequest, parse_chat_request
from lambda_split.local_api._serve import BackgroundLocal, ListenError, LocalServer, bind, is_loopback

__all__ = [
    "APIError",
    "BackgroundLocal",
    "ChatRequest",
    "Completion",
    "Conversation",
    "ConversationCache",
    "ListenError",
    "LocalEngine",
    "LocalServer",
    "bind",
    "build_app",
    "is_loopback",
    "parse_chat_request",
]
