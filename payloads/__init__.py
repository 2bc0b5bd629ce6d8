"""Science payloads: pure functions and small classes on numpy arrays.

No Kafka and no I/O here: everything is callable from a notebook, and the
agents and the Level 2 replays call the same code.
"""
