"""The contract between poslake's producer and consumer.

Both sides import from here: the update model and its wire format
(:mod:`shared.model`, :mod:`shared.wire`), the settings (:mod:`shared.settings`),
the stream publisher (:mod:`shared.publisher`), the Delta table definition
(:mod:`shared.table`) and the error hierarchy (:mod:`shared.errors`).
"""
