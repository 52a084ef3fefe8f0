"""The poslake producer: IB positions through ib_async into the Redis Stream."""
