"""The keyed token buckets behind the encode side's flood defences."""

from __future__ import annotations

from embxfer.adapters._token_buckets import TokenBuckets


def test_a_key_takes_its_burst_then_one_token_per_refill_interval() -> None:
    buckets = TokenBuckets(rate=4.0, burst=8.0)
    assert [buckets.take(b"a", 0.0) for _ in range(9)] == [True] * 8 + [False]
    assert buckets.take(b"b", 0.0)  # another key has its own bucket
    assert not buckets.take(b"a", 0.2)  # 0.8 of a token
    assert buckets.take(b"a", 0.25) and not buckets.take(b"a", 0.25)


def test_a_full_bucket_is_forgotten_and_spending_may_go_below_zero() -> None:
    buckets = TokenBuckets(rate=0.02, burst=0.05)
    buckets.spend(b"a", 0.08, 10.0)  # a failed message that took 80 ms: owed
    assert b"a" in buckets and buckets.level(b"a", 10.0) == -0.03
    assert 0 < buckets.level(b"a", 12.0) < 0.05  # earning back 0.02 a second
    assert buckets.level(b"a", 20.0) == 0.05 and b"a" not in buckets and not buckets


def test_past_max_keys_every_bucket_is_forgotten() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1.0, max_keys=3)
    for key in range(3):
        assert buckets.take(key, 0.0)
    assert buckets.take(3, 0.0)  # the fourth key: the others are forgotten
    assert buckets.take(0, 0.0) and not buckets.take(3, 0.0)
