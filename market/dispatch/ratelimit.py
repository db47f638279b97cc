"""Per-participant token buckets: a flooding client gets `rate_limited`, others are unaffected.

An event costs one token; a batch costs one per item (`cost`), charged all or nothing, so a
1,000-order batch is not 1,000 times cheaper than 1,000 single events. `LoginThrottle` backs
off failed logins per address and per id (docs/protocol.md, *Limits and integrity*); the
server's limiter carries one as `logins`, shared by every namespace.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping

# Failed logins: after FAILURES within WINDOW seconds (of each other), a key (an address or
# an id) is refused for BASE * 2**(failures - FAILURES) seconds, at most CAP; attempts while
# refused are not checked, so each further guess costs the whole wait. MAX_KEYS bounds memory.
LOGIN_FAILURES = 5
LOGIN_WINDOW = 300.0
LOGIN_BASE = 1.0
LOGIN_CAP = 60.0
LOGIN_MAX_KEYS = 65536


class LoginThrottle:
    def __init__(
        self,
        failures: int = LOGIN_FAILURES,
        window: float = LOGIN_WINDOW,
        base: float = LOGIN_BASE,
        cap: float = LOGIN_CAP,
        max_keys: int = LOGIN_MAX_KEYS,
    ) -> None:
        self.failures, self.window, self.base, self.cap, self.max_keys = failures, window, base, cap, max_keys
        # key -> [failures, last failure, refused until]; least recently failed first
        self._keys: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def wait(self, keys: Iterable[str], now: float | None = None) -> float:
        """Seconds until a login for these keys may be checked again (0: now)."""
        t = time.monotonic() if now is None else now
        longest = 0.0
        for key in keys:
            state = self._keys.get(key)
            if state is not None and state[2] - t > longest:
                longest = state[2] - t
        return longest

    def failed(self, keys: Iterable[str], now: float | None = None) -> None:
        """A login for these keys was checked and refused."""
        t = time.monotonic() if now is None else now
        for key in keys:
            state = self._keys.pop(key, None)
            if state is None or t - state[1] > self.window:
                state = [0, t, t]
            state[0] += 1
            state[1] = t
            over = int(state[0]) - self.failures
            if over >= 0:
                state[2] = t + min(self.cap, self.base * 2.0 ** min(over, 64))
            self._keys[key] = state  # now the most recent
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self._keys.pop(key, None)


def refill(tokens: float, last: float, now: float, rate: float, burst: float) -> float:
    """A token bucket's content at `now`: what it held at `last`, plus `rate` per second
    since, never more than `burst`."""
    return min(burst, tokens + (now - last) * rate)


class RateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # id -> (tokens, last refill)
        self.logins = LoginThrottle()

    def allow(self, key: str, now: float | None = None, cost: int = 1) -> bool:
        """Take `cost` tokens from `key`'s bucket, or none if it holds fewer."""
        t = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self.burst, t))
        tokens = refill(tokens, last, t, self.rate, self.burst)
        if tokens < cost:
            self._buckets[key] = (tokens, t)
            return False
        self._buckets[key] = (tokens - cost, t)
        return True

    def allow_all(self, costs: Mapping[str, int], now: float | None = None) -> bool:
        """Take each key's cost from its bucket if every one can pay; otherwise take nothing."""
        t = time.monotonic() if now is None else now
        buckets, rate, burst = self._buckets, self.rate, self.burst
        refilled, ok = {}, True
        for key, cost in costs.items():  # `refill`, inline: a fleet's batch charges every member
            tokens, last = buckets.get(key, (burst, t))
            have = refilled[key] = min(burst, tokens + (t - last) * rate)
            if have < cost:
                ok = False
        for key, cost in costs.items():
            buckets[key] = (refilled[key] - cost if ok else refilled[key], t)
        return ok

    def __len__(self) -> int:
        """Buckets held."""
        return len(self._buckets)

    def forget(self, key: str) -> None:
        """Drop `key`'s bucket (a connection's, once it is gone: its id never comes back)."""
        self._buckets.pop(key, None)
