"""Waiting for replicas after each pipeline: WAIT, or WAITAOF (Redis 7.2+).

With ``POSLAKE_PRODUCER_WAIT_REPLICAS`` the producer's outbox ends every pipeline
with the command here and counts the pipeline as published only if the reply
confirms it (producer/outbox.py says what happens otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from producer.resp import pack_command


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """How many replicas must confirm each pipeline (0: none asked), within how long,
    and whether they must have it in their AOF too (WAITAOF, Redis 7.2+)."""

    replicas: int = 0
    timeout_ms: int = 500
    aof: bool = False

    @property
    def command(self) -> bytes | None:
        if self.aof:
            return pack_command(
                b"WAITAOF", b"1", str(self.replicas).encode(), str(self.timeout_ms).encode()
            )
        if self.replicas:
            return pack_command(b"WAIT", str(self.replicas).encode(), str(self.timeout_ms).encode())
        return None

    @property
    def name(self) -> str:
        return "WAITAOF" if self.aof else "WAIT"

    @property
    def probe(self) -> bytes | None:
        """A command that answers at once, to check at start what :attr:`command` needs:
        WAIT for nothing, WAITAOF for the local fsync of nothing written yet (refused
        unless Redis knows WAITAOF and its AOF is on); None when nothing is waited for."""
        if self.command is None:
            return None
        if self.aof:
            return pack_command(b"WAITAOF", b"1", b"0", b"0")
        return pack_command(b"WAIT", b"0", b"0")

    def confirmed(self, reply: object) -> bool:
        if self.aof:
            if not isinstance(reply, list) or len(reply) != 2:
                return False
            local, replicas = reply
            return (
                isinstance(local, int)
                and local >= 1
                and isinstance(replicas, int)
                and (replicas >= self.replicas)
            )
        return isinstance(reply, int) and reply >= self.replicas


class NotReplicated(ConnectionError):
    """The pipeline's XADDs landed on the master, but too few replicas confirmed them."""
