"""Synthetic profiles: household load, PV and wind, seeded and pure.

Each profile is a power curve p(t) in W; a slot's energy is its integral (midpoint rule,
one sample a minute), rounded to integer Wh. Randomness is drawn per day from a generator
seeded by (seed, participant key, profile tag, day), so a slot's value never depends on
which slots were asked for before: the per-day caches only memoize a pure function.

Slots that tile a day are evaluated a day of slots at a time (one vectorized call for
all their samples, the same arithmetic per sample as one slot alone, so the same Wh).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import numpy as np

from market.core.sun import cos_zenith, day_of_year
from participants.spec import PvSpec, SyntheticLoad, WindSpec

SAMPLE_S = 60  # integration step
DAY = 86400
_DAY_SHIFT = 1 << 20  # keeps day numbers of the seed sequence non-negative
_CACHE_DAYS = 64
_UTC_KEYS = frozenset({"UTC", "Etc/UTC"})  # zones whose offset is 0 at all times
_CACHE_BLOCKS = 3  # days of slot energies kept per profile (the current and next day suffice)

# Household shape by local hour (BDEW H0-like): night base, morning peak, evening peak.
_WEEKDAY = np.array([
    0.55, 0.45, 0.40, 0.38, 0.38, 0.45, 0.75, 1.05, 1.05, 0.95, 0.90, 0.95,
    1.10, 1.05, 0.90, 0.85, 0.90, 1.15, 1.50, 1.70, 1.65, 1.45, 1.10, 0.80,
])  # fmt: skip
_WEEKEND = np.array([
    0.65, 0.50, 0.42, 0.40, 0.38, 0.40, 0.50, 0.70, 0.95, 1.15, 1.25, 1.30,
    1.40, 1.25, 1.05, 0.95, 0.95, 1.10, 1.40, 1.55, 1.50, 1.35, 1.10, 0.85,
])  # fmt: skip
_WEEKDAY = _WEEKDAY / _WEEKDAY.mean()
_WEEKEND = _WEEKEND / _WEEKEND.mean()
_HOUR_CENTERS = np.arange(-1, 26) + 0.5  # periodic padding for interpolation


def stable_key(text: str) -> int:
    """A process-independent hash (Python's `hash` of str is salted per process)."""
    return zlib.crc32(text.encode())


def generator(*entropy: int) -> np.random.Generator:
    """`np.random.default_rng(list(entropy))`, the same stream, built faster: numpy turns a
    list of ints into the seed's uint32 words with Python calls per int, and takes an array
    of the words as it is (~7 against ~11 us, paid per slot by each trader that draws and
    each forecast that errs). Entropy must be non-negative, as numpy requires."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(_seed_words(entropy))))


def _seed_words(entropy: tuple[int, ...]) -> np.ndarray:
    words: list[int] = []
    for v in entropy:
        if v < 0:
            raise ValueError(f"seed entropy must be non-negative, not {v}")
        if v == 0:
            words.append(0)
        while v:  # little-endian 32-bit words, as numpy's _int_to_uint32_array
            words.append(v & 0xFFFFFFFF)
            v >>= 32
    return np.array(words, dtype=np.uint32)


_M32, _M64, _M128 = 2**32 - 1, 2**64 - 1, 2**128 - 1


def _state_hash() -> tuple[tuple[int, int], ...]:
    """numpy's SeedSequence.generate_state, for PCG64's four 64-bit words, hashes the pool
    with constants that do not depend on the data: (xor, multiply) per 32-bit output word."""
    out, h = [], 0x8B51F9DD  # INIT_B
    for _ in range(8):
        out.append((h, h * 0x58F38DED & _M32))  # MULT_B
        h = out[-1][1]
    return tuple(out)


_STATE_HASH = _state_hash()
_PCG_MULT = (2549297995355413924 << 64) + 4865540595714422341  # PCG64's 128-bit LCG multiplier
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53: numpy's next_double


@functools.lru_cache(maxsize=1 << 15)  # pure: an environment's episodes replay the same slots
def uniforms(low: float, high: float, k: int, *entropy: int) -> list[float]:
    """`generator(*entropy).uniform(low, high, size=k).tolist()`, the same floats (a list
    shared by every caller of the same arguments: read it, never change it), without
    building numpy's bit generator: its state words, PCG64's seeding and `k` steps in Python
    ints (~6 against ~10 us; a drawing trader pays it per member and slot).
    tests/participants/test_participants_profiles.py compares it with `default_rng`."""
    pool = np.random.SeedSequence(_seed_words(entropy)).pool.tolist()
    w = []
    for i, (xor, mult) in enumerate(_STATE_HASH):
        v = (pool[i & 3] ^ xor) * mult & _M32
        w.append(v ^ (v >> 16))
    inc = (((w[4] | w[5] << 32) << 64 | w[6] | w[7] << 32) << 1 | 1) & _M128
    # pcg_setseq_128_srandom_r: a step from 0, the seed added, a step
    state = ((inc + ((w[0] | w[1] << 32) << 64 | w[2] | w[3] << 32)) * _PCG_MULT + inc) & _M128
    span = high - low
    out = []
    for _ in range(k):
        state = state * _PCG_MULT + inc & _M128
        x, r = ((state >> 64) ^ state) & _M64, state >> 122  # XSL-RR output
        x = (x >> r | x << (-r & 63)) & _M64
        out.append(low + span * ((x >> 11) * _TO_UNIT))
    return out


# -- the same draws for many entropies at once -------------------------------------------
# numpy's SeedSequence (mix_entropy, generate_state) and PCG64 (seeding, steps, XSL-RR
# output) in uint32 / uint64 array arithmetic, which wraps as the C code's does; 128-bit
# values are (high, low) pairs of uint64 arrays.

_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_MIX_L, _MIX_R = np.uint32(0xCA01F9DD), np.uint32(0x4973F715)
_U16, _U32, _U1 = np.uint32(16), np.uint64(32), np.uint64(1)
_LOW32 = np.uint64(_M32)
_MULT_HI, _MULT_LO = np.uint64(_PCG_MULT >> 64), np.uint64(_PCG_MULT & _M64)


def _hash_consts(n: int) -> list[tuple[np.uint32, np.uint32]]:
    """mix_entropy's (xor, multiplier) per `hashmix`: they do not depend on the data."""
    out, h = [], _INIT_A
    for _ in range(n):
        nxt = h * _MULT_A & _M32
        out.append((np.uint32(h), np.uint32(nxt)))
        h = nxt
    return out


def _hashmix(v: np.ndarray, xor: np.uint32, mult: np.uint32) -> np.ndarray:
    v = (v ^ xor) * mult
    out: np.ndarray = v ^ (v >> _U16)
    return out


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r: np.ndarray = _MIX_L * x - _MIX_R * y  # uint32, wrapping
    out: np.ndarray = r ^ (r >> _U16)
    return out


def _pools(words: np.ndarray) -> list[np.ndarray]:
    """SeedSequence(words[i]).pool of each row of `words` (N x L uint32): 4 columns."""
    n, length = words.shape
    consts = iter(_hash_consts(4 + 12 + 4 * max(0, length - 4)))
    pool = [_hashmix(words[:, i] if i < length else np.zeros(n, np.uint32), *next(consts)) for i in range(4)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = _mix(pool[dst], _hashmix(pool[src], *next(consts)))
    for src in range(4, length):
        for dst in range(4):
            pool[dst] = _mix(pool[dst], _hashmix(words[:, src], *next(consts)))
    return pool


def _mulhi(a: np.ndarray, b: np.uint64) -> np.ndarray:
    """The high 64 bits of a * b, from 32-bit halves."""
    a0, a1, b0, b1 = a & _LOW32, a >> _U32, b & _LOW32, b >> _U32
    p00, p01, p10 = a0 * b0, a0 * b1, a1 * b0
    mid = (p00 >> _U32) + (p01 & _LOW32) + (p10 & _LOW32)
    out: np.ndarray = a1 * b1 + (p01 >> _U32) + (p10 >> _U32) + (mid >> _U32)
    return out


def _step(hi: np.ndarray, lo: np.ndarray, inc_hi: np.ndarray, inc_lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """state * multiplier + increment, mod 2**128."""
    hi = _mulhi(lo, _MULT_LO) + lo * _MULT_HI + hi * _MULT_LO
    lo = lo * _MULT_LO + inc_lo
    return hi + inc_hi + (lo < inc_lo).astype(np.uint64), lo


def uniforms_rows(low: float, high: float, k: int, *entropy: int | np.ndarray) -> np.ndarray:
    """`uniforms(low, high, k, *e)` for each row of the entropy, at once (N x k): each of
    `entropy` an int (the same for every row) or an array of N non-negative ints below
    2**32 (one word each, so every row has the same seed words). ~0.2 ms for 300 rows
    against ~7 us a row; tests/participants/test_participants_profiles.py compares them."""
    out: np.ndarray = low + (high - low) * units_rows(k, *entropy)  # `uniforms`' float operations
    return out


def units_rows(k: int, *entropy: int | np.ndarray) -> np.ndarray:
    """The draws of `uniforms_rows` before they are put in a band: `uniforms(low, high, ...)`
    is exactly `low + (high - low) * unit` of these, so they can be drawn before the band
    is known (a day of slots at once)."""
    n, hi, lo, inc_hi, inc_lo = _seeded(entropy)
    out = np.empty((n, k))
    for j in range(k):
        hi, lo = _step(hi, lo, inc_hi, inc_lo)
        x, r = hi ^ lo, hi >> np.uint64(58)  # XSL-RR
        x = x >> r | x << ((np.uint64(64) - r) & np.uint64(63))
        out[:, j] = (x >> np.uint64(11)) * _TO_UNIT
    return out


def seeded(*entropy: int | np.ndarray) -> Iterator[np.random.Generator]:
    """`generator(*e)` of each row of the entropy (as `units_rows` takes it), one after
    another: one Generator set to each row's seeded state in turn (~3 us a row, where
    `generator` builds one in ~7 us), valid until the next row is asked for.
    tests/participants/test_participants_profiles.py compares their draws."""
    _, hi, lo, inc_hi, inc_lo = _seeded(entropy)
    bits = np.random.PCG64(0)
    rng = np.random.Generator(bits)
    for h, low, ih, il in zip(hi.tolist(), lo.tolist(), inc_hi.tolist(), inc_lo.tolist(), strict=True):
        bits.state = {
            "bit_generator": "PCG64",
            "state": {"state": h << 64 | low, "inc": ih << 64 | il},
            "has_uint32": 0,
            "uinteger": 0,
        }
        yield rng


def _seeded(entropy: tuple[int | np.ndarray, ...]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, PCG64 state high and low words, increment high and low words) of each row of
    the entropy, as numpy seeds a PCG64 from `SeedSequence(words)`."""
    n = max((len(e) for e in entropy if isinstance(e, np.ndarray)), default=1)
    columns: list[np.ndarray] = []
    for e in entropy:
        if isinstance(e, np.ndarray):
            if e.size and (e.min() < 0 or e.max() > _M32):
                raise ValueError("an array of entropy must hold non-negative ints below 2**32")
            columns.append(e.astype(np.uint32)[:, None])
        else:
            words = _seed_words((e,))
            columns.append(np.broadcast_to(words, (n, len(words))))
    pool = _pools(np.ascontiguousarray(np.concatenate(columns, axis=1)))
    w = []
    for i, (xor, mult) in enumerate(_STATE_HASH):
        v = (pool[i & 3] ^ np.uint32(xor)) * np.uint32(mult)
        w.append((v ^ (v >> _U16)).astype(np.uint64))
    a, b = w[4] | w[5] << _U32, w[6] | w[7] << _U32
    inc_hi, inc_lo = a << _U1 | b >> np.uint64(63), b << _U1 | _U1
    # pcg_setseq_128_srandom_r: a step from 0 (the increment), the seed added, a step
    seed_hi, seed_lo = w[0] | w[1] << _U32, w[2] | w[3] << _U32
    lo = inc_lo + seed_lo
    hi = inc_hi + seed_hi + (lo < seed_lo).astype(np.uint64)
    hi, lo = _step(hi, lo, inc_hi, inc_lo)
    return n, hi, lo, inc_hi, inc_lo


@functools.lru_cache(maxsize=4096)
def _offset(t: float, tz: ZoneInfo) -> int:
    off = dt.datetime.fromtimestamp(int(t), tz).utcoffset()
    return int(off.total_seconds()) if off is not None else 0


def local_time(t: np.ndarray, tz: ZoneInfo) -> tuple[np.ndarray, np.ndarray]:
    """(local day number since 1970-01-01, local hour of day as float) of Unix times `t`."""
    first, last = _offset(t[0], tz), _offset(t[-1], tz)
    # A DST switch inside the slot is rare, so a per-sample lookup is fine then.
    local = t + first if first == last else t + np.array([_offset(x, tz) for x in t])
    day = np.floor_divide(local, DAY).astype(np.int64)
    return day, (local - day * DAY) / 3600.0


def local_time_rows(t: np.ndarray, tz: ZoneInfo) -> tuple[np.ndarray, np.ndarray]:
    """`local_time` of each row of `t` (the samples of one slot per row) in one call: the
    same offsets per sample as `local_time` of the row alone."""
    if getattr(tz, "key", None) in _UTC_KEYS:
        firsts = lasts = [0] * len(t)  # what `_offset` gives for every time
    else:
        firsts = [_offset(x, tz) for x in t[:, 0].tolist()]
        lasts = [_offset(x, tz) for x in t[:, -1].tolist()]
    local = t + np.array(firsts, dtype=np.int64)[:, None]
    if firsts != lasts:
        for i, (first, last) in enumerate(zip(firsts, lasts, strict=True)):
            if first != last:
                local[i] = t[i] + np.array([_offset(x, tz) for x in t[i]])
    day = np.floor_divide(local, DAY).astype(np.int64)
    return day, (local - day * DAY) / 3600.0


def _local_terms(t: np.ndarray, tz: ZoneInfo) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """What a load profile computes of sample times (one slot's per row) before its own
    draws, per local day: which samples fall on it, their hour index into the day's noise,
    and the day's shape at them (weekday or weekend: the same for every household)."""
    days, hours = local_time_rows(t, tz)  # local time decided per slot, as `power`
    hours = hours.ravel()
    out = []
    for d, mask in _day_masks(days.ravel()):
        h = hours[mask]
        out.append((d, mask, 1 + h.astype(np.int64), np.interp(h, _HOUR_CENTERS, _padded_shape(d))))
    return out


def _samples(start: int, end: int) -> np.ndarray:
    n = max(1, -(-(end - start) // SAMPLE_S))
    return start + (end - start) / n * (np.arange(n) + 0.5)


def _key(a: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    return a.dtype.str, a.shape, a.tobytes()


class _Memo:
    """The last few results of a pure function of sample times, keyed by their exact bytes.
    What does not depend on the site's own draws (local time, the sun, the day's shape) is
    the same for every profile sampling the same day block, as a community's members do:
    computed once, not once per member. Its arrays are read-only, being shared."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._hits: dict[Hashable, Any] = {}

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        hit = self._hits.get(key)
        if hit is None:
            if len(self._hits) >= self._size:
                del self._hits[next(iter(self._hits))]  # the oldest
            hit = self._hits[key] = _read_only(compute())
        return hit


def _read_only(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif isinstance(value, tuple | list):
        for v in value:
            _read_only(v)
    return value


_MEMO_SIZE = 8  # day blocks of terms kept: a run asks for one or two at a time
_LOCAL_TERMS = _Memo(_MEMO_SIZE)
_SOLAR_TERMS = _Memo(_MEMO_SIZE)
# Day blocks of slot energies by profile and block, for every profile of the process: an
# environment's episodes replay the same days with new profile objects (a block: ~3.5 KB).
# Its lists are shared: read them, never change them.
_SHARED_SIZE = 4096
_BATCH = 256  # profiles whose day blocks `fill_days` computes in one call
# Profiles from which `_draw_days` seeds their generators at once (`seeded`: ~180 us plus ~3
# us a profile, against ~7.5 us a profile for `generator`).
SEED_TOGETHER = 40
_SHARED_BLOCKS: dict[tuple[tuple[object, ...], tuple[int, int, int]], list[int]] = {}


def day_slot(start: int, d: int) -> tuple[int, int, int]:
    """(phase, day block, index in it) of the slot at `start` among the blocks of a day of
    slots of duration `d` (a divisor of a day), as every day cache numbers them."""
    phase = start % d
    block, k = divmod((start - phase) // d, DAY // d)
    return phase, block, k


class _Synthetic:
    TAG = 0

    def __init__(self, seed: int, key: int, tz: ZoneInfo, spec: msgspec.Struct) -> None:
        self._seed = seed % 2**64
        self._key = key
        self._tz = tz
        self._cache: dict[int, np.ndarray] = {}
        self._blocks: dict[tuple[int, int, int], list[int]] = {}  # (duration, phase, block) -> Wh
        # What the profile is a function of: another profile of the same (an episode after
        # an episode, a run after a run in one process) shares its blocks (`_SHARED_BLOCKS`).
        self._ident = (type(self).__name__, self._seed, key, tz.key, msgspec.json.encode(spec))

    def _rng(self, day: int) -> np.random.Generator:
        return generator(self._seed, self._key, self.TAG, day + _DAY_SHIFT)

    def _day(self, day: int) -> np.ndarray:
        arr = self._cache.get(day)
        if arr is None:
            if len(self._cache) >= _CACHE_DAYS:
                self._cache.clear()
            arr = self._cache[day] = self._draw(day, self._rng(day))
        return arr

    def _draw(self, day: int, rng: np.random.Generator) -> np.ndarray:
        """The day's own draws, from `rng` (`_rng(day)`, or the same seeded otherwise)."""
        raise NotImplementedError

    @classmethod
    def _draw_days(cls, profiles: Sequence[Any], day: int) -> None:
        """`_day(day)` of each of `profiles` (of this class), their generators seeded at once."""
        missing = [p for p in profiles if day not in p._cache]
        by_seed: dict[int, list[Any]] = {}
        for p in missing:
            by_seed.setdefault(p._seed, []).append(p)
        for seed, same in by_seed.items():
            if len(same) < SEED_TOGETHER:
                for p in same:
                    p._day(day)
                continue
            keys = np.array([p._key for p in same], dtype=np.int64)
            for p, rng in zip(same, seeded(seed, keys, cls.TAG, day + _DAY_SHIFT), strict=True):
                if len(p._cache) >= _CACHE_DAYS:
                    p._cache.clear()
                p._cache[day] = p._draw(day, rng)

    def power(self, t: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def wh(self, start: int, end: int) -> int:
        """Energy during [start, end), Wh. A duration that divides a day is computed for the
        day's block of slots on the same grid at once, and cached (a few blocks)."""
        d = end - start
        if d <= 0:
            return 0
        if DAY % d:
            return self.wh_one(start, end)
        values, k = self.day_of(start, d)
        return values[k]

    def day_of(self, start: int, d: int) -> tuple[list[int], int]:
        """The Wh of the day's block of slots of duration `d` (a divisor of a day) that holds
        the slot at `start`, and that slot's index in it (cached, a few blocks)."""
        phase, block, k = day_slot(start, d)
        key = (d, phase, block)
        values = self._blocks.get(key) or self._shared(key)
        if values is None:
            values = self.wh_block(phase + block * DAY, d, DAY // d)
            self._share(key, values)
        return values, k

    def _shared(self, key: tuple[int, int, int]) -> list[int] | None:
        """The block `key` as another profile of the same computed it (kept as its own too)."""
        values = _SHARED_BLOCKS.get((self._ident, key))
        if values is not None:
            self._keep(key, values)
        return values

    def _share(self, key: tuple[int, int, int], values: list[int]) -> None:
        if len(_SHARED_BLOCKS) >= _SHARED_SIZE:
            del _SHARED_BLOCKS[next(iter(_SHARED_BLOCKS))]  # the oldest
        _SHARED_BLOCKS[(self._ident, key)] = values
        self._keep(key, values)

    def _keep(self, key: tuple[int, int, int], values: list[int]) -> None:
        if len(self._blocks) >= _CACHE_BLOCKS:
            del self._blocks[next(iter(self._blocks))]  # the oldest
        self._blocks[key] = values

    def _batch(self) -> Hashable:
        """Which profiles `wh_blocks` computes together with this one (by default, none)."""
        return self

    @classmethod
    def wh_blocks(cls, profiles: Sequence[Any], first: int, d: int, count: int) -> list[list[int]]:
        """`wh_block` of each of `profiles` (of this class and one `_batch`); a class that
        computes them together overrides it (and `_wh_alone` with it)."""
        return [p.wh_block(first, d, count) for p in profiles]

    def wh_one(self, start: int, end: int) -> int:
        """The definition: the mean power over the slot's samples times its duration."""
        if end <= start:
            return 0
        p = self.power(_samples(start, end))
        return max(0, round(float(p.mean()) * (end - start) / 3600))

    def wh_block(self, first: int, d: int, count: int) -> list[int]:
        """`wh_one` of the `count` slots of duration `d` from `first`, vectorized: the same
        samples (as `_samples`), per-sample arithmetic, per-row sums and rounding."""
        return self._wh_alone(first, d, count)

    def _wh_alone(self, first: int, d: int, count: int) -> list[int]:
        t = _block_times(first, d, count)
        wh: list[int] = _block_wh(self.power(t.ravel()), d, t.shape)
        return wh


def fill_days(profiles: Iterable[_Synthetic], start: int, d: int) -> None:
    """Compute the day block of slots of duration `d` holding `start` for each of `profiles`
    that has not got it yet (nor another profile of the same): the profiles of one class
    and `_batch` together, in one vectorized `wh_blocks` call, the same Wh as `wh_block` of
    each. `day_of` then finds them (a population's members: ~65 us a block alone)."""
    if d <= 0 or DAY % d:
        return
    phase, block, _ = day_slot(start, d)
    key = (d, phase, block)
    batches: dict[tuple[type[_Synthetic], Hashable], list[_Synthetic]] = {}
    for p in profiles:
        if key not in p._blocks and p._shared(key) is None:
            batches.setdefault((type(p), p._batch()), []).append(p)
    for (cls, _), batch in batches.items():
        for i in range(0, len(batch), _BATCH):  # a few MB of samples at a time
            some = batch[i : i + _BATCH]
            for p, values in zip(some, cls.wh_blocks(some, phase + block * DAY, d, DAY // d), strict=True):
                p._share(key, values)


def _block_times(first: int, d: int, count: int) -> np.ndarray:
    """The samples of `count` slots of duration `d` from `first` (as `_samples`), a row each."""
    n = max(1, -(-d // SAMPLE_S))
    starts = first + d * np.arange(count, dtype=np.int64)
    out: np.ndarray = starts[:, None] + d / n * (np.arange(n) + 0.5)
    return out


def _block_wh(power: np.ndarray, d: int, shape: tuple[int, ...]) -> Any:
    """`wh_one` of each slot of `power` (its samples in the last axis of `shape`, one slot a
    row): the per-row sums and `max(0, round(m * d / 3600))` per mean, the same float
    operations (`rint` rounds half to even as `round` does). Nested lists of ints."""
    n = shape[-1]
    means = np.add.reduce(power.reshape(*shape), axis=-1) / n
    return np.maximum(0, np.rint(means * d / 3600)).astype(np.int64).tolist()


def _by_day(days: np.ndarray, fn: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply fn(day, mask) for each distinct day of the samples (one or two per slot)."""
    out = np.empty(days.shape)
    for d, mask in _day_masks(days):
        out[mask] = fn(d, mask)
    return out


def _day_masks(days: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(day, which samples fall on it) per distinct day of `days`, in increasing order."""
    # The distinct values of the sorted days, not `np.unique`: its first call in a process
    # imports `numpy.ma` (~18 ms, in the first step of a new environment).
    ordered = np.sort(days, axis=None)
    distinct = ordered[np.flatnonzero(np.diff(ordered, prepend=ordered[:1] - 1))] if len(ordered) else ordered
    return [(int(d), days == d) for d in distinct.tolist()]


def _padded_shape(day: int) -> np.ndarray:
    """The household shape of local `day` at the hour centres, padded for interpolation
    across midnight (row 0 of `LoadProfile._draw`)."""
    return _PADDED_WEEKEND if (day + 3) % 7 >= 5 else _PADDED_WEEKDAY  # 1970-01-01 was a Thursday


def _pad(shape: np.ndarray) -> np.ndarray:
    out: np.ndarray = _read_only(np.concatenate(([shape[-1]], shape, shape[:2])))
    return out


_PADDED_WEEKDAY, _PADDED_WEEKEND = _pad(_WEEKDAY), _pad(_WEEKEND)


class _Together(_Synthetic):
    """A profile whose class computes the blocks of many at once (`wh_blocks`): one alone
    is a batch of one."""

    def _wh_alone(self, first: int, d: int, count: int) -> list[int]:
        return self.wh_blocks([self], first, d, count)[0]


class LoadProfile(_Together):
    """Household consumption: hourly shape by weekday/weekend, winter-heavy seasonal scale
    normalised to `annual_kwh`, lognormal noise per day and per hour."""

    TAG = 1

    def __init__(self, spec: SyntheticLoad, seed: int, key: int, tz: ZoneInfo) -> None:
        super().__init__(seed, key, tz, spec)
        self._mean_w = spec.annual_kwh * 1000 / (365.25 * 24)

    def _draw(self, day: int, rng: np.random.Generator) -> np.ndarray:
        """Row 0: the day's shape at hour centres (padded for interpolation across midnight);
        row 1: the multiplier of each hour (season, day and hour noise), same padding."""
        season = 1 + 0.2 * math.cos(2 * math.pi * (day_of_year(day) - 15) / 365.25)
        day_factor = math.exp(0.12 * rng.standard_normal() - 0.0072)  # lognormal, mean one
        hourly = np.exp(0.3 * rng.standard_normal(24) - 0.045)
        noise = np.concatenate(([0.0], season * day_factor * hourly, [0.0, 0.0]))
        return np.stack([_padded_shape(day), noise])

    def power(self, t: np.ndarray) -> np.ndarray:
        days, hours = local_time(t, self._tz)
        return self._power(days, hours)

    def _batch(self) -> Hashable:
        return self._tz  # the local times

    @classmethod
    def wh_blocks(cls, profiles: Sequence[Any], first: int, d: int, count: int) -> list[list[int]]:
        """`wh_block` of households of one time zone, a household a row: `_power` of the
        local times decided per slot (as `power` of each slot's samples), the same
        operations per sample, with what every household shares computed once."""
        t = _block_times(first, d, count)
        tz = profiles[0]._tz
        out = np.empty((len(profiles), t.size))
        for day, mask, idx, shaped in _LOCAL_TERMS.get((_key(t), tz), lambda: _local_terms(t, tz)):
            cls._draw_days(profiles, day)
            out[:, mask] = shaped * np.stack([p._cache[day][1] for p in profiles])[:, idx]
        power = np.array([p._mean_w for p in profiles])[:, None] * out
        wh: list[list[int]] = _block_wh(power, d, (len(profiles), *t.shape))
        return wh

    def _power(self, days: np.ndarray, hours: np.ndarray) -> np.ndarray:
        def at(day: int, mask: np.ndarray) -> np.ndarray:
            shape, noise = self._day(day)
            h = hours[mask]
            out: np.ndarray = np.interp(h, _HOUR_CENTERS, shape) * noise[1 + h.astype(np.int64)]
            return out

        return self._mean_w * _by_day(days, at)


class SolarProfile(_Together):
    """PV output: clear-sky irradiance from the sun's elevation (NOAA solar position,
    Haurwitz clear-sky model) times a seeded cloud factor per day and hour."""

    TAG = 2
    PERFORMANCE = 0.85  # inverter, temperature and soiling losses

    def __init__(self, spec: PvSpec, seed: int, key: int, tz: ZoneInfo) -> None:
        super().__init__(seed, key, tz, spec)
        self._peak_w = spec.kw * 1000
        self._latitude = spec.latitude
        self._lat = math.radians(spec.latitude)
        if spec.longitude is None:
            jan = dt.datetime(2001, 1, 15, tzinfo=tz)
            std = (jan.utcoffset() or dt.timedelta()) - (jan.dst() or dt.timedelta())
            self._lon = std.total_seconds() / 3600 * 15
        else:
            self._lon = spec.longitude

    def _draw(self, day: int, rng: np.random.Generator) -> np.ndarray:
        summer = 0.5 - 0.5 * math.cos(2 * math.pi * (day_of_year(day) - 15) / 365.25)  # 0 Jan .. 1 Jul
        if self._lat < 0:
            summer = 1 - summer
        mean = 0.45 + 0.25 * summer  # daily clearness: cloudier winters
        clear = rng.beta(4 * mean, 4 * (1 - mean))
        return np.clip(clear + 0.15 * rng.standard_normal(24), 0.05, 1.0)

    def power(self, t: np.ndarray) -> np.ndarray:
        lat, lon = self._latitude, self._lon
        ghi, parts = _SOLAR_TERMS.get((_key(t), lat, lon), lambda: _solar_terms(t, lat, lon))
        clouds = np.empty(t.shape)
        for d, mask, h in parts:
            clouds[mask] = self._day(d)[h]
        power: np.ndarray = self._peak_w * self.PERFORMANCE * ghi / 1000 * clouds
        return power

    def _batch(self) -> Hashable:
        return self._latitude, self._lon  # the sun

    @classmethod
    def wh_blocks(cls, profiles: Sequence[Any], first: int, d: int, count: int) -> list[list[int]]:
        """`wh_block` of arrays at one site: `power`'s operations per sample, an array a row."""
        t = _block_times(first, d, count)
        flat = t.ravel()
        lat, lon = profiles[0]._latitude, profiles[0]._lon
        ghi, parts = _SOLAR_TERMS.get((_key(flat), lat, lon), lambda: _solar_terms(flat, lat, lon))
        clouds = np.empty((len(profiles), flat.size))
        for day, mask, h in parts:
            cls._draw_days(profiles, day)
            clouds[:, mask] = np.stack([p._cache[day] for p in profiles])[:, h]
        peak = np.array([p._peak_w * p.PERFORMANCE for p in profiles])[:, None]
        wh: list[list[int]] = _block_wh(peak * ghi / 1000 * clouds, d, (len(profiles), *t.shape))
        return wh


def _solar_terms(
    t: np.ndarray, latitude: float, longitude: float
) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray]]]:
    """What a PV profile computes of sample times before its own draws: clear-sky GHI at a
    site, and per UTC day which samples fall on it and their hour index into its clouds."""
    day = np.floor_divide(t, DAY).astype(np.int64)
    minutes = (t - day * DAY) / 60.0
    cos_z = cos_zenith(t, latitude, longitude)
    up = cos_z > 0
    ghi = np.zeros_like(t, dtype=float)
    ghi[up] = 1098 * cos_z[up] * np.exp(-0.057 / cos_z[up])
    parts = [(d, mask, np.minimum(minutes[mask] // 60, 23).astype(np.int64)) for d, mask in _day_masks(day)]
    return ghi, parts


class WindProfile(_Synthetic):
    """Turbine output: an hourly AR(1) wind process mapped to a Rayleigh distribution with
    the spec's mean speed, interpolated in between, through a cut-in/rated/cut-out curve.

    The AR(1) is evaluated as its (truncated) moving average over the last `MEMORY` hourly
    innovations, each seeded by its day, which keeps every hour a pure function of time."""

    TAG = 3
    PHI = 0.9  # hourly autocorrelation
    MEMORY = 48  # 0.9**48 < 0.01

    def __init__(self, spec: WindSpec, seed: int, key: int, tz: ZoneInfo) -> None:
        super().__init__(seed, key, tz, spec)
        self._spec = spec
        self._innov: dict[int, np.ndarray] = {}
        weights = self.PHI ** np.arange(self.MEMORY)
        self._weights = weights / math.sqrt(float((weights**2).sum()))  # unit variance

    def _innovations(self, day: int) -> np.ndarray:
        arr = self._innov.get(day)
        if arr is None:
            if len(self._innov) >= _CACHE_DAYS:
                self._innov.clear()
            arr = self._innov[day] = self._rng(day).standard_normal(24)
        return arr

    def _draw(self, day: int, rng: np.random.Generator) -> np.ndarray:
        """Speeds at hours 0..24 of `day` (UTC); hour 24 is the next day's hour 0 (from the
        innovations of the days before, each drawn from its own day's generator: `rng`
        unused)."""
        back = -(-self.MEMORY // 24)
        e = np.concatenate([self._innovations(d) for d in range(day - back, day + 2)])
        first = back * 24  # index of this day's hour 0 in e
        x = np.array([
            float(np.dot(self._weights, e[i - self.MEMORY + 1 : i + 1][::-1]))
            for i in range(first, first + 25)
        ])  # fmt: skip
        u = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
        scale = self._spec.mean_speed / math.sqrt(math.pi / 2)
        return np.asarray(scale * np.sqrt(-np.log1p(-np.minimum(u, 1 - 1e-12))))

    def curve(self, v: np.ndarray) -> np.ndarray:
        s = self._spec
        rated = s.kw * 1000
        frac = (v**3 - s.cut_in**3) / max(s.rated_speed**3 - s.cut_in**3, 1e-9)
        p = np.where(v < s.rated_speed, rated * np.clip(frac, 0, 1), rated)
        return np.where((v < s.cut_in) | (v >= s.cut_out), 0.0, p)

    def power(self, t: np.ndarray) -> np.ndarray:
        day = np.floor_divide(t, DAY).astype(np.int64)
        hours = (t - day * DAY) / 3600.0

        def speed(d: int, mask: np.ndarray) -> np.ndarray:
            out: np.ndarray = np.interp(hours[mask], np.arange(25), self._day(d))
            return out

        return self.curve(_by_day(day, speed))
