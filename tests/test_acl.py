"""Least-privilege ACLs: every role runs with exactly the rights of infra/acl.py, and
with each one left out fails clearly (one line naming it, exit 6, no traceback, no
crash), or, for a right only a rare path needs, that path is shown.

Real ACL users (``ACL SETUSER`` on the test's own redis-server; the default user
stays the admin that prepares the data), real processes, a real Delta table.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from infra.acl import ROLES, Role, operator_role, render_readme, role
from infra.redis_conn import sync_client
from infra.redis_errors import refusal
from infra.redis_server import free_port
from shared.errors import ExitCode
from shared.settings import Settings
from tests.helpers import (
    REPO_ROOT,
    assert_table_exact,
    consumer_env,
    make_updates,
    publish,
    run_python,
    start_consumer,
    wait_until,
)
from tests.producer_harness import producer_settings, running_producer, running_simulator, until
from tests.redis_users import set_user

_TIMEOUT_S = 60
_PASSWORD = "acl-test-pw"
_USER = "poslake-under-test"


def _settings(stream: str) -> Settings:
    return Settings.model_construct(stream=stream)


def _as(url: str, which: Role, stream: str, without: str | None = None) -> str:
    """A URL logging in as a fresh user with ``which``'s rights (minus ``without``)."""
    return set_user(url, _USER, _PASSWORD, *which.rules(_settings(stream), without=without))


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_python(args, env, timeout=_TIMEOUT_S)


def _assert_refused(done: subprocess.CompletedProcess[str], program: str, *needles: str) -> str:
    """Exit 6 and one line ``poslake <program>: ...`` naming what is missing."""
    output = done.stdout + done.stderr
    assert done.returncode == ExitCode.REFUSED, output
    assert "Traceback" not in output, output
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"poslake {program}")]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _needles(right: str, stream: str) -> tuple[str, ...]:
    """What the message must name: the command (``XINFO`` of ``xinfo|groups``) or the key."""
    if right.startswith("~"):
        return ("NOPERM", f"key '{_rule(right, stream)[1:]}'")
    return ("NOPERM", right[1:].split("|", maxsplit=1)[0])


def _rights(which: Role) -> list[str]:
    """The rules of a role with the key patterns as templates (test ids)."""
    return [f"~{k}" for k in which.keys] + [f"+{c}" for c in which.commands]


def _rule(right: str, stream: str) -> str:
    if not right.startswith("~"):
        return right
    settings = _settings(stream)
    names = {
        "stream": stream,
        "dlq": settings.dlq_stream,
        "lease": settings.maintenance_lease_key,
        "book_lease": settings.book_lease_key,
        "book_progress": settings.book_progress_key,
    }
    return "~" + right[1:].format(**names)


# --- the README is rendered from infra/acl.py ------------------------------------


def test_readme_acl_lines_are_what_shared_acl_renders() -> None:
    text = (REPO_ROOT / "README.md").read_text()
    found = re.search(r"<!-- acl:begin -->\n(.*?)\n<!-- acl:end -->", text, re.DOTALL)
    assert found, "README lacks the <!-- acl:begin --> ... <!-- acl:end --> block"
    assert found.group(1) == render_readme(Settings.model_construct()), (
        "README's ACL block differs from infra/acl.py: paste render_readme()'s output"
    )
    for line in found.group(1).splitlines():
        if line.startswith("ACL SETUSER"):
            assert "positions" in line and "reset on" in line


def test_printed_lines_are_accepted_by_redis(redis_url: str) -> None:
    done = _run(["-m", "infra.acl"], consumer_env(redis_url, Path("/tmp"), "x", "orders"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(ROLES)  # one producer line (explicit IDs) + the others + operator
    admin = sync_client(redis_url)
    try:
        for line in lines:
            assert "orders" in line
            admin.execute_command(*line.replace("<password>", "x").split())  # type: ignore[no-untyped-call]
        users = admin.execute_command("ACL", "USERS")  # type: ignore[no-untyped-call]
        assert len(users) == len(lines) + 1  # and the default user
    finally:
        admin.close()


# --- consumer --------------------------------------------------------------------

_CONSUMER = role("consumer")
# Used on every run, but refused only warns: the lease (maintenance skipped or held).
_LEASE_RIGHTS = {"+set", "+get", "+del", "~{lease}"}
_CONSUMER_RARE = {"+ping", "+xinfo|consumers", "+xinfo|stream"}  # the last: over the cap


def _consumer_data(url: str, stream: str) -> list[Any]:
    """300 updates with one poison entry among them (so a dead letter is written)."""
    updates = make_updates(300)
    publish(url, stream, updates[:150])
    admin = sync_client(url)
    try:
        admin.xadd(stream, {"x": "not an entry"})
    finally:
        admin.close()
    publish(url, stream, updates[150:])
    return updates


def _drain(url: str, lake: Path, stream: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = consumer_env(url, lake, "acl-1", stream, maintenance_every_commits=1)
    return _run(["-m", "consumer", "--drain"], env)


def test_consumer_with_exactly_its_rights(
    redis_url: str, stream: str, lake: Path, tmp_path: Path
) -> None:
    updates = _consumer_data(redis_url, stream)
    done = _drain(_as(redis_url, _CONSUMER, stream), lake, stream, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "NOPERM" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert_table_exact(lake, updates)
    admin = sync_client(redis_url)
    try:
        assert int(admin.xpending(stream, "lake")["pending"]) == 0
        assert admin.xlen(f"{stream}:dlq") == 1
    finally:
        admin.close()


@pytest.mark.parametrize("right", _rights(_CONSUMER))
def test_consumer_with_one_right_less(
    redis_url: str, stream: str, lake: Path, tmp_path: Path, right: str
) -> None:
    updates = _consumer_data(redis_url, stream)
    url = _as(redis_url, _CONSUMER, stream, without=_rule(right, stream))
    done = _drain(url, lake, stream, tmp_path)
    assert done.returncode not in (-11, 139), done.stderr  # never a crash at exit
    if right in _LEASE_RIGHTS:
        # The pipeline lands everything; the log says which lease command is refused.
        assert done.returncode == 0, done.stderr
        assert_table_exact(lake, updates)
        command = {"~{lease}": "SET"}.get(right, right[1:].upper())
        warned = [line for line in done.stderr.splitlines() if "NOPERM" in line]
        assert warned and all("Traceback" not in line for line in done.stderr.splitlines())
        assert any(command in line and "maintenance" in line for line in warned), warned
    elif right in _CONSUMER_RARE:
        assert done.returncode == 0, done.stderr  # not used by a plain drain
        assert_table_exact(lake, updates)
    else:
        _assert_refused(done, "consumer", *_needles(right, stream))


def test_consumer_metrics_without_xinfo_consumers_say_so(
    redis_url: str, stream: str, lake: Path, tmp_path: Path
) -> None:
    """The rare path of +xinfo|consumers: a /metrics scrape."""
    publish(redis_url, stream, make_updates(20))
    url = _as(redis_url, _CONSUMER, stream, without="+xinfo|consumers")
    port = free_port()
    env = consumer_env(url, lake, "acl-metrics", stream, metrics_port=port)
    log = tmp_path / "consumer.log"
    proc = start_consumer(env, log=log)
    try:

        def scraped() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
                return b"poslake_consumer_entries_total 20.0" in reply.read()

        wait_until(lambda: _quietly(scraped), timeout=30)
        wait_until(lambda: "metrics cannot read the group" in log.read_text(), timeout=10)
        line = next(x for x in log.read_text().splitlines() if "metrics cannot read" in x)
        assert "NOPERM" in line and "XINFO" in line, line
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log.read_text()


def _quietly(check: Any) -> bool:
    try:
        return bool(check())
    except OSError:
        return False


def test_consumer_health_check_ping_is_a_right_it_needs(redis_url: str, stream: str) -> None:
    """The rare path of +ping: redis-py checks a connection idle for its health-check
    interval (the consumer's is 30 s; 0.2 s here) with PING before using it again."""
    publish(redis_url, stream, make_updates(5))
    url = _as(redis_url, _CONSUMER, stream, without="+ping")
    client = sync_client(url, health_check_interval=0.2)
    try:
        client.xgroup_create(stream, "lake", id="0")
        time.sleep(0.4)
        with pytest.raises(redis.exceptions.NoPermissionError) as caught:
            client.xpending(stream, "lake")
        assert "PING" in str(refusal(caught.value)).upper()
    finally:
        client.close()


# --- producer --------------------------------------------------------------------

_PRODUCER = role("producer")
_EXPLICIT = role("producer (explicit IDs)")


def _producer_env(url: str, stream: str, tmp_path: Path, explicit: bool) -> dict[str, str]:
    env = consumer_env(url, tmp_path / "lake", "unused", stream)
    env.update(
        POSLAKE_IB_PORT="1",  # Redis is checked before IB is connected
        POSLAKE_PRODUCER_SPOOL_DIR=str(tmp_path / "spool"),
        POSLAKE_PRODUCER_EXPLICIT_IDS=str(explicit).lower(),
    )
    return env


@pytest.mark.parametrize("explicit", [False, True], ids=["server-ids", "explicit-ids"])
def test_producer_with_exactly_its_rights(
    redis_url: str, stream: str, tmp_path: Path, explicit: bool
) -> None:
    url = _as(redis_url, _EXPLICIT if explicit else _PRODUCER, stream)

    async def scenario() -> None:
        async with running_simulator(accounts=["DU100001"], positions=20, rate=100) as sim:
            settings = producer_settings(
                url, stream, sim.port, tmp_path / "spool", producer_explicit_ids=explicit
            )
            async with running_producer(settings) as producer:
                await producer.outbox.check_access()
                await until(lambda: producer.outbox.stats.published >= 60)
                assert producer.outbox.health.ok, producer.outbox.health.reason()
                assert await producer.stop()

    asyncio.run(scenario())
    admin = sync_client(redis_url)
    try:
        assert admin.xlen(stream) >= 60
    finally:
        admin.close()


# Rights only a rare path needs (tested below): without them the producer starts.
_PRODUCER_RARE = {"server-ids": {"+xrevrange", "+xsetid"}, "explicit-ids": {"+xrange", "+xsetid"}}
_PRODUCER_CASES = [
    (mode, r)
    for mode, which in (("server-ids", _PRODUCER), ("explicit-ids", _EXPLICIT))
    for r in _rights(which)
    if r not in _PRODUCER_RARE[mode]
]


@pytest.mark.parametrize(("mode", "right"), _PRODUCER_CASES)
def test_producer_with_one_right_less_stops_at_start(
    redis_url: str, stream: str, tmp_path: Path, mode: str, right: str
) -> None:
    explicit = mode == "explicit-ids"
    which = _EXPLICIT if explicit else _PRODUCER
    url = _as(redis_url, which, stream, without=_rule(right, stream))
    done = _run(["-m", "producer"], _producer_env(url, stream, tmp_path, explicit))
    assert done.returncode not in (-11, 139), done.stderr
    _assert_refused(done, "producer", *_needles(right, stream))


def test_producer_explicit_ids_without_xrange_names_it_on_a_refused_id(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    """The rare path of +xrange: an explicit ID Redis refuses (here the stream's top
    jumps ahead of the producer's clock) is read back before it is written again."""
    for granted in (True, False):
        name = f"{stream}-{granted}"
        url = _as(redis_url, _EXPLICIT, name, without=None if granted else "+xrange")

        async def scenario(url: str = url, name: str = name, granted: bool = granted) -> None:
            async with running_simulator(accounts=["DU100001"], positions=20, rate=200) as sim:
                settings = producer_settings(
                    url, name, sim.port, tmp_path / f"spool-{granted}", producer_explicit_ids=True
                )
                async with running_producer(settings) as producer:
                    outbox = producer.outbox
                    await until(lambda: outbox.stats.published >= 20)
                    admin = sync_client(redis_url)
                    try:
                        admin.xadd(name, {"x": "ahead"}, id=f"{int(time.time() * 1000) + 60_000}-0")
                    finally:
                        admin.close()
                    if granted:
                        await until(lambda: outbox.stats.server_assigned_ids > 0)
                        await until(lambda: outbox.health.ok)
                    else:
                        await until(lambda: "XRANGE" in outbox.health.reason().upper())
                        assert "NOPERM" in outbox.health.reason()
                        assert outbox.buffered > 0 or outbox.stats.spooled > 0
                    await producer.stop()

        asyncio.run(scenario())


# --- operator commands ----------------------------------------------------------

_COMMANDS: dict[str, list[str]] = {
    "status": ["status"],
    "replay": ["replay", "--beginning", "--yes"],
    "dlq list": ["dlq", "list"],
    "dlq requeue": ["dlq", "requeue", "--all", "--yes"],
    "dlq purge": ["dlq", "purge", "--all", "--yes"],
}
_EXPECTED = {
    "status": "dead letters",
    "replay": "entries will be delivered again",
    "dlq list": "2 of 2 dead letters shown",
    "dlq requeue": "2 dead letters requeued",
    "dlq purge": "2 dead letters deleted",
}


def _operator_data(url: str, stream: str) -> None:
    """A stream with a group, a consumer holding pending entries, two dead letters
    and a held maintenance lease: every command has something to do."""
    publish(url, stream, make_updates(30))
    settings = _settings(stream)
    admin = sync_client(url)
    try:
        admin.xgroup_create(stream, "lake", id="0")
        admin.xreadgroup("lake", "c1", {stream: ">"}, count=10)
        for n in range(2):
            admin.xadd(
                settings.dlq_stream,
                {"v": "1", "payload": "{}", "dlq:reason": f"test {n}", "dlq:source_id": "1-1"},
            )
        admin.set(settings.maintenance_lease_key, "c1", px=60_000)
    finally:
        admin.close()


def _lengths(url: str, stream: str) -> tuple[int, int]:
    admin: Any = sync_client(url)
    try:
        return int(admin.xlen(stream)), int(admin.xlen(_settings(stream).dlq_stream))
    finally:
        admin.close()


def _operator(url: str, stream: str, command: str) -> subprocess.CompletedProcess[str]:
    env = consumer_env(url, Path("/nonexistent-lake"), "unused", stream)
    return _run(["-m", "poslake", *_COMMANDS[command]], env)


@pytest.mark.parametrize("command", list(_COMMANDS))
def test_operator_command_with_exactly_its_rights(
    redis_url: str, stream: str, command: str
) -> None:
    _operator_data(redis_url, stream)
    for which in (role(command), operator_role()):
        if which is not role(command):
            _operator_data(redis_url, stream + "-all")
            done = _operator(_as(redis_url, which, stream + "-all"), stream + "-all", command)
        else:
            done = _operator(_as(redis_url, which, stream), stream, command)
        assert done.returncode == 0, done.stderr
        assert _EXPECTED[command] in done.stdout, done.stdout
        assert "NOPERM" not in done.stdout + done.stderr
    status = _operator(_as(redis_url, role("status"), stream), stream, "status")
    assert status.returncode == 0 and "held by c1" in status.stdout, status.stdout


_STATUS_SOFT = {"+get", "+pttl"}  # the lease shows as "cannot read"
_STATUS_NO_LAG = {"+xrevrange", "+xrange"}  # only when Redis does not report the lag
_OPERATOR_CASES = [(name, r) for name in _COMMANDS for r in _rights(role(name))]


@pytest.mark.parametrize(("command", "right"), _OPERATOR_CASES)
def test_operator_command_with_one_right_less(
    redis_url: str, stream: str, command: str, right: str
) -> None:
    _operator_data(redis_url, stream)
    if command == "status" and right in _STATUS_NO_LAG:
        # Deleting an undelivered entry makes Redis 7 report no lag: status counts it.
        admin: Any = sync_client(redis_url)
        try:
            last = admin.xrevrange(stream, count=1)
            admin.xdel(stream, last[0][0])
            lag = admin.xinfo_groups(stream)[0].get("lag")
        finally:
            admin.close()
        if lag is not None:
            pytest.skip("this Redis reports the lag after deletions")
    which = role(command)
    if command == "replay" and right in {"+xinfo|stream", "+xrevrange"}:
        admin = sync_client(redis_url)
        try:
            version = str(admin.info("server")["redis_version"])
        finally:
            admin.close()
        if int(version.split(".", maxsplit=1)[0]) < 7:  # no ENTRIESREAD to compute: not used
            done = _operator(_as(redis_url, which, stream, without=right), stream, command)
            assert done.returncode == 0 and _EXPECTED[command] in done.stdout, done.stderr
            return
    before = _lengths(redis_url, stream)
    done = _operator(_as(redis_url, which, stream, without=_rule(right, stream)), stream, command)
    assert done.returncode not in (-11, 139), done.stderr
    if command.startswith("dlq") and done.returncode == ExitCode.REFUSED:
        assert _lengths(redis_url, stream) == before  # refused as a whole, never half done
    if command == "status" and right in {"~{book_lease}", "~{book_progress}"}:
        # the book's lease and progress are read only once a book exists; unreadable,
        # its lease shows as "cannot read" and the tables' own progress is used
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        return
    if command == "status" and right in _STATUS_SOFT | {"~{lease}"}:
        assert done.returncode == 0, done.stderr
        lease = next(x for x in done.stdout.splitlines() if x.startswith("maintenance lease"))
        named = "GET" if right == "~{lease}" else right[1:].upper()
        assert "cannot read" in lease and "NOPERM" in lease and named in lease.upper(), lease
        return
    _assert_refused(done, command.split(maxsplit=1)[0], *_needles(right, stream))


# --- the strategy book ------------------------------------------------------------

_BOOK_ROLE = role("book")


def _book_once(url: str, lake: Path, stream: str) -> subprocess.CompletedProcess[str]:
    return _run(["-m", "poslake", "book", "--once"], consumer_env(url, lake, "unused", stream))


def test_book_with_exactly_its_rights(redis_url: str, stream: str, lake: Path) -> None:
    publish(redis_url, stream, make_updates(50))
    assert _drain(redis_url, lake, stream, lake).returncode == 0
    for which in (_BOOK_ROLE, operator_role()):
        done = _book_once(_as(redis_url, which, stream), lake, stream)
        assert done.returncode == 0, done.stderr
        assert "book up to date" in done.stdout and "NOPERM" not in done.stderr
    admin = sync_client(redis_url)
    try:
        assert admin.get(_settings(stream).book_lease_key) is None  # released
        assert admin.get(_settings(stream).book_progress_key) is not None
    finally:
        admin.close()


_BOOK_ONCE = [r for r in _rights(_BOOK_ROLE) if r != "+pexpire"]  # renewal: the loop's


@pytest.mark.parametrize("right", _BOOK_ONCE)
def test_book_with_one_right_less(redis_url: str, stream: str, lake: Path, right: str) -> None:
    publish(redis_url, stream, make_updates(20))
    assert _drain(redis_url, lake, stream, lake).returncode == 0
    done = _book_once(_as(redis_url, _BOOK_ROLE, stream, _rule(right, stream)), lake, stream)
    if right in ("+get", "+del"):  # refused inside the lease script: Redis names the script
        _assert_refused(done, "book", "refused to EVAL", _settings(stream).book_lease_key)
    else:
        _assert_refused(done, "book", *_needles(right, stream))
