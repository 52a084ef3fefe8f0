"""The poslake consumer: Redis Stream consumer group -> Delta Lake, exactly once."""
