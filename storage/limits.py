"""Limits kept in Redis, so they hold across restarts and across processes.

A per-user token bucket for `rate_limit_per_minute`, and a once-an-hour marker for telling a
person that the bot may not answer them somewhere. Knows nothing of platforms.
"""

from __future__ import annotations

from redis.asyncio import Redis

from storage import keys
from storage.once import Once

DENIAL_REPEAT_S = 3600
REDELIVERY_WINDOW_S = 600  # platforms deliver a message again within minutes

# One script, so that refill, take and save are one atomic step whichever process runs it.
# Time is the server's, so every process's clock agrees. A message delivered again (a
# platform's retry, or two events for one message) gets what its first delivery got.
_TAKE = """
local taken = redis.call('GET', KEYS[2])
if taken then return {taken, 0} end
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
redis.call('SET', KEYS[2], tostring(wait), 'EX', ARGV[3])
return {tostring(wait), wait == 0 and 1 or 0}
"""

# A token put back in bucket KEYS[1] (capacity ARGV[1]); a full one, expired, has none
# to put back.
_GIVE_BACK = """
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
if tokens then
  redis.call('HSET', KEYS[1], 'tokens', tostring(math.min(tonumber(ARGV[1]), tokens + 1)))
end
"""


class Limits:
    def __init__(self, *, redis: Redis) -> None:
        self._take = redis.register_script(_TAKE)
        self._give_back = redis.register_script(_GIVE_BACK)
        self._once = Once(redis)

    async def take(self, user: str, message: str, per_minute: float) -> tuple[float, bool]:
        """Take one message from `user`'s bucket (a minute's worth at most, refilled
        steadily, and room for one message at least, for a rate under one a minute): 0 if
        it was there, else the seconds until one will be (none is taken); and whether
        this call took it. Once per `message` (`platform:message id`): its re-deliveries
        get what it got, and take nothing."""
        wait, took = await self._take(
            keys=[keys.rate(user), keys.rate_taken(message)],
            args=[per_minute / 60, max(per_minute, 1), REDELIVERY_WINDOW_S],
        )
        return float(wait), bool(took)

    async def give_back(self, user: str, per_minute: float) -> None:
        """Put back a token `take` took from `user`'s bucket: its message was refused for
        another reason (its sender has too many answers pending), and costs nothing."""
        await self._give_back(keys=[keys.rate(user)], args=[max(per_minute, 1)])

    async def first_denial(self, whom: str) -> bool:
        """True if `whom` (a person somewhere) was not told within the hour that they are
        denied."""
        return await self._once.first(keys.denied(whom), DENIAL_REPEAT_S)
