"""The pure domain core: task states, legal transitions, retry policy, error classification.

Nothing in this package does I/O or knows about gRPC, NATS, SQL or protobuf, so it is tested
directly, without an event loop (see tests/unit).
"""
