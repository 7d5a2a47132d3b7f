"""The hypothesis stateful model over the loopback link, with the fault rules enabled.

EMBXFER_MODEL_EXAMPLES raises or lowers the example count (CI runs the default: 1,000 with one
receiver and 500 with two, every fault rule enabled)."""

import os

import pytest
from hypothesis import HealthCheck, settings

from embxfer.adapters.testing import LoopbackModel, run_model
from embxfer.core import Settings

EXAMPLES = int(os.environ.get("EMBXFER_MODEL_EXAMPLES", "1000"))

TestOneReceiver = LoopbackModel.TestCase
TestOneReceiver.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class TwoReceivers(LoopbackModel):
    receivers = 2


TestTwoReceivers = TwoReceivers.TestCase
TestTwoReceivers.settings = settings(
    max_examples=max(1, EXAMPLES // 2), stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class OnlyDisorder(LoopbackModel):
    """No fault that may fail a room: only duplicates, delays and any delivery order.  Every
    room must then succeed on every rank (a duplicated Init delivered after round 0 once
    failed its room: this model finds that)."""

    faults = False
    duplicates = True


TestOnlyDisorder = OnlyDisorder.TestCase
TestOnlyDisorder.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_run_model_accepts_user_settings():
    run_model(Settings(block_size=2, default_blocks=1, pool_blocks=1, hidden_size=4, dtype="bfloat16",
                       bootstrap_timeout=3.0, waiting_timeout=3.0, transfer_timeout=3.0, quarantine_timeout=7.0),
              max_examples=50)


def test_model_finds_a_receiver_that_frees_aborted_blocks_at_once(receiver_without_quarantine):
    """The model can fail: without quarantine a late write lands in reused blocks."""
    with pytest.raises(AssertionError, match="write of room"):
        run_model(max_examples=3000, database=None, derandomize=True, shrink=False)
