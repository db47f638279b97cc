"""The participant object of a spec: a `Prosumer`, or the `PemSite` of a `pem` table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from participants.prosumer import Prosumer
from participants.spec import ParticipantSpec


def site_for(
    spec: ParticipantSpec,
    seed: int,
    *,
    timezone: str = "UTC",
    base_dir: str | Path | None = None,
    others: Sequence[ParticipantSpec] = (),
) -> Prosumer:
    """`others`: the scenario's participants, whose forecast import a PEM site's target
    leaves room for (participants/pem_site.py); ignored by every other site."""
    if spec.pem is not None:
        from participants.pem_site import PemSite  # numpy houses and weather only when used

        return PemSite(spec, seed, timezone=timezone, base_dir=base_dir, others=others)
    return Prosumer(spec, seed, timezone=timezone, base_dir=base_dir)
