from __future__ import annotations

from collections.abc import Callable

from secure_channel._base import Request, Response, SecurityMode, Transport, WireStats


class MockTransport(Transport):
    """Turns a function ``Request -> Response`` into a transport, for tests.

    ``security`` is only a label; nothing is encrypted.
    """

    def __init__(self, handler: Callable[[Request], Response], *, security: SecurityMode = "plain") -> None:
        if not callable(handler):
            raise TypeError("handler must be callable")
        self._handler = handler
        self.security = security
        self.stats = WireStats()

    def exchange(self, request: Request) -> Response:
        response = self._handler(request)
        self.stats.bytes_sent += len(request.content)
        self.stats.bytes_received += len(response.content)
        return response
