"""The portfolio's exposures: position-weighted Greeks per account and underlying.

From the pipeline's tables: positions from ``positions_current`` and Greeks from
``option_greeks_current`` now, or, at a past time, the newest row per key
observed by then in ``position_updates`` and ``option_greeks`` (observation
time, not table versions: any time the history holds works). Per open position:

- an option's Greeks are its newest computation of the first source IB sent of
  model, last, bid, ask (:data:`SOURCE_PREFERENCE`); each Greek x position x
  multiplier adds to the account's and underlying's sum, and delta also x the
  underlying's price: ``delta_dollars``. IB often leaves ``und_price`` unset in
  one source's tick and sets it in another's, so the price is the newest
  ``und_price`` of any source, else the underlying's own position's market
  price (the newest open stock row of the symbol); an option with neither adds
  no dollars and is counted in ``options_without_underlying_price``;
- a stock (any non-derivative) counts as delta 1: ``position`` shares and
  ``position x market_price`` dollars of delta, no gamma, vega or theta;
- an option without Greeks yet adds nothing and is counted in
  ``options_without_greeks``, so a partial sum is never mistaken for a whole one.

``greeks_oldest`` is the oldest computation a row used: how stale the sum may be.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl
from deltalake import DeltaTable

from infra.redaction import scrub
from infra.time_travel import open_table_at
from shared import lake_names
from shared.errors import TableMissing
from shared.model import DERIVATIVE_SEC_TYPES

SOURCE_PREFERENCE = ("model", "last", "bid", "ask")
EXPOSURE_COLUMNS = [
    "account",
    "symbol",
    "positions",
    "options_without_greeks",
    "options_without_underlying_price",
    "delta_shares",
    "delta_dollars",
    "gamma",
    "vega",
    "theta",
    "greeks_oldest",
]
_SUMMED = ("delta_shares", "delta_dollars", "gamma", "vega", "theta")
_GREEKS = ["conid", "source", "timestamp", "delta", "gamma", "vega", "theta", "und_price"]


def source_rank() -> pl.Expr:
    """0 for the most preferred computation source (:data:`SOURCE_PREFERENCE`), as ``rank``."""
    rank = {source: i for i, source in enumerate(SOURCE_PREFERENCE)}
    return (
        pl.col("source")
        .replace_strict(rank, default=len(rank), return_dtype=pl.Int32)
        .alias("rank")
    )


def _scan(uri: str, storage_options: dict[str, str] | None) -> pl.LazyFrame | None:
    try:
        table: DeltaTable = open_table_at(uri, storage_options)
    except TableMissing:
        return None
    return pl.scan_delta(table)


def _newest(frame: pl.LazyFrame, key: list[str], at: datetime | None) -> pl.LazyFrame:
    if at is None:
        return frame
    frame = frame.filter(pl.col("timestamp") <= at)
    return frame.filter(pl.col("timestamp") == pl.col("timestamp").max().over(key))


def exposures(
    lake_uri: str,
    storage_options: dict[str, str] | None = None,
    *,
    at: datetime | None = None,
    accounts: list[str] | None = None,
    symbols: list[str] | None = None,
) -> pl.DataFrame:
    """Exposures per (account, symbol), now or as they stood at ``at``.

    Raises :class:`~shared.errors.TableMissing` when there are no positions yet.
    """
    base = lake_uri.rstrip("/")
    positions_table = lake_names.POSITION_UPDATES if at else lake_names.POSITIONS_CURRENT
    greeks_table = lake_names.OPTION_GREEKS if at else lake_names.OPTION_GREEKS_CURRENT
    positions = _scan(f"{base}/{positions_table}", storage_options)
    if positions is None:
        raise TableMissing(f"no table {positions_table} under {scrub(lake_uri)}")
    if symbols:
        positions = positions.filter(pl.col("symbol").is_in(symbols))
    every = _newest(positions, ["account", "conid"], at).filter(pl.col("position") != 0)
    every = every.select("account", "conid", "symbol", "sec_type", "position", "multiplier",
                         "market_price", "timestamp")  # fmt: skip
    held = every.filter(pl.col("account").is_in(accounts)) if accounts else every
    option = pl.col("sec_type").is_in(sorted(DERIVATIVE_SEC_TYPES))
    stock_price = (  # any account's shares price the underlying
        every.filter(~option & pl.col("market_price").is_not_null())
        .sort("timestamp", "conid")
        .group_by("symbol")
        .agg(pl.col("market_price").last().alias("stock_price"))
    )

    greeks = _scan(f"{base}/{greeks_table}", storage_options)
    if greeks is None:
        chosen = pl.LazyFrame(
            schema={"conid": pl.Int64, "g_time": pl.Datetime("us", "UTC"), "delta": pl.Float64,
                    "gamma": pl.Float64, "vega": pl.Float64, "theta": pl.Float64},
        )  # fmt: skip
        underlying = pl.LazyFrame(schema={"conid": pl.Int64, "und_price": pl.Float64})
    else:
        if symbols:
            greeks = greeks.filter(pl.col("symbol").is_in(symbols))
        newest = _newest(greeks.select(_GREEKS), ["conid", "source"], at)
        ranked = newest.with_columns(source_rank())
        chosen = (
            ranked.filter(pl.col("rank") == pl.col("rank").min().over("conid"))
            .unique("conid", keep="first")
            .select("conid", pl.col("timestamp").alias("g_time"), "delta", "gamma", "vega",
                    "theta")
        )  # fmt: skip
        underlying = (
            newest.filter(pl.col("und_price").is_not_null())
            .sort("timestamp", "source")
            .group_by("conid")
            .agg(pl.col("und_price").last())
        )

    size = pl.col("position") * pl.col("multiplier")
    priced = (
        held.join(chosen, on="conid", how="left")
        .join(underlying, on="conid", how="left")
        .join(stock_price, on="symbol", how="left")
        .with_columns(pl.coalesce("und_price", "stock_price").alias("und_price"))
    )
    joined = priced.with_columns(
        pl.when(option).then(pl.col("delta") * size).otherwise(size).alias("delta_shares"),
        pl.when(option)
        .then(pl.col("delta") * size * pl.col("und_price"))
        .otherwise(size * pl.col("market_price"))
        .alias("delta_dollars"),
        *(
            pl.when(option).then(pl.col(g) * size).otherwise(0.0).alias(g)
            for g in ("gamma", "vega", "theta")
        ),
        (option & pl.col("g_time").is_null()).alias("missing"),
        (option & pl.col("g_time").is_not_null() & pl.col("und_price").is_null()).alias("unpriced"),
    )
    frame = (
        joined.group_by("account", "symbol")
        .agg(
            pl.len().alias("positions"),
            pl.col("missing").sum().alias("options_without_greeks"),
            pl.col("unpriced").sum().alias("options_without_underlying_price"),
            *(pl.col(c).sum() for c in _SUMMED),
            pl.col("g_time").min().alias("greeks_oldest"),
        )
        .sort("account", "symbol")
    )
    return frame.select(EXPOSURE_COLUMNS).collect()
