"""Shared by the loopback tests: ``TIMED``, small settings whose four timeouts all differ,
so a test can tell which one fired."""

from embxfer.core import Settings

TIMED = Settings(
    block_size=4, default_blocks=2, pool_blocks=6, hidden_size=8, dtype="float32",
    bootstrap_timeout=5.0, waiting_timeout=7.0, transfer_timeout=9.0, quarantine_timeout=13.0,
)
