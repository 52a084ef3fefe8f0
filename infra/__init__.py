"""The plumbing the programs share, outside the contract: Redis connections, their
errors and health, the stream publisher, ACL setup, a private redis-server,
logging, metrics, secret redaction and signal handling."""
