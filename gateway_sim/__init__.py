"""A TWS-protocol gateway simulator: IB's side of the socket, for tests, benchmarks
and demos (``python -m gateway_sim``). Not production code: nothing under
``producer/``, ``consumer/``, ``shared/`` or ``poslake/`` imports it (``poslake
run`` starts it as a separate program).

- ``protocol``: the TWS wire format's framing and message layouts.
- ``portfolio``: the synthetic book: accounts, instruments, a random walk of prices.
- ``session``: one connected client: handshake, requests, subscriptions.
- ``market_data``: market-data lines, ticks and Black-Scholes Greeks, with IB's faults.
- ``simulator``: the server, its fault controls and its command line.
"""
