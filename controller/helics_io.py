"""HELICS plumbing of `microte cosim`'s federates: one value federate per process, JSON
string values, uninterruptible time (granted exactly what it requests).

Apart from controller/cosim.py so that a federate in its own module (the buildings
federate) uses it without importing cosim back. helics is imported lazily: the `microte`
command starts without it.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any


def federate(name: str, broker: str) -> Any:
    import helics as h

    fi = h.helicsCreateFederateInfo()
    h.helicsFederateInfoSetCoreTypeFromString(fi, "zmq")
    h.helicsFederateInfoSetCoreInitString(fi, f"--federates=1 --broker_address={broker} --loglevel=warning")
    h.helicsFederateInfoSetFlagOption(fi, h.helics_flag_uninterruptible, True)
    fed = h.helicsCreateValueFederate(name, fi)
    h.helicsFederateInfoFree(fi)
    return fed


def publish(fed: Any, key: str) -> Any:
    import helics as h

    return h.helicsFederateRegisterGlobalPublication(fed, key, h.helics_data_type_string, "")


def subscribe(fed: Any, key: str) -> Any:
    import helics as h

    return h.helicsFederateRegisterSubscription(fed, key, "")


def send(pub: Any, value: Any) -> None:
    import helics as h

    h.helicsPublicationPublishString(pub, json.dumps(value, sort_keys=True))


def receive(sub: Any) -> Any | None:
    """The latest value if it changed since the last read, else None."""
    import helics as h

    if sub is None or not h.helicsInputIsUpdated(sub):
        return None
    return json.loads(h.helicsInputGetString(sub))


def enter_executing(fed: Any) -> None:
    import helics as h

    h.helicsFederateEnterExecutingMode(fed)


def request(fed: Any, t: float) -> float:
    import helics as h

    if t <= h.helicsFederateGetCurrentTime(fed):
        return float(h.helicsFederateGetCurrentTime(fed))
    granted: float = h.helicsFederateRequestTime(fed, t)
    return granted


def close(fed: Any) -> None:
    import helics as h

    with contextlib.suppress(Exception):
        h.helicsFederateDisconnect(fed)
    h.helicsFederateFree(fed)
