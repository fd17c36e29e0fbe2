"""The Lua scripts the Redis token store runs, each one atomic on the server.

The grant hash holds `version`, `grant` and, while a refresh may have tokens that are not
stored yet, `inflight`: "<process id> <beat ms> <seen ms>" (Redis's own clock, TIME).

- A holder writes the mark when it confirms, just before it sends the refresh token, and
  renews its beat every time it extends the lock; a successful write (compare-and-set)
  deletes it, and so does the holder's release when it never got to a write (Close
  failed; nothing to save).
- Another holder that finds the mark waits instead of sending the same refresh token:
  while the beat is younger than the lock's lifetime the owner is alive; an older beat is
  first noted as seen (`seen`), and only ABANDON ms after that sighting, with no beat
  in between, is the mark taken over. The owner of tokens Close issued while Redis was
  down thus gets the time it needs to save them once Redis is back (it retries every
  second), and a dead owner delays the next refresh by the lock's lifetime plus ABANDON.
  A beat or sighting ahead of Redis's clock counts from now; a mark that does not parse
  is taken over at once.
"""

from __future__ import annotations

# The current time in ms by the Redis server's clock: every process compares one clock.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] the grant hash; ARGV: expected version ("" = nothing stored), new version, value.
CAS = """
local current = redis.call('HGET', KEYS[1], 'version')
if (current or '') ~= ARGV[1] then return current or '' end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'grant', ARGV[3])
redis.call('HDEL', KEYS[1], 'inflight')
return {ARGV[2]}
"""

# KEYS[1] the lock, KEYS[2] the grant; ARGV[1] our owner value, ARGV[2] new lifetime in
# ms, ARGV[3] our process id. Extends the lock if it is ours, and renews our mark's beat
# even when the lock was lost (deleted by hand): we may still be waiting for Close.
EXTEND = (
    _NOW
    + """
local kept = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then kept = redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
local mark = redis.call('HGET', KEYS[2], 'inflight')
if mark and string.match(mark, '^(%S+) ') == ARGV[3] then
  redis.call('HSET', KEYS[2], 'inflight', ARGV[3] .. ' ' .. string.format('%d', now) .. ' 0')
end
return kept
"""
)

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS[1] the grant; ARGV[1] our process id: our mark goes, nobody else's.
UNMARK = """
local mark = redis.call('HGET', KEYS[1], 'inflight')
if mark and string.match(mark, '^(%S+) ') == ARGV[1] then
  return redis.call('HDEL', KEYS[1], 'inflight')
end
return 0
"""

# KEYS[1] the lock, KEYS[2] the grant; ARGV[1] our owner value, ARGV[2] the version we
# read, ARGV[3] our process id, ARGV[4] the lock's lifetime in ms, ARGV[5] ABANDON in ms.
# Answers {'lost'}, {'changed'}, {'busy', <ms to wait>} or {'ok'} (our mark is written,
# unless nothing is stored).
CONFIRM = (
    _NOW
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'lost'} end
local version = redis.call('HGET', KEYS[2], 'version') or ''
if version ~= ARGV[2] then return {'changed'} end
if version == '' then return {'ok'} end
local fresh, abandon = tonumber(ARGV[4]), tonumber(ARGV[5])
local mark = redis.call('HGET', KEYS[2], 'inflight')
if mark then
  local owner, beat, seen = string.match(mark, '^(%S+) (%d+) (%d+)$')
  if owner and owner ~= ARGV[3] then
    beat, seen = tonumber(beat), tonumber(seen)
    if beat > now or seen > now then
      -- From the future (a clock stepped back, a failover, a hand-written mark): count
      -- from now, so that it lasts no longer than one from a holder that just died.
      beat, seen = math.min(beat, now), math.min(seen, now)
      local clamped = owner .. ' ' .. string.format('%d', beat) .. ' ' .. string.format('%d', seen)
      redis.call('HSET', KEYS[2], 'inflight', clamped)
    end
    local age = now - beat
    if age < fresh then return {'busy', string.format('%d', fresh - age)} end
    if seen < beat then
      local noted = owner .. ' ' .. string.format('%d', beat) .. ' ' .. string.format('%d', now)
      redis.call('HSET', KEYS[2], 'inflight', noted)
      return {'busy', string.format('%d', abandon)}
    end
    local since = now - seen
    if since < abandon then return {'busy', string.format('%d', abandon - since)} end
  end
end
redis.call('HSET', KEYS[2], 'inflight', ARGV[3] .. ' ' .. string.format('%d', now) .. ' 0')
return {'ok'}
"""
)
