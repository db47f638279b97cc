"""Who may connect: participant ids, hashed tokens and roles, loaded from TOML.

Tokens are kept only as SHA-256 digests and compared in constant time. A registry file
may give `token` (hashed on load) or `token_sha256` (never stored in clear).

An entry holds one role (`role = "dso"`, default `prosumer`) or several (`roles = ["dso",
"operator"]`: the seed's DSO is also the market operator). A namespace admits an id that
holds any of its roles, and each event checks that the id holds one of the event's roles;
`role()` is the first role listed, for callers that need one.

`owner` (optional) names who stands behind an account: accounts of one owner never trade
with each other (the clearing treats such a pair as a self-trade). By default an account
is its own owner; owners share the namespace of ids, so `owner = "P1"` groups an account
with participant P1. `address` (optional) is informational: the account's address on the
seed's sidechain, as `microte init parity` copies it from the accounts file.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from market.core.records import GRID_ID

Role = Literal["prosumer", "dso", "aggregator", "oracle", "operator", "controller"]
ParticipantId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class RegistryEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: ParticipantId
    role: Role | None = None  # one role (default prosumer) ...
    roles: list[Role] | None = None  # ... or several, in order (the first is `Registry.role`)
    token: str | None = None
    token_sha256: str | None = None
    owner: ParticipantId | None = None  # default: the id itself
    address: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None

    def role_set(self) -> tuple[Role, ...]:
        """This entry's roles, in order; ValueError naming the entry if they are inconsistent."""
        if self.role is not None and self.roles is not None:
            raise ValueError(f"participant {self.id!r}: give role or roles, not both")
        if self.roles is None:
            return (self.role or "prosumer",)
        if not self.roles:
            raise ValueError(f"participant {self.id!r}: roles is empty")
        for r in self.roles:
            if self.roles.count(r) > 1:
                raise ValueError(f"participant {self.id!r}: role {r!r} is listed twice")
        return tuple(self.roles)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Registry:
    def __init__(self, entries: list[RegistryEntry], path: Path | None = None) -> None:
        self.path = path  # the TOML file it was loaded from (None: built in memory)
        self._digest: dict[str, str] = {}
        self._roles: dict[str, tuple[Role, ...]] = {}
        self._owner: dict[str, str] = {}  # only accounts whose owner is not their own id
        self._address: dict[str, str] = {}
        self._ids: dict[Role | None, tuple[str, ...]] = {}  # `ids`, made once: a registry never changes
        for e in entries:
            if e.id == GRID_ID:
                raise ValueError(
                    f"participant {GRID_ID!r} is reserved: the ledger's grid account, party to every grid purchase "
                    "and sale (it would be sent all of them): choose another id"
                )
            if e.id in self._roles:
                raise ValueError(f"participant {e.id!r} is registered twice")
            digest = e.token_sha256 or (token_digest(e.token) if e.token else None)
            if not digest:
                raise ValueError(f"participant {e.id!r} has no token")
            self._digest[e.id] = digest
            self._roles[e.id] = e.role_set()
            if e.owner is not None and e.owner != e.id:
                self._owner[e.id] = e.owner
            if e.address is not None:
                self._address[e.id] = e.address

    @classmethod
    def from_toml(cls, path: str | Path) -> Registry:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls.from_dict(data, Path(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> Registry:
        """ValueError naming the entry or field (msgspec.ValidationError, a ValueError, for a
        malformed field) for anything that is not a valid registry."""
        entries = msgspec.convert(data.get("participants", []), list[RegistryEntry], strict=True)
        return cls(entries, path)

    def authenticate(self, auth: object) -> tuple[str, Role] | None:
        """(id, first role) for valid credentials, None otherwise (no hint which part was
        wrong). `roles(id)` has every role the id holds."""
        if not isinstance(auth, dict):
            return None
        pid, token = auth.get("id"), auth.get("token")
        if not isinstance(pid, str) or not isinstance(token, str) or len(token) > 1024:
            return None
        # Hash an unknown id's token too, so timing does not tell which ids exist.
        expected = self._digest.get(pid, "0" * 64)
        if not hmac.compare_digest(token_digest(token), expected) or pid not in self._roles:
            return None
        return pid, self._roles[pid][0]

    def role(self, pid: str) -> Role | None:
        """The first role `pid` holds (its only one, unless it has several); None if unknown."""
        found = self._roles.get(pid)
        return found[0] if found else None

    def roles(self, pid: str) -> tuple[Role, ...]:
        """Every role `pid` holds, in registry order (empty if unknown)."""
        return self._roles.get(pid, ())

    def has_role(self, pid: str, *roles: str) -> bool:
        """Whether `pid` holds at least one of `roles`."""
        return any(r in roles for r in self._roles.get(pid, ()))

    def address(self, pid: str) -> str | None:
        return self._address.get(pid)

    def owner(self, pid: str) -> str:
        """Who stands behind `pid`: its registry `owner`, else `pid` itself."""
        return self._owner.get(pid, pid)

    def owners(self) -> dict[str, str]:
        """participant -> owner for the accounts whose owner is not their own id (the lookup
        the clearing takes; a participant it does not name is its own owner)."""
        return dict(self._owner)

    def ids(self, role: Role | None = None) -> list[str]:
        """Every id (None), or the ids holding `role` (among others, for multi-role ids)."""
        ids = self._ids.get(role)
        if ids is None:
            ids = self._ids[role] = tuple(sorted(p for p, rs in self._roles.items() if role is None or role in rs))
        return list(ids)
