"""Error codes of PROTOCOL.md: every refused action becomes one of these, and changes no state."""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "invalid",
    "unauthorized",
    "forbidden",
    "closed",
    "conflict",
    "not_found",
    "too_large",
    "rate_limited",
    "unavailable",
]


class MarketError(Exception):
    """A refused client action: `code` is a PROTOCOL.md error code, `message` says why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message

    def reply(self) -> dict[str, object]:
        return {"ok": False, "error": {"code": self.code, "message": self.message}}


class IllegalTransition(Exception):
    """An event the lifecycle table does not allow in the current phase (a bug, not bad input)."""
