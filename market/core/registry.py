"""Who may connect: participant ids, hashed tokens and roles, loaded from TOML.

Tokens are kept only as SHA-256 digests and compared in constant time. A registry file
may give `token` (hashed on load) or `token_sha256` (never stored in clear).

`owner` (optional) names who stands behind an account: accounts of one owner never trade
with each other (the clearing treats such a pair as a self-trade). By default an account
is its own owner; owners share the namespace of ids, so `owner = "P1"` groups an account
with participant P1.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

Role = Literal["prosumer", "dso", "aggregator", "oracle", "operator", "controller"]
ParticipantId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class RegistryEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: ParticipantId
    role: Role = "prosumer"
    token: str | None = None
    token_sha256: str | None = None
    owner: ParticipantId | None = None  # default: the id itself


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Registry:
    def __init__(self, entries: list[RegistryEntry]) -> None:
        self._digest: dict[str, str] = {}
        self._role: dict[str, Role] = {}
        self._owner: dict[str, str] = {}  # only accounts whose owner is not their own id
        for e in entries:
            if e.id in self._role:
                raise ValueError(f"participant {e.id!r} is registered twice")
            digest = e.token_sha256 or (token_digest(e.token) if e.token else None)
            if not digest:
                raise ValueError(f"participant {e.id!r} has no token")
            self._digest[e.id] = digest
            self._role[e.id] = e.role
            if e.owner is not None and e.owner != e.id:
                self._owner[e.id] = e.owner

    @classmethod
    def from_toml(cls, path: str | Path) -> Registry:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Registry:
        entries = msgspec.convert(data.get("participants", []), list[RegistryEntry], strict=True)
        return cls(entries)

    def authenticate(self, auth: object) -> tuple[str, Role] | None:
        """(id, role) for valid credentials, None otherwise (no hint which part was wrong)."""
        if not isinstance(auth, dict):
            return None
        pid, token = auth.get("id"), auth.get("token")
        if not isinstance(pid, str) or not isinstance(token, str) or len(token) > 1024:
            return None
        # Hash an unknown id's token too, so timing does not tell which ids exist.
        expected = self._digest.get(pid, "0" * 64)
        if not hmac.compare_digest(token_digest(token), expected) or pid not in self._role:
            return None
        return pid, self._role[pid]

    def role(self, pid: str) -> Role | None:
        return self._role.get(pid)

    def owner(self, pid: str) -> str:
        """Who stands behind `pid`: its registry `owner`, else `pid` itself."""
        return self._owner.get(pid, pid)

    def owners(self) -> dict[str, str]:
        """participant -> owner for the accounts whose owner is not their own id (the lookup
        the clearing takes; a participant it does not name is its own owner)."""
        return dict(self._owner)

    def ids(self, role: Role | None = None) -> list[str]:
        return sorted(p for p, r in self._role.items() if role is None or r == role)
