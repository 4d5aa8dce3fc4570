from __future__ import annotations

import json
import re

from lambda_split._service import ServiceError, TrunkService
from lambda_split.protocol import (
    FRAME_CONTENT_TYPE,
    HEALTH_PATH,
    INFO_PATH,
    SESSIONS_PATH,
    error_body,
)
from secure_channel import Request, Response, Transport, WireStats

_SESSION = re.compile(re.escape(SESSIONS_PATH) + r"/([0-9a-f]{1,64})(/step)?\Z")


class LocalTransport(Transport):
    """Calls a trunk in this process, with no network and no security. For tests and notebooks."""

    security = "plain"

    def __init__(self, service: TrunkService, info: dict[str, object], *, owner: str = "local") -> None:
        self.service = service
        self.info = info
        self.owner = owner
        self.stats = WireStats()

    def exchange(self, request: Request) -> Response:
        self.stats.bytes_sent += len(request.content)
        response = self._dispatch(request)
        self.stats.bytes_received += len(response.content)
        return response

    def _dispatch(self, request: Request) -> Response:
        try:
            route = (request.method, request.path)
            if route == ("GET", HEALTH_PATH):
                return _json(200, {"status": "ok"})
            if route == ("GET", INFO_PATH):
                return _json(200, self.info)
            if route == ("POST", SESSIONS_PATH):
                body = json.loads(request.content or b"{}")
                receipts = body.get("receipts") is True
                wire, depth = str(body.get("wire", "fp32")), body.get("head_depth")
                return _json(
                    201, self.service.open_session(self.owner, wire, receipts=receipts, head_depth=depth)
                )
            match = _SESSION.match(request.path)
            if match and request.method == "POST" and match[2]:
                body = self.service.step(self.owner, match[1], request.content)
                return Response(200, body, {"content-type": FRAME_CONTENT_TYPE})
            if match and request.method == "DELETE" and not match[2]:
                self.service.close_session(self.owner, match[1])
                return _json(200, {"closed": True})
            return Response(404, error_body("not_found", "no such endpoint"))
        except ServiceError as exc:
            return Response(exc.status, error_body(exc.code, exc.message))


def _json(status: int, data: object) -> Response:
    return Response(status, json.dumps(data).encode(), {"content-type": "application/json"})
