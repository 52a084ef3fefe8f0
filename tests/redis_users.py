"""ACL users made in a test (ACL SETUSER on the test's own redis-server)."""

from __future__ import annotations

import redis

from shared.settings import load_settings


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
    settings = load_settings(stream=stream, group=group)
    return [f"~{stream}", f"~{settings.dlq_stream}", f"~{settings.maintenance_lease_key}"]


def admin_command(url: str, *args: str) -> object:
    admin = redis.Redis.from_url(url)
    try:
        return admin.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        admin.close()
