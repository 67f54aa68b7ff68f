"""The Lua scripts that make each queue step atomic and one round trip.

Each runs inside Redis in one call: submitting (with the busy and fair-share checks),
a worker's claim without waiting, delivering a whole batch (with its telemetry), and
handing an entry back. ``persona.queue`` calls them; the argument layouts are here.
"""

from __future__ import annotations

__all__ = ["CLAIM_SCRIPT", "DELIVER_SCRIPT", "REQUEUE_SCRIPT", "SUBMIT_SCRIPT"]

# Refuse new work once a stream is full, or once its sender already has their share
# waiting (so a flood from one user cannot starve everyone else), atomically with
# adding it. KEYS[2] is the sender's pending counter, or '' for an anonymous caller.
# The entry carries the cancel epoch as it was added ('x' if the request was already
# withdrawn), so a worker can skip reading cancel flags when nothing was cancelled since.
# A caller that waits for the reply in the same round trip (``ask``) sets ARGV[5]: a
# refusal is then also pushed to the reply list (KEYS[5]), so that wait ends at once.
SUBMIT_SCRIPT = """
local function refuse(why)
  if ARGV[5] == '1' then
    redis.call('RPUSH', KEYS[5], why)
    redis.call('EXPIRE', KEYS[5], 60)
  end
  return why
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return refuse('busy') end
if KEYS[2] ~= '' then
  local held = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
  if held > tonumber(ARGV[3]) then
    redis.call('DECR', KEYS[2])
    return refuse('user_busy')
  end
end
local epoch = redis.call('GET', KEYS[3]) or '0'
if redis.call('EXISTS', KEYS[4]) == 1 then epoch = 'x' end
return redis.call('XADD', KEYS[1], '*', 'r', ARGV[2], 'e', epoch)
"""

# A worker's claim without waiting, in one round trip: new interactive entries, else
# new batch entries; with them the cancel epoch and the active versions as they are
# now. KEYS: interactive stream, batch stream, cancel epoch, active versions.
CLAIM_SCRIPT = """
local stream, got = KEYS[1], nil
for s = 1, 2 do
  got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[s], '>')
  if got then break end
end
return {got or {}, redis.call('GET', KEYS[3]) or '0', redis.call('HGETALL', KEYS[4])}
"""

# Deliver each reply unless its request was answered already; always settle its entry;
# then record the batch's telemetry, so one call delivers, settles and counts a whole
# batch (no round trip per job, none for telemetry). ARGV starts with six shared values
# (reply TTL, answered TTL, group, worker, reply count n, reply-log cap). KEYS come in
# fives per reply (answered flag, reply list, stream or '', stats hash, sender counter
# or ''), then the reply log and the telemetry hashes; ARGV goes on with three values per
# reply (reply, entry id or '', counter), then the telemetry: a count of reply-log rows
# and seven values per row, then a count of HINCRBYs and three values each (key index
# after the reply log, field, amount), then the same for HINCRBYFLOATs. Telemetry uses
# pcall: a failure to count never undoes or blocks a delivery.
DELIVER_SCRIPT = """
local reply_ttl, answered_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local group, worker, n = ARGV[3], ARGV[4], tonumber(ARGV[5])
local new, counted, settled, stats = 0, {}, {}, nil
for i = 0, n - 1 do
  local k, a = i * 5, 6 + i * 3
  local first = redis.call('SET', KEYS[k + 1], worker, 'NX', 'EX', answered_ttl)
  if first then
    new = new + 1
    redis.call('LPUSH', KEYS[k + 2], ARGV[a + 1])
    redis.call('EXPIRE', KEYS[k + 2], reply_ttl)
    stats = KEYS[k + 4]
    counted[ARGV[a + 3]] = (counted[ARGV[a + 3]] or 0) + 1
    if KEYS[k + 5] ~= '' and tonumber(redis.call('GET', KEYS[k + 5]) or '0') > 0 then
      redis.call('DECR', KEYS[k + 5])
    end
  end
  if ARGV[a + 2] ~= '' then
    local ids = settled[KEYS[k + 3]]
    if not ids then ids = {}; settled[KEYS[k + 3]] = ids end
    ids[#ids + 1] = ARGV[a + 2]
  end
end
-- Counters and acknowledgements once per batch, not once per reply.
for name, count in pairs(counted) do redis.call('HINCRBY', stats, name, count) end
for stream, ids in pairs(settled) do
  for s = 1, #ids, 1000 do
    local chunk = {unpack(ids, s, math.min(s + 999, #ids))}
    redis.call('XACK', stream, group, unpack(chunk))
    redis.call('XDEL', stream, unpack(chunk))
  end
end
local log, t = n * 5 + 1, 6 + n * 3 + 1
for r = 1, tonumber(ARGV[t] or '0') do
  local v = t + (r - 1) * 7
  redis.pcall('XADD', KEYS[log], 'MAXLEN', '~', ARGV[6], '*', 'p', ARGV[v + 1], 'v', ARGV[v + 2],
    'ok', ARGV[v + 3], 't', ARGV[v + 4], 'q', ARGV[v + 5], 'g', ARGV[v + 6], 'k', ARGV[v + 7])
end
t = t + 1 + tonumber(ARGV[t] or '0') * 7
for _, command in ipairs({'HINCRBY', 'HINCRBYFLOAT'}) do
  for c = 1, tonumber(ARGV[t] or '0') do
    local v = t + (c - 1) * 3
    redis.pcall(command, KEYS[log + tonumber(ARGV[v + 1])], ARGV[v + 2], ARGV[v + 3])
  end
  t = t + 1 + tonumber(ARGV[t] or '0') * 3
end
return new
"""


# Put an unfinished entry back at the end of its stream (a leaving worker's hand-back).
REQUEUE_SCRIPT = """
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if #entry == 0 then return false end
return redis.call('XADD', KEYS[1], '*', unpack(entry[1][2]))
"""
