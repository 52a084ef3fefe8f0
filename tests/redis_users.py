"""ACL users made in a test (ACL SETUSER on the test's own redis-server)."""

from __future__ import annotations

import redis


def set_user(url: str, name: str, password: str, *rules: str) -> str:
    """(Re)create user ``name`` with exactly ``rules``; returns a URL logging in as it."""
    admin = redis.Redis.from_url(url)
    try:
        admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)  # type: ignore[no-untyped-call]
    finally:
        admin.close()
    return login_url(url, name, password)


def login_url(url: str, name: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{name}:{password}@{rest}"


def consumer_keys(stream: str, group: str = "lake") -> list[str]:
    """The keys a consumer touches: the stream, its dead-letter stream, the lease."""
    return [f"~{stream}", f"~{stream}:dlq", f"~poslake:{stream}:{group}:maintenance"]


def admin_command(url: str, *args: str) -> object:
    admin = redis.Redis.from_url(url)
    try:
        return admin.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        admin.close()
