"""Stand-in for ComfyUI's ``server.PromptServer``, for unit tests.

``PromptServer.instance.routes`` records ``(method, path, handler)`` for every decorated route
(aiohttp is not needed); ``send_sync`` records ``(event, data, sid)``.
"""
from __future__ import annotations


class RouteRecorder:
    """The decorator surface of ``aiohttp.web.RouteTableDef`` used by custom nodes."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, str, object]] = []

    def route(self, method: str, path: str, **_kwargs):
        def register(handler):
            self.routes.append((method.upper(), path, handler))
            return handler
        return register

    def get(self, path: str, **kwargs):
        return self.route("GET", path, **kwargs)

    def post(self, path: str, **kwargs):
        return self.route("POST", path, **kwargs)

    def find(self, method: str, path: str):
        """Stub only: the handler registered for ``method path`` or None."""
        return next((h for m, p, h in self.routes if m == method.upper() and p == path), None)

    def __iter__(self):
        return iter(self.routes)


class PromptServer:
    instance: "PromptServer"

    def __init__(self, loop=None) -> None:
        PromptServer.instance = self
        self.loop = loop
        self.routes = RouteRecorder()
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sent: list[tuple[str, object, object]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.sent.append((event, data, sid))


PromptServer(None)
