import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from participants.profiles import CsvProfile, build_profiles, parse_time
from participants.spec import CsvLoad, ParticipantSpec, PvSpec, SyntheticLoad, WindSpec

UTC = dt.UTC
JUNE = int(dt.datetime(2024, 6, 21, tzinfo=UTC).timestamp())
JAN = int(dt.datetime(2024, 1, 17, tzinfo=UTC).timestamp())  # a Wednesday
SPEC = ParticipantSpec(id="H01", load=SyntheticLoad(3500), pv=PvSpec(kw=5), wind=WindSpec(kw=3))


def slots(start, n, d=900):
    return [(start + i * d, start + (i + 1) * d) for i in range(n)]


def test_same_seed_same_values_in_any_order():
    a = build_profiles(SPEC, 42)
    b = build_profiles(SPEC, 42)
    day = slots(JUNE, 96)
    forward = [a.slot(s) for s in day]
    backward = [b.slot(s) for s in reversed(day)][::-1]
    assert forward == backward
    c = build_profiles(SPEC, 43)
    assert [c.slot(s) for s in day] != forward


def test_different_participants_differ():
    other = ParticipantSpec(id="H02", load=SyntheticLoad(3500), pv=PvSpec(kw=5))
    a, b = build_profiles(SPEC, 1), build_profiles(other, 1)
    assert [a.slot(s)[1] for s in slots(JAN, 96)] != [b.slot(s)[1] for s in slots(JAN, 96)]


def test_pv_zero_at_night_and_peaks_near_noon():
    p = build_profiles(ParticipantSpec(id="P", pv=PvSpec(kw=5)), 3, "UTC")
    for day in range(7):
        start = JUNE + day * 86400
        hourly = [p.slot(s)[0]["solar"] for s in slots(start, 24, 3600)]
        assert hourly[0] == hourly[1] == hourly[22] == hourly[23] == 0
        assert sum(hourly) > 0
        # Clear-sky shape: the noon hours (11-13 UTC at longitude 0) carry more than the mornings.
        assert sum(hourly[10:14]) > sum(hourly[4:8])
    # Averaged over days the peak is within two hours of solar noon.
    mean = np.mean([[p.slot(s)[0]["solar"] for s in slots(JUNE + d * 86400, 24, 3600)] for d in range(30)], axis=0)
    assert abs(int(np.argmax(mean)) - 11.5) <= 2


def test_pv_winter_below_summer_and_timezone_meridian():
    spec = ParticipantSpec(id="P", pv=PvSpec(kw=5))
    p = build_profiles(spec, 3, "UTC")
    summer = sum(p.slot(s)[0]["solar"] for s in slots(JUNE, 30, 86400))
    winter = sum(p.slot(s)[0]["solar"] for s in slots(JAN, 30, 86400))
    assert summer > 2 * winter > 0
    # Berlin's standard meridian (15 E) moves solar noon an hour earlier in UTC.
    berlin = build_profiles(spec, 3, "Europe/Berlin")
    mean = np.mean([[berlin.slot(s)[0]["solar"] for s in slots(JUNE + d * 86400, 24, 3600)] for d in range(30)], axis=0)
    assert 8 <= int(np.argmax(mean)) <= 12


def test_load_evening_peak_above_night_and_annual_total():
    p = build_profiles(ParticipantSpec(id="L", load=SyntheticLoad(3500)), 5, "Europe/Berlin")
    days = 28
    hourly = np.array([[p.slot(s)[1] for s in slots(JAN + d * 86400, 24, 3600)] for d in range(days)])
    mean = hourly.mean(axis=0)  # UTC hours; Berlin is UTC+1 in January
    evening = mean[17:20].mean()  # 18-21 local
    night = mean[1:4].mean()  # 2-5 local
    assert evening > 2 * night
    assert mean[6] > night  # 7 local: morning peak
    year = sum(p.slot(s)[1] for s in slots(JAN, 365, 86400))
    assert 3000_000 < year < 4000_000


def test_weekend_shape_differs():
    p = build_profiles(ParticipantSpec(id="L", load=SyntheticLoad(3500)), 5, "UTC")
    # Mornings: weekdays wake earlier (06-08) than weekends.
    week = [JAN + d * 86400 for d in range(70)]
    wd = [
        sum(p.slot(s)[1] for s in slots(t + 6 * 3600, 2, 3600))
        for t in week
        if dt.datetime.fromtimestamp(t, UTC).weekday() < 5
    ]
    we = [
        sum(p.slot(s)[1] for s in slots(t + 6 * 3600, 2, 3600))
        for t in week
        if dt.datetime.fromtimestamp(t, UTC).weekday() >= 5
    ]
    assert np.mean(wd) > np.mean(we)


def test_wind_within_rating_and_varies():
    p = build_profiles(ParticipantSpec(id="W", wind=WindSpec(kw=3)), 9)
    values = [p.slot(s)[0]["wind"] for s in slots(JAN, 96 * 14)]
    assert all(0 <= v <= 750 for v in values)  # 3 kW for 15 min
    assert len(set(values)) > 50
    # Autocorrelated: neighbouring slots are closer than random pairs.
    v = np.array(values, dtype=float)
    assert np.mean(np.abs(np.diff(v))) < 0.5 * np.mean(np.abs(v - np.random.default_rng(0).permutation(v)))
    capacity_factor = v.sum() / (750 * len(v))
    assert 0.03 < capacity_factor < 0.6


def test_slot_durations_agree_roughly():
    p = build_profiles(SPEC, 1)
    hour = p.slot((JUNE + 12 * 3600, JUNE + 13 * 3600))
    quarters = [p.slot(s) for s in slots(JUNE + 12 * 3600, 4, 900)]
    assert abs(hour[1] - sum(q[1] for q in quarters)) <= 2
    assert abs(hour[0]["solar"] - sum(q[0]["solar"] for q in quarters)) <= 2


def write_csv(path: Path, rows, header="time,generation,consumption"):
    path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")


@pytest.mark.parametrize("row_s", [300, 3600, 600, 7])
def test_csv_resampling_conserves_totals_exactly(tmp_path, row_s):
    rng = np.random.default_rng(row_s)
    n = (4 * 86400) // row_s
    start = JAN
    rows = [(start + i * row_s, int(rng.integers(0, 500)), int(rng.integers(0, 1000))) for i in range(n)]
    write_csv(tmp_path / "p.csv", rows)
    prof = CsvProfile(tmp_path / "p.csv", dt.UTC)  # type: ignore[arg-type]
    t0, t1 = prof.span
    assert (t0, t1) == (start, start + n * row_s)
    parts = [prof.energy(s, min(s + 900, t1)) for s in range(t0, t1, 900)]
    assert sum(g for g, _ in parts) == sum(r[1] for r in rows)
    assert sum(c for _, c in parts) == sum(r[2] for r in rows)
    assert all(g >= 0 and c >= 0 for g, c in parts)
    if row_s == 300:  # whole rows: plain sums
        assert parts[0] == (sum(r[1] for r in rows[:3]), sum(r[2] for r in rows[:3]))
    if row_s == 3600:  # split proportionally: each quarter within 1 Wh of a quarter row
        assert all(abs(4 * parts[i][1] - rows[0][2]) <= 4 for i in range(4))


def test_csv_repeats_outside_span_and_iso_times(tmp_path):
    rows = [("2024-01-01T00:00:00", 100, 400), ("2024-01-01T01:00:00", 0, 800)]
    write_csv(tmp_path / "p.csv", rows)
    spec = ParticipantSpec(id="C", load=CsvLoad(path="p.csv", source="solar"))
    site = build_profiles(spec, 0, "Europe/Berlin", base_dir=tmp_path)
    start = int(dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))).timestamp())
    assert site.slot((start, start + 3600)) == ({"solar": 100}, 400)
    day_later = start + 2 * 3600 * 12
    assert site.slot((day_later, day_later + 7200)) == ({"solar": 100}, 1200)
    assert site.slot((start - 3600, start)) == ({"solar": 0}, 800)


def test_csv_errors(tmp_path):
    write_csv(tmp_path / "a.csv", [(0, 1, 1)])
    with pytest.raises(ValueError, match="two rows"):
        CsvProfile(tmp_path / "a.csv", dt.UTC)  # type: ignore[arg-type]
    write_csv(tmp_path / "b.csv", [(10, 1, 1), (5, 1, 1)])
    with pytest.raises(ValueError, match="increase"):
        CsvProfile(tmp_path / "b.csv", dt.UTC)  # type: ignore[arg-type]
    write_csv(tmp_path / "c.csv", [(0, 1, -1), (5, 1, 1)])
    with pytest.raises(ValueError, match="negative"):
        CsvProfile(tmp_path / "c.csv", dt.UTC)  # type: ignore[arg-type]
    write_csv(tmp_path / "d.csv", [(0, 1), (5, 1)], header="when,generation")
    with pytest.raises(ValueError, match="columns"):
        CsvProfile(tmp_path / "d.csv", dt.UTC)  # type: ignore[arg-type]


def test_parse_time():
    from zoneinfo import ZoneInfo

    utc = ZoneInfo("UTC")
    assert parse_time("1700000000", utc) == 1700000000
    assert parse_time("1700000000.0", utc) == 1700000000
    assert parse_time("2024-01-01T00:00:00Z", utc) == 1704067200
    assert parse_time("2024-01-01T01:00:00", ZoneInfo("Europe/Berlin")) == 1704067200


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "Australia/Lord_Howe", "America/New_York"])
def test_day_blocks_equal_slot_by_slot(tz):
    """`wh` computes a day of slots in one vectorized call; every value must be what the
    slot alone gives (`wh_one`), for any duration dividing a day, grid phase and DST day."""
    from zoneinfo import ZoneInfo

    from participants.synthetic import LoadProfile, SolarProfile, WindProfile

    zone = ZoneInfo(tz)
    rng = np.random.default_rng(11)
    days = [JAN, JUNE, int(dt.datetime(2024, 3, 31, tzinfo=UTC).timestamp())]
    days += [
        int(dt.datetime(2024, 11, 3, tzinfo=UTC).timestamp()),
        int(dt.datetime(2024, 4, 7, tzinfo=UTC).timestamp()),
    ]
    for d in (60, 300, 900, 3600, 7200, 86400):
        profiles = [
            LoadProfile(SyntheticLoad(4000), 3, 17, zone),
            SolarProfile(PvSpec(kw=5, latitude=-33.0), 3, 17, zone),
            WindProfile(WindSpec(kw=3), 3, 17, zone),
        ]
        for prof in profiles:
            for day in days:
                phase = int(rng.integers(0, d))
                for k in rng.choice(2 * 86400 // d, size=min(24, 2 * 86400 // d), replace=False):
                    s = day - 86400 // 2 + phase + int(k) * d
                    assert prof.wh(s, s + d) == prof.wh_one(s, s + d), (type(prof).__name__, d, s)
            assert len(prof._blocks) <= 3  # bounded cache
    odd = LoadProfile(SyntheticLoad(4000), 3, 17, zone)
    assert odd.wh(JAN, JAN + 7) == odd.wh_one(JAN, JAN + 7) and not odd._blocks  # 7 s does not tile a day
    assert odd.wh(JAN, JAN) == 0 == odd.wh(JAN, JAN - 5)


def test_shared_time_terms_give_each_site_its_own_values():
    """Households and PV arrays sampling the same day block share what does not depend on
    their own draws (participants.synthetic._Memo): interleaving sites at other places, in
    other zones and with other seeds changes no value against each one alone."""
    from zoneinfo import ZoneInfo

    from participants import synthetic as syn

    def make():
        return [
            syn.LoadProfile(SyntheticLoad(4000), 3, 17, ZoneInfo("Europe/Berlin")),
            syn.LoadProfile(SyntheticLoad(2500), 5, 18, ZoneInfo("America/New_York")),
            syn.SolarProfile(PvSpec(kw=5, latitude=50.0), 3, 17, ZoneInfo("Europe/Berlin")),
            syn.SolarProfile(PvSpec(kw=5, latitude=-33.0, longitude=151.0), 3, 17, ZoneInfo("UTC")),
        ]

    days = [JAN + k * 86400 for k in range(3)]
    alone = []
    for prof in make():
        for memo in (syn._LOCAL_TERMS, syn._SOLAR_TERMS):
            memo._hits.clear()
        syn._SHARED_BLOCKS.clear()
        alone.append([prof.day_of(day, 900)[0] for day in days])
    syn._SHARED_BLOCKS.clear()  # the sites below compute their blocks, from the shared terms
    together = make()
    mixed = [[] for _ in together]
    for day in days:
        for i, prof in enumerate(together):
            mixed[i].append(prof.day_of(day, 900)[0])
    assert mixed == alone
    assert all(len(m._hits) <= syn._MEMO_SIZE for m in (syn._LOCAL_TERMS, syn._SOLAR_TERMS))


def test_a_profile_of_the_same_site_takes_the_blocks_another_computed(monkeypatch):
    """`_SHARED_BLOCKS`: the next episode's profile of a site (a new object, the same spec,
    seed, key and zone) computes no block the last one did; any other profile computes its own."""
    from zoneinfo import ZoneInfo

    from participants import synthetic as syn

    monkeypatch.setattr(syn, "_SHARED_BLOCKS", {})
    built = []
    block = syn._Synthetic.wh_block
    monkeypatch.setattr(syn._Synthetic, "wh_block", lambda self, *a: built.append(1) or block(self, *a))
    zone = ZoneInfo("Europe/Berlin")
    first = syn.LoadProfile(SyntheticLoad(4000), 3, 17, zone).day_of(JAN, 900)[0]
    assert len(built) == 1
    assert syn.LoadProfile(SyntheticLoad(4000), 3, 17, zone).day_of(JAN, 900)[0] == first
    assert len(built) == 1
    others = [
        syn.LoadProfile(SyntheticLoad(4001), 3, 17, zone),  # another spec
        syn.LoadProfile(SyntheticLoad(4000), 4, 17, zone),  # seed
        syn.LoadProfile(SyntheticLoad(4000), 3, 18, zone),  # participant
        syn.LoadProfile(SyntheticLoad(4000), 3, 17, ZoneInfo("UTC")),  # zone
        syn.SolarProfile(PvSpec(kw=4), 3, 17, zone),  # kind
    ]
    assert all(p.day_of(JAN, 900)[0] != first for p in others)
    assert len(built) == 1 + len(others)
    monkeypatch.setattr(syn, "_SHARED_SIZE", len(syn._SHARED_BLOCKS))  # full: the oldest goes for the next
    oldest = next(iter(syn._SHARED_BLOCKS))
    syn.LoadProfile(SyntheticLoad(3000), 3, 17, zone).day_of(JAN, 900)
    assert len(syn._SHARED_BLOCKS) == syn._SHARED_SIZE and oldest not in syn._SHARED_BLOCKS


def test_shared_time_terms_cannot_be_changed_by_a_caller():
    from participants import synthetic as syn

    t = JUNE + 60.0 * (np.arange(1440) + 0.5)
    ghi, parts = syn._SOLAR_TERMS.get(("test", 1), lambda: syn._solar_terms(t, 50.0, 15.0))
    with pytest.raises(ValueError, match="read-only"):
        ghi[0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        parts[0][1][0] = False


@given(st.lists(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.just(0)), min_size=1, max_size=6))
def test_generator_is_default_rng_of_the_same_entropy(entropy):
    """`synthetic.generator` builds numpy's seed words itself: the same stream as numpy's."""
    from participants.synthetic import generator

    ours, theirs = generator(*entropy), np.random.default_rng(entropy)
    assert ours.standard_normal(3).tolist() == theirs.standard_normal(3).tolist()
    assert ours.uniform(0.1, 0.3, size=2).tolist() == theirs.uniform(0.1, 0.3, size=2).tolist()


@given(
    st.lists(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.just(0)), min_size=1, max_size=6),
    st.floats(-1e6, 1e6),
    st.floats(0, 1e6),
    st.integers(1, 8),
)
def test_uniforms_are_the_draws_of_default_rng_of_the_same_entropy(entropy, low, span, k):
    """`synthetic.uniforms` steps numpy's PCG64 in Python ints: the very floats numpy draws."""
    from participants.synthetic import uniforms

    high = low + span
    assert uniforms(low, high, k, *entropy) == np.random.default_rng(entropy).uniform(low, high, size=k).tolist()


@given(
    st.lists(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.just(0)), min_size=0, max_size=3),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40),
    st.lists(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**70)), min_size=0, max_size=3),
    st.floats(-1e6, 1e6),
    st.floats(0, 1e6),
    st.integers(1, 5),
)
def test_uniforms_rows_are_uniforms_of_each_row(before, column, after, low, span, k):
    """`synthetic.uniforms_rows` does SeedSequence and PCG64 in uint32/uint64 arrays: the
    very floats of `uniforms` (so numpy's) for every row, whatever words come before and after."""
    from participants.synthetic import uniforms, uniforms_rows

    high = low + span
    got = uniforms_rows(low, high, k, *before, np.array(column, dtype=np.int64), *after)
    assert got.shape == (len(column), k)
    assert got.tolist() == [uniforms(low, high, k, *before, c, *after) for c in column]


def test_uniforms_rows_refuse_what_one_word_cannot_hold():
    from participants.synthetic import uniforms_rows

    for bad in ([1, -1], [2**32]):
        with pytest.raises(ValueError, match="below 2\\*\\*32"):
            uniforms_rows(0.0, 1.0, 1, 7, np.array(bad, dtype=np.int64))
    with pytest.raises(ValueError, match="non-negative"):
        uniforms_rows(0.0, 1.0, 1, -1, np.array([1], dtype=np.int64))


def test_generator_refuses_negative_entropy_as_numpy_does():
    from participants.synthetic import generator, uniforms

    with pytest.raises(ValueError):
        np.random.default_rng([1, -1])
    with pytest.raises(ValueError, match="non-negative"):
        generator(1, -1)
    with pytest.raises(ValueError, match="non-negative"):
        uniforms(0.0, 1.0, 1, 1, -1)


@given(
    st.lists(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.just(0)), min_size=0, max_size=3),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20),
    st.lists(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**70)), min_size=0, max_size=2),
)
def test_seeded_generators_draw_what_generator_draws(before, column, after):
    """`synthetic.seeded` sets one Generator to each row's seeded state: each row draws the
    very numbers of its own `generator` (normal, beta, uniform), whatever came before."""
    from participants.synthetic import generator, seeded

    rows = seeded(*before, np.array(column), *after)
    got = [(g.standard_normal(3).tolist(), g.beta(1.7, 2.3), g.uniform()) for g in rows]
    want = []
    for c in column:
        g = generator(*before, c, *after)
        want.append((g.standard_normal(3).tolist(), g.beta(1.7, 2.3), g.uniform()))
    assert got == want


@pytest.mark.parametrize("tz", ["Europe/Berlin", "America/New_York", "UTC"])
def test_day_blocks_filled_together_equal_each_alone(tz, monkeypatch):
    """`synthetic.fill_days` computes the blocks of many profiles in one call per class and
    site (households of a zone, arrays at one place), their day draws seeded together: every
    block equals `wh_block` of its profile alone, on DST days too, with other seeds, sites
    and zones mixed in, and in batches smaller than the profiles (`_BATCH`)."""
    from zoneinfo import ZoneInfo

    from participants import synthetic as syn

    monkeypatch.setattr(syn, "_SHARED_BLOCKS", {})
    monkeypatch.setattr(syn, "_BATCH", 7)
    monkeypatch.setattr(syn, "SEED_TOGETHER", 2)  # the batches' generators seeded together
    zone = ZoneInfo(tz)

    def make():
        out: list[syn._Synthetic] = []
        for k in range(20):
            out.append(syn.LoadProfile(SyntheticLoad(2000 + 100 * k), 3 + k % 2, 100 + k, zone))
            out.append(syn.SolarProfile(PvSpec(kw=1 + k, latitude=50.0 if k % 3 else -33.0), 3, 100 + k, zone))
        out.append(syn.WindProfile(WindSpec(kw=3), 3, 7, zone))
        out.append(syn.LoadProfile(SyntheticLoad(3000), 2**63 + 1, 9, ZoneInfo("Asia/Tokyo")))
        return out

    days = [JAN, JUNE, int(dt.datetime(2024, 3, 31, tzinfo=UTC).timestamp())]
    days.append(int(dt.datetime(2024, 11, 3, tzinfo=UTC).timestamp()))
    for d, phase in ((900, 0), (3600, 1800), (86400, 0)):
        together = make()
        for day in days:
            syn.fill_days(together, day + phase, d)
            at, block, _ = syn.day_slot(day + phase, d)
            for p, alone in zip(together, make(), strict=True):
                want = alone.wh_block(at + block * 86400, d, 86400 // d)
                assert p._blocks[(d, at, block)] == want, (type(p).__name__, d, day)
