"""Keeping the stream bounded without losing an entry: trim what every group acknowledged.

Redis never trims a stream by itself, and ``XTRIM``/``XADD MAXLEN`` know nothing of
consumer groups: trimmed by length or age, an entry no group has read yet is gone.
So the consumers trim, and only below the **safe point**: for each consumer group
of the stream, its oldest pending entry if it has one, else the entry just past its
last-delivered ID; over all groups, the smallest. Every entry below it was
delivered to every group and acknowledged by it (an entry is delivered in ID order,
and one delivered and not acknowledged is pending). A stream without a group is
never trimmed.

Within that bound the trim keeps a replay window: entries younger than
``POSLAKE_STREAM_RETENTION_S`` stay, unless the stream takes more than
``POSLAKE_STREAM_MAX_BYTES``, when acknowledged entries go even inside the window
(the oldest first, down to ~90% of the cap). Unacknowledged entries are never
trimmed, whatever the cap: a stream still over it after the trim holds that much
unacknowledged data, which is a warning, a metric and a ``/healthz`` reason.

The group state is read and the trim done in one Lua script, atomically: no
delivery, claim, ``XGROUP SETID`` (a replay) or new group can come in between.
Every consumer runs it every ``POSLAKE_STREAM_TRIM_INTERVAL_S``: it is idempotent,
and a stopped consumer's pending entries hold the safe point back for as long as
they are pending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from shared.settings import Settings

log = logging.getLogger(__name__)

CAP_TARGET = 0.9  # over the cap, trim down to this share of it

# KEYS[1] the stream; ARGV[1] the replay window in ms, ARGV[2] the cap in bytes, ARGV[3]
# now in ms (the caller's clock: a window of hours tolerates any sane skew).
# Returns {removed, bytes before, bytes after, target ID, safe ID, clamped (0/1)};
# safe ID "" when no group exists (nothing is trimmed then).
TRIM_SCRIPT = """
local function call(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    -- name the command: Redis's own message inside a script does not
    return nil, reply.err
  end
  return reply
end
local function fail(command, err)
  if string.find(err, 'no such key', 1, true) or string.find(err, 'requires the key', 1, true) then
    return nil
  end
  local code = string.match(err, '^(%u+) ') or 'ERR'
  if string.find(err, "can't run this command", 1, true) then code = 'NOPERM' end
  return redis.error_reply(code .. ' poslake stream trim: ' .. command .. ': ' .. err)
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
local function field(flat, name)
  for i = 1, #flat, 2 do
    if flat[i] == name then return flat[i + 1] end
  end
  return nil
end
local key = KEYS[1]
local groups, err = call('XINFO', 'GROUPS', key)
if not groups then
  local reply = fail('XINFO GROUPS', err)
  if reply == nil then return {0, 0, 0, '', '', 0} end  -- no stream yet
  return reply
end
if #groups == 0 then return {0, 0, 0, '', '', 0} end
local safe = nil
for _, group in ipairs(groups) do
  local name = field(group, 'name')
  local floor
  if tonumber(field(group, 'pending')) > 0 then
    local summary, perr = call('XPENDING', key, name)
    if not summary then return fail('XPENDING', perr) end
    floor = summary[2]
  else
    local ms, seq = parse(field(group, 'last-delivered-id'))
    floor = string.format('%.0f-%.0f', ms, seq + 1)
  end
  if safe == nil or less(floor, safe) then safe = floor end
end
local before, merr = call('MEMORY', 'USAGE', key)
if not before then return fail('MEMORY USAGE', merr) end
local now_ms = tonumber(ARGV[3])
local window = string.format('%.0f-0', math.max(0, now_ms - tonumber(ARGV[1]) + 1))
local cap = tonumber(ARGV[2])
local size, total, target, clamped = before, 0, window, 0
-- Over the cap, cut where the entries' times put ~90% of the cap behind: the rate
-- need not be even, so a few rounds close in on it.
for round = 1, 4 do
  target = window
  if size > cap then
    local info, ierr = call('XINFO', 'STREAM', key)
    if not info then return fail('XINFO STREAM', ierr) end
    local first, last = field(info, 'first-entry'), field(info, 'last-entry')
    if first and last then
      local first_ms = parse(first[1])
      local last_ms = parse(last[1])
      local share = 1 - (cap * CAP_TARGET) / size
      local cut = string.format('%.0f-0', first_ms + math.ceil(share * (last_ms - first_ms)))
      if less(target, cut) then target = cut end
    end
  end
  clamped = 0
  if less(safe, target) then
    target = safe
    clamped = 1
  end
  local removed, terr = call('XTRIM', key, 'MINID', target)
  if not removed then return fail('XTRIM', terr) end
  total = total + removed
  if removed > 0 then size = redis.call('MEMORY', 'USAGE', key) or 0 end
  if size <= cap or clamped == 1 or removed == 0 then break end
end
return {total, before, size, target, safe, clamped}
""".replace("CAP_TARGET", repr(CAP_TARGET))


@dataclass(frozen=True, slots=True)
class TrimResult:
    removed: int
    bytes_before: int
    bytes_after: int
    trimmed_to: str  # entries below this ID are gone ("" when nothing was safe)
    safe_point: str
    held_by_unacknowledged: bool  # over the cap after the trim: unacknowledged entries


def trim_stream(client: redis.Redis, stream: str, retention_s: float, max_bytes: int) -> TrimResult:
    """One trim of ``stream`` (see the module's docstring); raises redis errors as they
    come (NOPERM names the command the script was refused)."""
    now_ms = str(int(time.time() * 1000))
    window_ms = str(int(retention_s * 1000))
    reply: Any = client.eval(TRIM_SCRIPT, 1, stream, window_ms, str(max_bytes), now_ms)
    removed, before, after, target, safe, clamped = reply
    return TrimResult(
        removed=int(removed),
        bytes_before=int(before),
        bytes_after=int(after),
        trimmed_to=_text(target),
        safe_point=_text(safe),
        held_by_unacknowledged=bool(clamped) and int(after) > max_bytes,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StreamTrimmer:
    """Runs :func:`trim_stream` on the interval, for one consumer (its main loop)."""

    def __init__(self, settings: Settings, run: Callable[[Callable[[], TrimResult]], TrimResult],
                 client: redis.Redis) -> None:  # fmt: skip
        self._settings = settings
        self._run = run  # the consumer's Redis retry policy
        self._client = client
        self._next_at = 0.0  # right after start, then on the interval
        self.trims = 0
        self.removed = 0
        self.stream_bytes = 0
        self.over_cap = False
        self.seconds = 0.0  # of the last trim

    def poll(self, force: bool = False) -> TrimResult | None:
        """Trim when due (or ``force``); the result, or None when it was not due."""
        s = self._settings
        if not force and time.monotonic() < self._next_at:
            return None
        self._next_at = time.monotonic() + s.stream_trim_interval_s
        started = time.perf_counter()
        result = self._run(
            lambda: trim_stream(self._client, s.stream, s.stream_retention_s, s.stream_max_bytes)
        )
        self.seconds = time.perf_counter() - started
        self.trims += 1
        self.removed += result.removed
        self.stream_bytes = result.bytes_after
        if result.held_by_unacknowledged and not self.over_cap:
            log.warning(
                "stream holds more unacknowledged entries than POSLAKE_STREAM_MAX_BYTES: "
                "nothing unacknowledged is trimmed; consumers are behind or stopped",
                extra={
                    "stream": s.stream,
                    "stream_bytes": result.bytes_after,
                    "max_bytes": s.stream_max_bytes,
                    "safe_point": result.safe_point,
                },
            )
        elif self.over_cap and not result.held_by_unacknowledged:
            log.info("stream back under POSLAKE_STREAM_MAX_BYTES", extra={"stream": s.stream})
        self.over_cap = result.held_by_unacknowledged
        if result.removed:
            log.info(
                "stream trimmed",
                extra={
                    "stream": s.stream,
                    "removed": result.removed,
                    "trimmed_to": result.trimmed_to,
                    "stream_bytes": result.bytes_after,
                    "trim_s": round(self.seconds, 4),
                },
            )
        return result
