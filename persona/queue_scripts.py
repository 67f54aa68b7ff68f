"""The Lua scripts that make each queue step atomic and one round trip.

Each runs inside Redis in one call: submitting (with the busy and fair-share checks),
withdrawing, delivering a whole batch, recording the telemetry of many batches, setting
a request aside as a dead letter, handing an entry back, and the looks a caller takes
when a request is refused or goes unanswered. ``persona.queue``, ``persona.busy``,
``persona.unanswered`` and the workers call them; the argument layouts are here.
"""

from __future__ import annotations

import hashlib

from persona import constants as keys

__all__ = [
    "ANSWERED_TTL", "CANCEL_SCRIPT", "DEAD_LETTER_SCRIPT", "DELIVER_SCRIPT", "DIGEST_LUA", "FORGET_SCRIPT", "FULL_SCRIPT",
    "HOLDER_SCRIPT", "KEEP_SCRIPT", "NO_KEY_LUA", "ONE_MORE_WAITING", "OWN_IDS_SCRIPT", "RECORD_SCRIPT", "REDIS_NOW",
    "REFUSED_COUNTERS", "REQUEST_ID", "REQUEUE_SCRIPT", "SUBMIT_SCRIPT", "WORKERS_SCRIPT", "payload_digest",
]

# Redis's own time in seconds, as ``now``: what every script that times something (a
# heartbeat, a deadline) starts with, so machines whose clocks disagree agree on it.
REDIS_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# The stand-in for an optional key (``constants.NO_KEY``), as ``NO_KEY``: a script passed
# it has no such key (Redis checks every key passed against the user's ACL, so it is a
# persona: key, never '').
NO_KEY_LUA = f"""
local NO_KEY = '{keys.NO_KEY}'
"""

# A request's digest: the first DIGEST_CHARS hex digits of its payload's SHA-1
# (``payload_digest``). Kept beside its answered mark (``constants.DIGEST_KEY_PREFIX``), it
# tells the same request sent again (counted as queued) from a different one sent under an
# id in use (refused). 64 bits: two requests under one id share it by chance 1 in 10**19.
# The callers and workers make it and pass it in, so Redis, which every caller shares, does
# not hash every payload (2 ms of its time for one of 512 KB); ``digest``, the same in Lua,
# is for a script's caller that passes none.
DIGEST_CHARS = 16
DIGEST_LUA = f"""
local function digest(payload) return string.sub(redis.sha1hex(payload), 1, {DIGEST_CHARS}) end
"""


def payload_digest(payload: bytes | str) -> str:
    """A payload's digest, as the scripts' ``digest`` makes it from the same bytes."""
    return hashlib.sha1(payload.encode() if isinstance(payload, str) else payload).hexdigest()[:DIGEST_CHARS]


# Counting never stops the work it counts. A counter Redis cannot add to (a damaged one:
# `HSET persona:stats completed abc`) made a script fail halfway: the reply pushed, its
# entry never acknowledged, so every worker turn failed for good. So every count into the
# stats hash is a ``redis.pcall`` (only that count is lost; `persona queue stats` names
# the counter and its repair), and a sender's count of requests waiting that is no number
# is read as 0: never counted down, and started again at 1 by ``ONE_MORE_WAITING``.

# A sender's count of requests waiting, one more (a submit, a retry); one that is no
# number starts again at 1: Redis cannot add to it, and every request of theirs failed
# until it expired (if it ever did). The caller sets its expiry (SET leaves it none).
ONE_MORE_WAITING = """
local function one_more_waiting(key)
  local held = redis.pcall('INCR', key)
  if type(held) ~= 'number' then
    redis.call('SET', key, 1)
    held = 1
  end
  return held
end
"""

# A cancel epoch started again, for one Redis cannot add to or read (a damaged one; see
# ``CANCEL_SCRIPT``): Redis's time in microseconds, a value no entry still queued can carry
# (counting from 0, it could: an entry that carries 1 would pass as not cancelled).
FRESH_EPOCH = """
local function fresh_epoch(key)
  local t = redis.call('TIME')
  local epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', key, epoch)
  return epoch
end
"""

# The stats-hash counter of each refusal, by the reason ``SUBMIT_SCRIPT`` answers: the
# stream was full, or the sender already had their share waiting. What `persona queue
# stats`, the page and /metrics (``reason`` label: the part after the colon) read.
REFUSED_COUNTERS = {"busy": "refused:full", "user_busy": "refused:user_share"}
# How long a refused request's mark outlives its deadline, in seconds: a re-sent submission
# comes before that (a caller's own retries end at its deadline), and a flood of refusals,
# each leaving a mark, is not kept long.
REFUSED_PAST_DEADLINE_S = 60
REFUSED_LUA = (
    "\nlocal REFUSED = {" + ", ".join(f"{why} = '{counter}'" for why, counter in REFUSED_COUNTERS.items()) + "}\n"
    f"local REFUSED_PAST_DEADLINE_S = {REFUSED_PAST_DEADLINE_S}\n"
)

# Refuse new work once a stream is full, or once its sender already has their share
# waiting (so a flood from one user cannot starve everyone else), atomically with
# adding it; a refusal is counted by its reason in the stats hash (KEYS[7], a pcall: see
# above), and a request added counts nothing here, so adding one costs what it did.
# A request is counted refused once however often it is sent (redis-py re-sends a call
# whose answer a dropped connection lost; ``QueueBusy.refused`` are to be sent again):
# its first refusal sets its refused mark (KEYS[8]), until a minute past its deadline
# (its allowance ARGV[6]), and a refusal that finds the mark is not counted.
# KEYS[2] is the sender's pending counter, or NO_KEY for an anonymous caller.
# The entry carries the cancel epoch as it was added ('x' if the request was already
# withdrawn), so a worker can skip reading cancel flags when nothing was cancelled since.
# A caller that waits for the reply in the same round trip (``ask``) sets ARGV[5]: a
# refusal is then also pushed to the reply list (KEYS[5]), so that wait ends at once.
# The entry also carries when its deadline falls by Redis's clock ('d': now plus the
# request's allowance ARGV[6]), so machines whose clocks disagree agree on it.
# A request is added once: its mark (KEYS[6], the same key that later says it was
# answered) is set to '' as it is added, for ARGV[7] seconds, and its digest (ARGV[8], see
# ``payload_digest``; made here where it is '' or left out) as long beside it (KEYS[9]),
# and a request whose mark exists is not added again:
# the same request ('duplicate': redis-py re-sends a call whose reply a dropped connection
# lost) counts as queued, and a different one under that id is refused ('in_use': it would
# have read the other's reply as its own; nothing is pushed to the reply list, which is
# the other's). A mark without a digest (an older client's) reads as the same request. A waiting caller's reply list is emptied as its request is
# added: a refusal an earlier attempt left there is not taken for the reply.
# A cancel epoch of another type (a hash or a list where a string belongs) failed every
# submission until a withdrawal overwrote it: it starts again here (``FRESH_EPOCH``).
SUBMIT_SCRIPT = REDIS_NOW + NO_KEY_LUA + ONE_MORE_WAITING + FRESH_EPOCH + REFUSED_LUA + DIGEST_LUA + """
local mine = ARGV[8]
if not mine or mine == '' then mine = digest(ARGV[2]) end
if redis.call('EXISTS', KEYS[6]) == 1 then
  local held = redis.pcall('GET', KEYS[9])
  if type(held) == 'string' and held ~= mine then return 'in_use' end
  return 'duplicate'
end
local function refuse(why)
  -- nil (false) where the mark was there; an error (a write refused) is counted as ever
  local first = redis.pcall('SET', KEYS[8], why, 'NX', 'EX', math.max(0, math.ceil(tonumber(ARGV[6]))) + REFUSED_PAST_DEADLINE_S)
  if first then redis.pcall('HINCRBY', KEYS[7], REFUSED[why], 1) end
  if ARGV[5] == '1' then
    redis.call('RPUSH', KEYS[5], why)
    redis.call('EXPIRE', KEYS[5], 60)
  end
  return why
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return refuse('busy') end
if KEYS[2] ~= NO_KEY then
  local held = one_more_waiting(KEYS[2])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
  if held > tonumber(ARGV[3]) then
    redis.call('DECR', KEYS[2])
    return refuse('user_busy')
  end
end
local epoch = redis.pcall('GET', KEYS[3])
if type(epoch) == 'table' then epoch = fresh_epoch(KEYS[3]) end
epoch = epoch or '0'
if redis.call('EXISTS', KEYS[4]) == 1 then epoch = 'x' end
local entry = redis.call('XADD', KEYS[1], '*', 'r', ARGV[2], 'e', epoch, 'd', string.format('%.3f', now + tonumber(ARGV[6])))
redis.call('SET', KEYS[6], '', 'EX', tonumber(ARGV[7]))
redis.call('SET', KEYS[9], mine, 'EX', tonumber(ARGV[7]))
if ARGV[5] == '1' then redis.call('DEL', KEYS[5]) end
return entry
"""

# Withdraw a request: read its mark (see ``queue._withdrew``), set its cancel flag
# (KEYS[2], for ARGV[1] seconds) and change the cancel epoch (KEYS[3]) that workers
# compare with each entry's, so they read the flags again. An epoch Redis cannot add to
# (a damaged one: `SET persona:cancel-epoch abc`) failed every cancellation, and every
# entry then carried it unchanged, so workers never read a flag and generated withdrawn
# requests all the same: such an epoch starts again (``FRESH_EPOCH``). KEYS[1] is the
# request's mark.
CANCEL_SCRIPT = FRESH_EPOCH + """
local mark = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[2], 1, 'EX', tonumber(ARGV[1]))
if type(redis.pcall('INCR', KEYS[3])) ~= 'number' then fresh_epoch(KEYS[3]) end
return mark
"""

# How long a request's answered mark lasts once it is answered, in seconds: until
# ``lasts`` (Redis's time: its deadline and a minute, see ``pending_entries.answered_until``;
# '' where that is unknown: the longest a request may wait), and for the reply's own TTL
# at least. Needs ``now`` (``REDIS_NOW``).
ANSWERED_TTL = f"""
local function answered_ttl(lasts, reply_ttl)
  local until_ = tonumber(lasts)
  if not until_ then return {keys.ANSWERED_TTL_S} end
  -- Never past the longest a mark needs: a damaged or foreign entry's huge deadline made
  -- SET ... EX refuse, and with it the whole batch's delivery, again and again.
  return math.min({keys.ANSWERED_TTL_S}, math.max(reply_ttl, math.ceil(until_ - now)))
end
"""

# Deliver each reply unless its request was answered already (its mark names the
# worker that answered it; '' is a request queued and not yet answered); always settle its entry;
# count completions. A request's digest (see ``payload_digest``) is kept as long as its mark.
# One call delivers and settles a whole batch. Per-request keys are
# built here from their prefixes, and replies come in runs that share a counter, and
# entries in runs that share a stream, so a reply costs four arguments in all.
# ARGV: reply TTL, until when the answered marks last (see ``ANSWERED_TTL``), group,
# worker, then the prefixes of the answered flags, reply lists, senders' pending counters
# and digests; then a count of reply runs, each a counter
# name, a count of replies and three values per reply (request id, reply, sender or '');
# then a count of entry runs, each a stream, a count of entries and their ids.
# KEYS[1] is the stats hash.
DELIVER_SCRIPT = REDIS_NOW + ANSWERED_TTL + """
local reply_ttl = tonumber(ARGV[1])
local marked_ttl = answered_ttl(ARGV[2], reply_ttl)
local group, worker = ARGV[3], ARGV[4]
local answered, replies, pending, digests = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local new, a = 0, 10
for _ = 1, tonumber(ARGV[9]) do
  local counter, n, counted = ARGV[a], tonumber(ARGV[a + 1]), 0
  a = a + 2
  for _ = 1, n do
    local id, user = ARGV[a], ARGV[a + 2]
    local mark = redis.call('GET', answered .. id)
    if not mark or mark == '' then
      redis.call('SET', answered .. id, worker, 'EX', marked_ttl)
      redis.call('EXPIRE', digests .. id, marked_ttl)
      counted = counted + 1
      redis.call('LPUSH', replies .. id, ARGV[a + 1])
      redis.call('EXPIRE', replies .. id, reply_ttl)
      if user ~= '' and (tonumber(redis.call('GET', pending .. user)) or 0) > 0 then
        redis.call('DECR', pending .. user)
      end
    end
    a = a + 3
  end
  -- Counters and acknowledgements once per run, not once per reply; a count that fails
  -- (a damaged counter) is lost, never the acknowledgements (see above).
  if counted > 0 then redis.pcall('HINCRBY', KEYS[1], counter, counted) end
  new = new + counted
end
local streams = tonumber(ARGV[a])
a = a + 1
for _ = 1, streams do
  local stream, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  for s = a, a + n - 1, 1000 do
    local last = math.min(s + 999, a + n - 1)
    redis.call('XACK', stream, group, unpack(ARGV, s, last))
    redis.call('XDEL', stream, unpack(ARGV, s, last))
  end
  a = a + n
end
return new
"""

# Record a tally of replies (see ``telemetry.Tally``): reply-log rows, then counter and
# histogram increments. KEYS[1] is the reply log, then the hashes the increments name.
# ARGV: the reply log's cap, a count of rows and the rows (one value each, kept as the
# entry's field r), then a count of HINCRBYs and three values each (key index after the
# reply log, field, amount), then the same for HINCRBYFLOATs. pcall throughout: counting
# never fails a worker's turn.
RECORD_SCRIPT = """
local t = 2
for r = 1, tonumber(ARGV[t]) do
  redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'r', ARGV[t + r])
end
t = t + 1 + tonumber(ARGV[t])
for _, command in ipairs({'HINCRBY', 'HINCRBYFLOAT'}) do
  for c = 1, tonumber(ARGV[t]) do
    local v = t + (c - 1) * 3
    redis.pcall(command, KEYS[1 + tonumber(ARGV[v + 1])], ARGV[v + 2], ARGV[v + 3])
  end
  t = t + 1 + tonumber(ARGV[t]) * 3
end
return 1
"""


# Set one entry aside: add the letter to the dead stream (KEYS[2]), acknowledge and delete
# the entry (ARGV[2]) in its stream (KEYS[3]), count it as dead-lettered and answer its
# caller as DELIVER_SCRIPT would (its answered mark KEYS[4], reply list KEYS[5], sender's
# pending counter KEYS[6], NO_KEY for an anonymous sender, and digest KEYS[7]; KEYS[4..7]
# NO_KEY for an entry with no readable request: nobody to answer, counted as unanswerable),
# all in one step:
# a crash between steps used to leave the letter uncounted (and `persona queue stats` then misreports how many the cap
# trimmed). Only an entry still pending in the group (ARGV[1]) is set aside, so a call
# redis-py re-sends after a dropped connection, or a second worker that claimed the
# same entry, adds no second letter and counts nothing twice. An entry whose id another
# request holds (a second request under one id, written straight onto the stream) is
# answered only where that cannot take the other's place: not while the other waits (its
# mark '', a digest not this payload's), nor while the other's reply is unread (its mark
# names a worker, its reply list still there); unanswered, it counts as unanswerable.
# KEYS[1] is the stats hash.
# ARGV: group, entry id, the dead stream's cap, then the letter's payload, reason,
# deliveries, worker and time, then the reply, reply TTL, until when its answered mark
# lasts (see ``ANSWERED_TTL``), its counter and the payload's digest (``payload_digest``).
# Returns the letter's id if it set the entry aside, 0 if it was not pending.
DEAD_LETTER_SCRIPT = REDIS_NOW + NO_KEY_LUA + ANSWERED_TTL + """
if #redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
local letter = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'r', ARGV[4], 'stream', KEYS[3],
  'reason', ARGV[5], 'deliveries', ARGV[6], 'worker', ARGV[7], 'at', ARGV[8])
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[3], ARGV[2])
redis.pcall('HINCRBY', KEYS[1], 'dead_lettered', 1)
if KEYS[4] == NO_KEY then
  redis.pcall('HINCRBY', KEYS[1], 'failed:unanswerable', 1)
  return letter
end
local mark = redis.call('GET', KEYS[4])
local held = mark == '' and redis.pcall('GET', KEYS[7])
if mark and mark ~= '' then
  if redis.call('EXISTS', KEYS[5]) == 1 then
    redis.pcall('HINCRBY', KEYS[1], 'failed:unanswerable', 1)
  else
    redis.call('LPUSH', KEYS[5], ARGV[9])
    redis.call('EXPIRE', KEYS[5], tonumber(ARGV[10]))
    redis.pcall('HINCRBY', KEYS[1], ARGV[12], 1)
  end
  return letter
end
if type(held) == 'string' and held ~= ARGV[13] then
  redis.pcall('HINCRBY', KEYS[1], 'failed:unanswerable', 1)
  return letter
end
local ttl = answered_ttl(ARGV[11], tonumber(ARGV[10]))
redis.call('SET', KEYS[4], ARGV[7], 'EX', ttl)
if mark then redis.call('EXPIRE', KEYS[7], ttl) else redis.call('SET', KEYS[7], ARGV[13], 'EX', ttl) end
redis.call('LPUSH', KEYS[5], ARGV[9])
redis.call('EXPIRE', KEYS[5], tonumber(ARGV[10]))
if KEYS[6] ~= NO_KEY and (tonumber(redis.call('GET', KEYS[6])) or 0) > 0 then
  redis.call('DECR', KEYS[6])
end
redis.pcall('HINCRBY', KEYS[1], ARGV[12], 1)
return letter
"""


# Take the ids of entries the submit script did not add (no cancel epoch: written straight
# onto the stream, or a retried letter), which nothing checked as they came: an id nobody
# holds is marked '' (queued; see ``SUBMIT_SCRIPT``) with the entry's digest beside it, so a
# second entry under it, or a submission, finds it held. Returns, for each entry, 'ok' (its
# id is its own: newly marked, or marked with its own digest, or with none), 'waiting'
# (another request under that id is queued), 'answered' (another request under that id was
# answered) or 'duplicate' (this same request, byte for byte, was answered already: a
# direct writer sent its entry again, its first XADD's answer lost). ARGV: the
# prefixes of the answered marks and digests, the reply TTL, then three values per entry:
# its request id, its digest (``payload_digest``) and until when its mark lasts (see
# ``ANSWERED_TTL``). A mark or digest of another type (a damaged key) reads as none there.
OWN_IDS_SCRIPT = REDIS_NOW + ANSWERED_TTL + """
local answered, digests, reply_ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local verdicts = {}
for a = 4, #ARGV, 3 do
  local id, mine = ARGV[a], ARGV[a + 1]
  local mark, verdict = redis.pcall('GET', answered .. id), 'ok'
  if not mark then
    local ttl = answered_ttl(ARGV[a + 2], reply_ttl)
    redis.call('SET', answered .. id, '', 'EX', ttl)
    redis.call('SET', digests .. id, mine, 'EX', ttl)
  elseif mark == '' then
    local held = redis.pcall('GET', digests .. id)
    if type(held) == 'string' and held ~= mine then verdict = 'waiting' end
  elseif type(mark) == 'string' then
    local held = redis.pcall('GET', digests .. id)
    verdict = held == mine and 'duplicate' or 'answered'
  end
  table.insert(verdicts, verdict)
end
return verdicts
"""


# Put an unfinished entry back at the end of its stream (a leaving worker's hand-back).
REQUEUE_SCRIPT = """
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if #entry == 0 then return false end
return redis.call('XADD', KEYS[1], '*', unpack(entry[1][2]))
"""


# A worker still has these entries in hand (rows it is decoding): their idle time starts
# again, so no worker takes them as stalled. Only entries this consumer still holds
# (one taken over meanwhile stays with its new holder); JUSTID: no delivery is counted.
# ARGV: group, consumer, entry ids.
KEEP_SCRIPT = """
local kept = 0
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"""


# Forget the consumers of workers that are gone (killed, out of memory, a lost machine:
# none left the group as a stopping worker does, and each start is a new id, so the group
# grew by one consumer per crash, for good): those that hold no entry, have done nothing
# for ARGV[2] ms, and whose worker has no live heartbeat (never ARGV[3], the worker that
# looks, whose own heartbeat may have lapsed while it was paused). Judged and deleted in
# one step: deleting a consumer drops the entries it holds, so one that claims meanwhile
# is kept.
# (A live worker whose heartbeat lapsed for a moment and is forgotten loses nothing: its
# next read makes it a consumer again.) KEYS: the stream, the heartbeat index. ARGV:
# group, idle ms, the consumer that looks. Returns the names forgotten.
FORGET_SCRIPT = REDIS_NOW + """
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers.err then return {} end
local forgotten = {}
for _, c in ipairs(consumers) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) and info['name'] ~= ARGV[3]
      and (tonumber(redis.call('ZSCORE', KEYS[2], info['name'])) or 0) < now then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(forgotten, info['name'])
  end
end
return forgotten
"""


# Who could have answered a request that a caller waited for in vain: Redis's time, how
# many workers are live, then the info of each worker still starting (loading its models;
# see ``persona.heartbeat``). KEYS: the heartbeat index, the starting index. ARGV: the
# starting keys' prefix. Read-only, and only when a wait ends without a reply.
WORKERS_SCRIPT = REDIS_NOW + """
local found = {tostring(now), redis.call('ZCOUNT', KEYS[1], now, '+inf')}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')) do
  local info = redis.call('GET', ARGV[1] .. id)
  if info then table.insert(found, info) end
end
return found
"""


# An entry's request id (nil where it holds none): read off the front of its JSON, where
# ``GenerationRequest.to_json`` writes it, else decoded. Decoding every entry of a full
# stream of long messages took 60 ms of Redis's time per refusal.
REQUEST_ID = """
local function request_id(json)
  local id = string.match(json, '^{"id":"([%w_.:-]*)"')
  if id then return id end
  local ok, request = pcall(cjson.decode, json)
  if ok and type(request) == 'table' and type(request['id']) == 'string' then return request['id'] end
  return nil
end
"""

# What fills a stream that refused a request ('busy'): its length, the entries in flight
# (taken by a worker, not settled), the live workers, and, only when none is live, how
# many of the untaken entries are past their deadline and how many were withdrawn (-1
# each when a worker is live: it discards those as it reaches them, and a scan on every
# refusal would slow the Redis a flood of callers is already busy with). Judged as
# ``monitoring._unwanted`` judges them, rule for rule: withdrawn by the request's cancel
# flag (read only where the entry's epoch differs from the current one: none or '' reads
# as '0', one of another type as one no entry carries), whatever its deadline; else past
# its deadline by the entry's 'd', else its request's deadline (one that is no finite
# number, 0 where that is none), else, where the entry has neither (a direct writer's
# request with an id, its deadline 0 or left out), ARGV[4] seconds (the queue's default
# deadline) after it arrived, as a worker times it ('' or left out: not judged), over at
# most ARGV[3] untaken entries; the last value is how many it scanned.
# KEYS: the stream, the cancel epoch, the heartbeat index. ARGV: group, cancel flag
# prefix, scan limit, default deadline in seconds. Read-only, and only after a refusal.
FULL_SCRIPT = REDIS_NOW + REQUEST_ID + """
local length = redis.call('XLEN', KEYS[1])
local live = redis.call('ZCOUNT', KEYS[3], now, '+inf')
local in_flight, last = 0, '0-0'
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if not groups.err then
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[1] then in_flight, last = info['pending'], info['last-delivered-id'] end
  end
end
if live > 0 then return {length, in_flight, live, -1, -1, 0} end
local epoch = redis.pcall('GET', KEYS[2])
if type(epoch) == 'table' then epoch = {} elseif not epoch or epoch == '' then epoch = '0' end
local by_default = tonumber(ARGV[4])
local function finite(due)
  if not due or due ~= due or due == math.huge or due == -math.huge then return 0 end
  return due
end
local function due_of(entry_id, f)
  if f['d'] and f['d'] ~= '' then return finite(tonumber(f['d'])) end
  local ok, request = pcall(cjson.decode, f['r'] or '')
  if not ok or type(request) ~= 'table' then return 0 end
  local deadline = request['deadline']
  local due = tonumber(deadline == nil and 0 or deadline)
  if due ~= 0 or not by_default or type(request['id']) ~= 'string' or request['id'] == '' then return finite(due) end
  return tonumber(string.match(entry_id, '^%d+')) / 1000 + by_default
end
local untaken = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', tonumber(ARGV[3]))
local expired, withdrawn = 0, 0
for _, entry in ipairs(untaken) do
  local f = {}
  for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
  local id = f['e'] ~= epoch and request_id(f['r'] or '')
  local due = due_of(entry[1], f)
  if id and id ~= '' and redis.call('EXISTS', ARGV[2] .. id) == 1 then
    withdrawn = withdrawn + 1
  elseif due ~= 0 and now > due then
    expired = expired + 1
  end
end
return {length, in_flight, live, expired, withdrawn, #untaken}
"""


# Whether a worker has taken a request that a caller waited for in vain, and holds it
# unfinished (its entry pending in the group): {worker, ms since it was delivered,
# deliveries, 1 if that worker's heartbeat is live else 0}, or nil where none holds it
# (still waiting untaken). Looks through at most ARGV[3] pending entries. KEYS: the
# stream, the heartbeat index. ARGV: group, request id, limit. Read-only.
HOLDER_SCRIPT = REDIS_NOW + REQUEST_ID + """
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[3]))
if pending.err then return nil end
for _, item in ipairs(pending) do
  local rows = redis.call('XRANGE', KEYS[1], item[1], item[1])
  local fields = rows[1] and rows[1][2] or {}
  for i = 1, #fields, 2 do
    if fields[i] == 'r' and request_id(fields[i + 1]) == ARGV[2] then
      local lapses = tonumber(redis.call('ZSCORE', KEYS[2], item[2])) or 0
      return {item[2], item[3], item[4], lapses >= now and 1 or 0}
    end
  end
end
return nil
"""
