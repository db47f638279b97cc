"""Prosumer clients of the microte market.

spec (scenario tables) -> profiles/synthetic (energy per slot) -> devices (battery, meter)
-> traders (orders) -> prosumer (the pure per-round logic) -> client/fleet (socket shell).
Imports from `market/` are limited to its protocol, record and error types.
"""
