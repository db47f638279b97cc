"""The auction: wire messages, timing, the order book, clearing, exchange, tariff and grid state, the
engine (the slot lifecycle) and the ledger records. Pure: no socket, clock, database or logger."""
