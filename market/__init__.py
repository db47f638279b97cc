"""The MicroTE market: the pure auction core, the socket.io server, and one package per seed system
(docs/architecture.md).
"""
