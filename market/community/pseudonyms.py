"""Pseudonyms of the `/grid` market (seed 000): what its ledger tables and its messages carry
in place of registry ids (docs/parity.md, *Pseudonyms*).

Two sources, chosen by the `[parity.pseudonyms]` table (`PseudonymConfig`):

- **keyed HMAC** (the default): `ps-` and the first 32 hex digits of
  HMAC-SHA256(key, b"microte/grid pseudonym v1\\x00" + id). The operator holds the key, a
  file of 64 hex digits with mode 0600 (`read_key`, `create_key`); without it a pseudonym
  says nothing about the id, with it and the registry `resolve` finds the id.
- **an external service** (the seed's `pseudonomizerWebService`, `enabled`, `timeout`):
  `GET <url>=<id>` (the URL ends with the name of its query parameter, as the reference
  calls it; `?id` is added to a URL without a query), answered `200` with
  `{"pseudonym": "..."}` within `timeout` seconds.

Every new pseudonym is checked before it is used: 1 to 64 of `A-Z a-z 0-9 _ . : -` (the
ledger's `/`-separated ids stay unambiguous), not a registry id, not the pseudonym of
another id. A source that is slow, fails or answers anything else raises `PseudonymError`
(its message names the source, never the id), and the caller writes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

PREFIX = "ps-"
DOMAIN = b"microte/grid pseudonym v1\x00"
KEY_FILE = "pseudonym.key"  # the default key: beside the registry file
_VALID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class PseudonymError(Exception):
    """No pseudonym could be had (its message names the source, never the id)."""


# -- keyed HMAC (pure) -----------------------------------------------------------------------


def hmac_pseudonym(key: bytes, pid: str) -> str:
    return PREFIX + hmac.new(key, DOMAIN + pid.encode(), hashlib.sha256).hexdigest()[:32]


def resolve(key: bytes, pseudonym: str, ids: Iterable[str]) -> str | None:
    """The id among `ids` whose keyed pseudonym is `pseudonym` (None: none of them)."""
    for pid in ids:
        if hmac.compare_digest(hmac_pseudonym(key, pid), pseudonym):
            return pid
    return None


def read_key(path: str | Path) -> bytes:
    """The key in `path` (64 hex digits); ValueError naming the file otherwise."""
    text = Path(path).read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ValueError(f"{path}: not a pseudonym key (64 hex digits, as `microte init parity` writes)")
    return key


def create_key(path: str | Path) -> bytes:
    """A new random key in a new file `path`, mode 0600 (FileExistsError if it exists)."""
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


class Source(Protocol):
    name: str  # for messages: "keyed HMAC", "the pseudonymization service <url>"

    async def fetch(self, ids: Sequence[str]) -> dict[str, str]:
        """The pseudonym of each id (PseudonymError if it cannot)."""
        ...


class HmacSource:
    def __init__(self, key: bytes | Callable[[], bytes], from_file: bool = False) -> None:
        self._key = key  # or a function giving it (the default key file is made on first use)
        self.from_file = from_file  # read from an existing key file (else made now)
        self.name = "keyed HMAC"

    def key(self) -> bytes:
        if callable(self._key):
            self._key = self._key()
        return self._key

    async def fetch(self, ids: Sequence[str]) -> dict[str, str]:
        try:
            key = self.key()
        except OSError as err:
            raise PseudonymError(f"the pseudonym key cannot be read or made: {err}") from None
        return {pid: hmac_pseudonym(key, pid) for pid in ids}


# -- an external service (I/O) ---------------------------------------------------------------


class ServiceSource:
    """The seed's pseudonymization web service, `concurrency` requests at a time."""

    def __init__(self, url: str, timeout: float, concurrency: int = 8) -> None:
        self.url = url
        self.timeout = timeout
        self.concurrency = concurrency
        self.name = f"the pseudonymization service {url}"

    def request_url(self, pid: str) -> str:
        base = self.url if "?" in self.url else f"{self.url}?id"
        return f"{base}={quote(pid, safe='')}"

    async def fetch(self, ids: Sequence[str]) -> dict[str, str]:
        import aiohttp  # only an operator who configures a service needs a client

        gate = asyncio.Semaphore(self.concurrency)
        timeout = aiohttp.ClientTimeout(total=self.timeout)

        async def one(session: aiohttp.ClientSession, pid: str) -> str:
            async with gate:
                try:
                    async with session.get(self.request_url(pid)) as resp:
                        if resp.status != 200:
                            raise PseudonymError(f"{self.name} answered HTTP {resp.status}")
                        body = await resp.json(content_type=None)
                except TimeoutError:
                    raise PseudonymError(f"{self.name} did not answer within {self.timeout:g} s") from None
                except (aiohttp.ClientError, ValueError) as err:
                    raise PseudonymError(f"{self.name} failed: {type(err).__name__}") from None
            pseudonym = body.get("pseudonym") if isinstance(body, dict) else None
            if not isinstance(pseudonym, str):
                raise PseudonymError(f'{self.name} answered without a "pseudonym" string')
            return pseudonym

        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                async with asyncio.TaskGroup() as group:  # the first failure cancels the rest
                    tasks = [group.create_task(one(session, pid)) for pid in ids]
            except* PseudonymError as failed:
                raise failed.exceptions[0] from None
        return {pid: t.result() for pid, t in zip(ids, tasks, strict=True)}


# -- the table -------------------------------------------------------------------------------


class Pseudonyms:
    """Registry id <-> pseudonym, asked of `source` once per id (at most one entry per
    registered id). `registered(name)` tells whether a name is a registry id (a pseudonym
    may not be one)."""

    def __init__(self, source: Source, registered: Callable[[str], bool]) -> None:
        self.source = source
        self._registered = registered
        self._of: dict[str, str] = {}  # id -> pseudonym
        self._id: dict[str, str] = {}  # pseudonym -> id

    async def of(self, ids: Iterable[str]) -> dict[str, str]:
        """The pseudonym of each id; all or nothing (PseudonymError, nothing kept)."""
        wanted = list(dict.fromkeys(ids))
        missing = [i for i in wanted if i not in self._of]
        if missing:
            self._add(await self.source.fetch(missing))
        return {i: self._of[i] for i in wanted}

    @property
    def given_out(self) -> bool:
        """Whether any pseudonym was given out (so the source's key has been used)."""
        return bool(self._of)

    def id_of(self, pseudonym: str) -> str | None:
        """The id of a pseudonym given out so far (None: not one)."""
        return self._id.get(pseudonym)

    def _add(self, got: Mapping[str, str]) -> None:
        seen: dict[str, str] = {}
        for pid, p in got.items():
            if not _VALID.match(p):
                raise PseudonymError(f"{self.source.name} gave a pseudonym that is not 1-64 of A-Z a-z 0-9 _ . : -")
            if self._registered(p):
                raise PseudonymError(f"{self.source.name} gave a registry id as a pseudonym")
            other = self._id.get(p, seen.get(p))
            if other is not None and other != pid:
                raise PseudonymError(f"{self.source.name} gave two ids the same pseudonym")
            seen[p] = pid
        for p, pid in seen.items():
            self._of[pid], self._id[p] = p, pid
