"""The routing key on the server side: read it from a request, compare it with a session's, refuse.

A session of the sealed channel is bound to the ``x-lambda-route`` its handshake carried (the
key is in the transcript, see :mod:`._handshake`); every later request of the session must carry
the same key in the clear, or it gets ``421 route_mismatch``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from secure_channel._handshake import _route_context
from secure_channel._wire import ROUTE_HEADER, _error_body

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
#: 421 Misdirected Request: this server cannot answer for that routing key.
ROUTE_MISMATCH_STATUS = 421
ROUTE_MISMATCH = "route_mismatch"
ROUTE_MISMATCH_MESSAGE = f"the {ROUTE_HEADER} header differs from the routing key this channel was bound to"


class _RouteMismatch(Exception):
    """A handshake's msg3 carried another routing key than its msg1."""


def _request_route(scope: MutableMapping[str, Any]) -> str:
    """The clear-text routing key of a request ("" if none); ValueError if malformed."""
    raw: bytes = dict(scope["headers"]).get(ROUTE_HEADER.encode(), b"")
    try:
        route = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("bad routing key") from None
    _route_context(route)
    return route


def _same_route(scope: MutableMapping[str, Any], bound: str) -> bool:
    """True if the request carries exactly the routing key ``bound``."""
    try:
        return _request_route(scope) == bound
    except ValueError:
        return False


async def _send_route_mismatch(send: Send) -> None:
    body = _error_body(ROUTE_MISMATCH, ROUTE_MISMATCH_MESSAGE)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": ROUTE_MISMATCH_STATUS, "headers": headers})
    await send({"type": "http.response.body", "body": body})
