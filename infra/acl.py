"""The least-privilege Redis ACL of every poslake role, declared once.

Each :class:`Role` lists the commands it sends (as ``ACL SETUSER`` spells them,
``xinfo|groups`` for a subcommand) and the keys it touches. The README's
"Security" section is rendered from here (a test compares the two) and the ACL
tests run every role with exactly these rights, then with one right less. So the
documentation, the tests and the code cannot drift apart: a new command in the
code fails the tests until it is declared here.

``python -m infra.acl`` prints the ``ACL SETUSER`` lines for this deployment's
``POSLAKE_STREAM`` and ``POSLAKE_GROUP``.

Keys are templates over the settings: ``{stream}`` (``POSLAKE_STREAM``),
``{dlq}`` (``<stream>:dlq``), ``{lease}`` (the consumers' maintenance lease,
``poslake:<stream>:<group>:maintenance``), ``{book_lease}`` and ``{book_progress}``
(``poslake book``'s lease and progress note, ``poslake:<stream>:book[:progress]``).
Every role logs in with AUTH, which needs no right; a URL with a database other
than 0 needs ``+select`` too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from shared.settings import Settings

PASSWORD_PLACEHOLDER = "<password>"


@dataclass(frozen=True, slots=True)
class Right:
    """One command a role sends and what for. ``rare``: only that path sends it;
    ``without``: what happens when it is missing, where that is not the rule (one
    line naming the command, exit 6)."""

    command: str
    used_for: str
    rare: str | None = None
    without: str | None = None


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    user: str  # the suggested ACL user name
    summary: str
    rights: tuple[Right, ...]
    keys: tuple[str, ...]  # templates: {stream}, {dlq}, {lease}

    @property
    def commands(self) -> tuple[str, ...]:
        return tuple(right.command for right in self.rights)

    def key_names(self, settings: Settings) -> list[str]:
        names = {
            "stream": settings.stream,
            "dlq": settings.dlq_stream,
            "lease": settings.maintenance_lease_key,
            "book_lease": settings.book_lease_key,
            "book_progress": settings.book_progress_key,
        }
        return [template.format(**names) for template in self.keys]

    def rules(self, settings: Settings, *, without: str | None = None) -> list[str]:
        """The ACL rules after ``reset on >password``; ``without`` leaves out one
        command (``+name``) or key pattern (``~name``), for tests."""
        rules = [f"~{key}" for key in self.key_names(settings)]
        rules += [f"+{command}" for command in self.commands]
        if without is not None:
            if without not in rules:
                raise ValueError(f"{self.name} has no right {without!r}")
            rules.remove(without)
        return rules

    def setuser(self, settings: Settings, password: str = PASSWORD_PLACEHOLDER) -> str:
        """The ``ACL SETUSER`` line to paste into ``redis-cli``."""
        return " ".join(["ACL SETUSER", self.user, "reset", "on", f">{password}",
                         *self.rules(settings)])  # fmt: skip


def _right(
    command: str, used_for: str, rare: str | None = None, without: str | None = None
) -> Right:
    return Right(command, used_for, rare, without)


_PRODUCER = (_right("xadd", "publish each update (trimming is an XADD option)"),)
_AFTER_FAILOVER = (
    "a reconnect finds the stream's top behind the newest ID it got (a failover lost entries)"
)
_IDS_MAY_REPEAT = "warned in the log; IDs of lost entries may be handed out again"
_XSETID = _right(
    "xsetid", "move the stream's last ID back past the newest ID it got",
    rare=_AFTER_FAILOVER, without=_IDS_MAY_REPEAT,
)  # fmt: skip
_GUARD = (
    _right(
        "xrevrange", "read the stream's newest ID after a reconnect",
        rare="a reconnect after publishing", without=_IDS_MAY_REPEAT,
    ),
    _XSETID,
)  # fmt: skip
_EXPLICIT = (
    _right("xrevrange", "read the stream's newest ID at connect, to keep IDs ahead of it"),
    _right(
        "xrange",
        "read back an entry whose explicit ID Redis refused (written before?)",
        rare="a retried chunk, or a stream top ahead of the producer's clock",
        without="those updates stay buffered and are retried; the log and /healthz (503) "
        "name XRANGE",
    ),
)
_LEASE_WARNED = "warned in the log and the metrics, shown by `poslake status`"
_LEASE = (
    _right("set", "take the maintenance lease (SET NX PX)",
           without=f"table maintenance never runs; {_LEASE_WARNED}"),
    _right("get", "check the lease is still its own before releasing it",
           without=f"the lease stays held 10 minutes after each run; {_LEASE_WARNED}"),
    _right("del", "release the lease",
           without=f"the lease stays held 10 minutes after each run; {_LEASE_WARNED}"),
)  # fmt: skip
_CONSUMER = (
    _right("xgroup|create", "create the group (and stream) at start; refused if missing"),
    _right("xinfo|groups", "does the group exist (start under maxmemory); drain's end check"),
    _right("xreadgroup", "read new entries and its own pending ones"),
    _right("xautoclaim", "claim entries other consumers left pending"),
    _right("xpending", "delivery counts, and the group's pending count for --drain"),
    _right("xrange", "is anything left after the group's position (--drain)"),
    _right(
        "multi",
        "settle a batch atomically (checked at start: without it Redis would run "
        "the queued commands one by one)",
    ),
    _right("exec", "settle a batch atomically: dead letters and acknowledgements"),
    _right("xack", "acknowledge a committed batch"),
    _right("xadd", "write a dead letter to <stream>:dlq", rare="an entry is dead-lettered"),
    _right(
        "xinfo|consumers",
        "the per-consumer pending gauge of /metrics",
        rare="/metrics is scraped (POSLAKE_METRICS_PORT)",
        without="/metrics lacks the lag and pending gauges; warned in the log",
    ),
    _right("ping", "redis-py's health check", rare="a connection was idle for 30 s"),
    _right("eval", "trim the stream below what every group acknowledged, atomically"),
    _right(
        "xinfo|stream",
        "the stream's first and last entry, when over its memory cap",
        rare="the stream is over POSLAKE_STREAM_MAX_BYTES",
    ),
    _right("memory|usage", "the stream's size against POSLAKE_STREAM_MAX_BYTES"),
    _right("xtrim", "trim the stream (in the script) and bound <stream>:dlq"),
    *_LEASE,
)
_STATUS = (
    _right("exists", "is there a stream yet"),
    _right("xinfo|stream", "length, first and last entry"),
    _right("xinfo|groups", "each group's position, lag and pending count"),
    _right("xinfo|consumers", "each consumer's pending count and idle time"),
    _right("xpending", "each consumer's highest delivery count"),
    _right(
        "xrange",
        "count each group's lag (Redis's own is nil or stale after a failover or an AOF restart)",
    ),
    _right("xlen", "the number of dead letters"),
    _right("get", "who holds the maintenance lease", without="the lease shows as cannot read"),
    _right(
        "pttl",
        "when the lease expires",
        rare="the lease is held",
        without="the lease shows as cannot read",
    ),
)
_REPLAY = (
    _right("xinfo|groups", "the group's position"),
    _right("xrange", "count the entries delivered again"),
    _right("info", "the server version (ENTRIESREAD needs 7.0)"),
    _right(
        "xinfo|stream",
        "the first entry kept (a replay from before it is refused); entries added, for ENTRIESREAD",
    ),
    _right("xrevrange", "the newest ID, for ENTRIESREAD", rare="Redis 7.0 and newer"),
    _right("xgroup|setid", "move the group"),
)
_RECONCILE = (
    _right("xinfo|stream", "the newest entry ID once IB's answer is in"),
    _right("xinfo|groups", "has the group read past it"),
    _right("xpending", "has the group acknowledged it", rare="the group holds pending entries"),
)
_BOOK = (
    _right("set", "take the book's lease (NX, with a TTL); note the version a step reflected"),
    _right("eval", "renew and release the lease only while it holds this instance's token"),
    _right("get", "the script's check that the lease is still this instance's"),
    _right("pexpire", "the script's renewal of the lease", rare="a step runs (renewed every 10 s)"),
    _right("del", "the script's release of the lease at stop"),
)
_DLQ_READ = (_right("xrange", "read dead letters"),)
_TRANSACTION = (
    _right("multi", "one transaction: never in both streams or neither"),
    _right("exec", "one transaction: never in both streams or neither"),
)

ROLES: tuple[Role, ...] = (
    Role("producer", "poslake-producer", "the IB producer", _PRODUCER + _GUARD, ("{stream}",)),
    Role(
        "producer (explicit IDs)",
        "poslake-producer",
        "the IB producer with POSLAKE_PRODUCER_EXPLICIT_IDS=true",
        (*_PRODUCER, *_EXPLICIT, _XSETID),
        ("{stream}",),
    ),
    Role(
        "consumer",
        "poslake-consumer",
        "each consumer of the group",
        _CONSUMER,
        ("{stream}", "{dlq}", "{lease}"),
    ),
    Role(
        "status",
        "poslake-status",
        "poslake status",
        _STATUS,
        ("{stream}", "{dlq}", "{lease}", "{book_lease}", "{book_progress}"),
    ),
    Role("replay", "poslake-replay", "poslake replay", _REPLAY, ("{stream}",)),
    Role("reconcile", "poslake-reconcile", "poslake reconcile", _RECONCILE, ("{stream}",)),
    Role(
        "book",
        "poslake-book",
        "poslake book (its overrides and queries need only the lake)",
        _BOOK,
        ("{book_lease}", "{book_progress}"),
    ),
    Role(
        "dlq list",
        "poslake-dlq-list",
        "poslake dlq list",
        (*_DLQ_READ, _right("xlen", "count the dead letters")),
        ("{dlq}",),
    ),
    Role(
        "dlq requeue",
        "poslake-dlq-requeue",
        "poslake dlq requeue",
        (
            *_DLQ_READ,
            *_TRANSACTION,
            _right("xadd", "put the original fields back on the stream"),
            _right("xdel", "delete the requeued dead letter"),
        ),
        ("{stream}", "{dlq}"),
    ),
    Role(
        "dlq purge",
        "poslake-dlq-purge",
        "poslake dlq purge",
        (*_DLQ_READ, *_TRANSACTION, _right("xdel", "delete dead letters")),
        ("{dlq}",),
    ),
)
"""Every role that talks to Redis. ``poslake maintain`` and ``poslake query`` read and
write only the lake: they need no Redis user."""

LAKE_ONLY_COMMANDS = ("maintain", "query")
# ``reconcile`` reaches Redis only to wait for the consumers (its role above) and IB.


def role(name: str) -> Role:
    for candidate in ROLES:
        if candidate.name == name:
            return candidate
    raise KeyError(name)


def operator_role() -> Role:
    """Every operator command in one user: the union of their rights and keys."""
    names = ("status", "replay", "reconcile", "book", "dlq list", "dlq requeue", "dlq purge")
    rights: dict[str, Right] = {}
    keys: list[str] = []
    for name in names:
        for right in role(name).rights:
            rights.setdefault(right.command, right)
        keys += [k for k in role(name).keys if k not in keys]
    return Role("operator", "poslake-operator", "every operator command", tuple(rights.values()),
                tuple(keys))  # fmt: skip


def render_setusers(settings: Settings) -> str:
    """The ``ACL SETUSER`` lines of the README, one user per role."""
    lines = []
    for candidate in (*ROLES, operator_role()):
        if candidate.name == "producer":
            continue  # the explicit-IDs line below is the same user with +xrange too
        lines.append(candidate.setuser(settings))
    return "\n".join(lines)


def render_readme(settings: Settings) -> str:
    """The README block between ``<!-- acl:begin -->`` and ``<!-- acl:end -->``."""
    out = ["```", role("producer").setuser(settings), "```", "", "With "
           "`POSLAKE_PRODUCER_EXPLICIT_IDS=true` the producer needs `+xrange` too, so use "
           "this line instead:", "", "```", role("producer (explicit IDs)").setuser(settings),
           "```", "", "The consumers (one user for all of them) and the operator commands, "
           "one user each or `poslake-operator` for all:", "", "```"]  # fmt: skip
    out += [r.setuser(settings) for r in ROLES if not r.name.startswith("producer")]
    out += [operator_role().setuser(settings), "```", ""]
    out += [
        "Without a right, a program stops with one line naming the command (or the key) "
        "and exit 6, at start or at its first use, except where this table says:",
        "",
        "| role | right | needed only when | without it |",
        "|---|---|---|---|",
    ]
    for candidate in ROLES:
        for right in candidate.rights:
            if right.rare or right.without:
                command = right.command.replace("|", "\\|")  # a table cell
                out.append(
                    f"| {candidate.name} | `+{command}` | {right.rare or 'always'} | "
                    f"{right.without or 'exit 6 then'} |"
                )
    return "\n".join(out)


def main() -> int:
    from shared.settings import load_settings_or_report  # noqa: PLC0415

    settings = load_settings_or_report("poslake acl")
    if settings is None:
        return 2
    print(render_setusers(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
