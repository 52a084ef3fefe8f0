"""Bounded producer state: the decoder's contract cache keeps what is in use and
forgets what a churning book left behind."""

from __future__ import annotations

from producer.ib_decoders import ContractCache


def raw(conid: int) -> tuple[str, ...]:
    return (str(conid), "AAPL", "OPT", "20270115", f"{100 + conid % 50}.0", "C", "100", "USD")


def test_contract_cache_is_bounded_and_keeps_contracts_in_use() -> None:
    cache = ContractCache(generation=100)
    in_use = cache.get(*raw(1))
    for conid in range(2, 10_000):
        cache.get(*raw(conid))
        assert len(cache) <= 200
        if conid % 50 == 0:
            assert cache.get(*raw(1)) is in_use  # seen often: never mapped again
    assert cache.get(*raw(2)).conid == 2  # forgotten long ago: mapped afresh, the same
