"""Conversation history and message de-duplication on Redis.

Owns the layout of values under `storage.keys`; it must not start servers or open
connections (it is handed a client) and knows nothing about platforms or models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, get_args

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from bot.prompt import TRIM_TO
from bot.types import ChatMessage, Role
from storage import keys
from storage.connection import take_a_write
from storage.once import Once

logger = logging.getLogger(__name__)

_ROLES = frozenset(get_args(Role))
REGENERATION_TAKING_S = 60
"""How long a press's mark holds before its regeneration is recorded: its one Redis write."""
HEARD_KEPT = 100  # private channels `hear_from` keeps: a catch-up reads each one's news
CUT_KEPT_S = 366 * 86400
"""How long, at least, a reset's or forget's cut outlives the conversation's last message:
the thread is read back once its history expires, and what came before the cut must stay
out."""


# KEYS[1]: a conversation; ARGV: its cap, and what to keep once over it. A script, so the
# length check and the trim happen inside the caller's MULTI.
_CAP_SCRIPT = """
if redis.call('LLEN', KEYS[1]) > tonumber(ARGV[1]) then
    redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
end
"""


# The dead letters (see `keys.DEAD_JOBS`) that name the conversation ARGV[1].
_FORGET_DEAD_JOBS = """
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'conversation' and fields[i + 1] == ARGV[1] then
      redis.call('XDEL', KEYS[1], entry[1])
    end
  end
end
"""


# KEYS: a conversation's keys, then another's, in the same order; each of the first that
# is there renamed to its match, where none of the second is.
_ADOPT = """
local half = #KEYS / 2
for i = half + 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end
end
for i = 1, half do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('RENAME', KEYS[i], KEYS[i + half]) end
end
return 1
"""


class ConversationStore:
    """Each conversation is a Redis list of JSON messages, newest last, capped and expiring.

    The cap is hysteretic: a list over `max_messages` is cut to `TRIM_TO` of it, so its
    front (and so the front of the prompt, whose KV cache is kept) stays put for a third
    of the cap, instead of shifting at each new message. The prompt's token budget trims
    the same way, by `drop_oldest`: the stored history is what the model sees."""

    def __init__(self, *, redis: Redis, max_messages: int, ttl_seconds: int) -> None:
        if max_messages < 1 or ttl_seconds < 1:
            raise ValueError("max_messages and ttl_seconds must be positive")
        self._redis = redis
        self._once = Once(redis)
        self._adopt = redis.register_script(_ADOPT)
        self._max_messages = max_messages
        self._kept_over_cap = max(int(max_messages * TRIM_TO), 1)
        self.ttl_seconds = ttl_seconds
        self._cut_kept_s = max(ttl_seconds, CUT_KEPT_S)

    async def ping(self) -> None:
        """Raise unless Redis takes a write now (readiness)."""
        await take_a_write(self._redis)

    async def append(self, conversation_id: str, *messages: ChatMessage) -> None:
        """Add messages, cut the list over `max_messages` to its newest `TRIM_TO` of it,
        and restart the TTL."""
        if not messages:
            return  # RPUSH needs at least one value
        # One MULTI, so no reader ever sees the list untrimmed or without a TTL.
        async with self._redis.pipeline(transaction=True) as pipe:
            self.queue_append(pipe, conversation_id, *messages)
            await pipe.execute()

    def queue_append(self, pipe: Pipeline, conversation_id: str, *messages: ChatMessage) -> None:
        """Queue `append`'s commands on a MULTI that the caller executes (with its own)."""
        if not messages:
            return
        key = keys.conversation(conversation_id)
        pipe.rpush(key, *(json.dumps(m, ensure_ascii=False) for m in messages))
        pipe.eval(_CAP_SCRIPT, 1, key, self._max_messages, self._kept_over_cap)
        pipe.expire(key, self.ttl_seconds)
        pipe.expire(keys.cut(conversation_id), self._cut_kept_s)  # if reset or forgotten once

    async def ends_with(self, pipe: Pipeline, conversation_id: str, message: ChatMessage) -> bool:
        """Whether `message` is the conversation's newest."""
        newest = await pipe.lindex(keys.conversation(conversation_id), -1)
        return newest is not None and _decode(newest) == message

    async def load(self, conversation_id: str) -> list[ChatMessage]:
        """The stored messages, newest last; malformed entries are skipped with a warning."""
        entries = await self._redis.lrange(keys.conversation(conversation_id), 0, -1)
        messages: list[ChatMessage] = []
        for index, entry in enumerate(entries):
            message = _decode(entry)
            if message is None:
                # Index only: the entry may hold user text.
                logger.warning(
                    "skipping malformed entry %d in conversation %s", index, conversation_id
                )
            else:
                messages.append(message)
        return messages

    async def exists(self, conversation_id: str) -> bool:
        """Whether the bot knows the conversation: it has history, was reset, or a turn of
        it was taken (its starter is named), which is stored once it begins."""
        return bool(
            await self._redis.exists(
                keys.conversation(conversation_id),
                keys.cleared(conversation_id),
                keys.facts(conversation_id),
            )
        )

    def queue_clear(
        self, pipe: Pipeline, conversation_id: str, *, at: float, message: str = ""
    ) -> None:
        """Queue, on the caller's MULTI, the emptying of a conversation's history; the bot
        still knows the conversation (and who started it), and the next turn fills its
        system prompt in afresh. Which `message` (its platform id) cleared it, when
        (`at`): `cut`."""
        pipe.delete(keys.conversation(conversation_id))
        pipe.set(keys.cleared(conversation_id), "1", ex=self.ttl_seconds)
        pipe.hdel(keys.facts(conversation_id), "template", "system", "several")
        self._queue_cut(pipe, conversation_id, at=at, message=message)

    def queue_forget(
        self, pipe: Pipeline, conversation_id: str, *, at: float, message: str = ""
    ) -> None:
        """Queue, on the caller's MULTI, the deletion of everything stored for a
        conversation, its dead-lettered jobs too (`TurnJournal.forget` drops its turns),
        and which `message` (its platform id) forgot it, when (`at`): `cut`."""
        pipe.delete(
            keys.conversation(conversation_id),
            keys.cleared(conversation_id),
            keys.facts(conversation_id),
            keys.answer_place(conversation_id),
        )
        pipe.eval(_FORGET_DEAD_JOBS, 1, keys.DEAD_JOBS, conversation_id)
        self._queue_cut(pipe, conversation_id, at=at, message=message)

    def _queue_cut(self, pipe: Pipeline, conversation_id: str, *, at: float, message: str) -> None:
        pipe.set(keys.cut(conversation_id), f"{at!r} {message}", ex=self._cut_kept_s)

    async def cut(self, conversation_id: str) -> tuple[float, str] | None:
        """When the conversation was last reset or forgotten (epoch seconds), and by which
        message (its platform id; "" if none), if within `CUT_KEPT_S` of its last message:
        an adapter reading its thread back leaves out what came before."""
        found = await self._redis.get(keys.cut(conversation_id))
        if found is None:
            return None
        at, _, message = found.partition(" ")
        return float(at), message

    async def adopt(self, old: str, new: str) -> None:
        """Give conversation `old`'s history, and what is kept with it, to `new`, where
        `new` has none: a conversation whose key changed (the console's, once each login
        had its own)."""
        kept = (keys.conversation, keys.cleared, keys.facts, keys.cut)
        await self._adopt(keys=[*(key(old) for key in kept), *(key(new) for key in kept)])

    async def mark_joining(self, conversation_id: str, *, for_ms: int) -> None:
        """Say, for at most `for_ms`, that a process is taking the bot into the
        conversation (`being_joined`); `unmark_joining` ends it sooner."""
        await self._redis.set(keys.joining(conversation_id), "1", px=for_ms)

    async def unmark_joining(self, conversation_id: str) -> None:
        await self._redis.delete(keys.joining(conversation_id))

    async def being_joined(self, conversation_id: str) -> bool:
        return bool(await self._redis.exists(keys.joining(conversation_id)))

    async def starter(self, conversation_id: str) -> str | None:
        """Who started the conversation with the bot (see `queue_starter`)."""
        return await self._redis.hget(keys.facts(conversation_id), "starter")

    def queue_starter(self, pipe: Pipeline, conversation_id: str, user: str) -> None:
        """Queue, on the caller's MULTI, `user` as the conversation's starter if it has none."""
        key = keys.facts(conversation_id)
        pipe.hsetnx(key, "starter", user)
        pipe.expire(key, self.ttl_seconds)

    async def had_several_people(self, conversation_id: str, *, now: bool) -> bool:
        """Whether several people have talked in the conversation: so `now`, or kept from
        an earlier turn (until a reset), since a trim may drop all of one person's messages
        and the prompt, naming no one then, would start differently from the last."""
        key = keys.facts(conversation_id)
        if not now:
            return await self._redis.hget(key, "several") is not None
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "several", "1")
            pipe.expire(key, self.ttl_seconds)
            await pipe.execute()
        return True

    async def system_prompt(
        self, conversation_id: str, template: str, fill: Callable[[], str], *, keep: bool = True
    ) -> str:
        """The conversation's system prompt: as filled in earlier from this same `template`,
        or `fill()`ed now (and, if `keep`, kept) when the template is new to it. Kept byte
        for byte, so each turn's prompt starts as the last one did."""
        key = keys.facts(conversation_id)
        stored_template, stored = await self._redis.hmget(key, "template", "system")
        if stored_template == template and stored is not None:
            return stored
        text = fill()
        if not keep:
            return text
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"template": template, "system": text})
            pipe.expire(key, self.ttl_seconds)
            await pipe.execute()
        return text

    async def kept_system_prompt(self, conversation_id: str) -> tuple[str | None, str | None]:
        """The template and the system prompt kept for the conversation, if it has one."""
        template, text = await self._redis.hmget(keys.facts(conversation_id), "template", "system")
        return template, text

    async def seen(self, platform: str, message_ids: Sequence[str]) -> list[bool]:
        """Whether each platform message id was offered before (within `first_seen`'s
        TTL), in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for message_id in message_ids:
                pipe.exists(keys.seen(platform, message_id))
            return [bool(found) for found in await pipe.execute()]

    async def hear_from(self, platform: str, bot: str, channel: str) -> None:
        """Note that `bot` (its user id) was spoken to in `channel` (a DM) now; the
        `HEARD_KEPT` latest are kept, as long as a conversation is."""
        key = keys.heard(platform, bot)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {channel: time.time()})
            pipe.zremrangebyrank(key, 0, -HEARD_KEPT - 1)
            pipe.expire(key, self.ttl_seconds)
            await pipe.execute()

    async def heard(self, platform: str, bot: str) -> list[str]:
        """The channels `hear_from` noted for `bot`, the latest first."""
        return await self._redis.zrevrange(keys.heard(platform, bot), 0, -1)

    async def first_seen(self, platform: str, message_id: str, *, ttl_seconds: int = 86400) -> bool:
        """True only the first time a platform message id is offered (within the TTL)."""
        return await self._once.first(keys.seen(platform, message_id), ttl_seconds)

    async def drop_oldest(self, conversation_id: str, count: int) -> None:
        """Remove the oldest `count` messages: those the prompt left out to fit its budget.

        Dropped from the history, rather than kept beside it as a cut point to skip: the
        cut then needs no key of its own kept in step with the cap's trims (which move
        every index), survives restarts and other processes as the history does, and
        frees the memory. The cost: a budget raised later (another persona) cannot bring
        the messages back, and the user was told they were left out."""
        await self._once.trim(keys.conversation(conversation_id), count, -1)

    async def set_answer_place(
        self, conversation_id: str, place: dict[str, Any], messages: Sequence[str] = ()
    ) -> None:
        """Remember where the conversation's newest answer is shown (a platform's JSON),
        and that each of its `messages` (`platform:id`) is the conversation's; kept as
        long as the history."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.answer_place(conversation_id), json.dumps(place), ex=self.ttl_seconds)
            for message in messages:
                pipe.set(keys.answer_message(message), conversation_id, ex=self.ttl_seconds)
            await pipe.execute()

    async def answered_in(self, message: str) -> str | None:
        """The conversation whose answer `message` (`platform:id`) shows, if remembered."""
        return await self._redis.get(keys.answer_message(message))

    async def first_regeneration(self, conversation_id: str, place: dict[str, Any]) -> bool:
        """True for the first regeneration asked of the answer shown at `place`, False
        for any after it (a double click, two people at once, in any process): for
        REGENERATION_TAKING_S, unless its turn is recorded meanwhile (`keep_regeneration`),
        so a process that dies in between leaves the answer regenerable, not refused."""
        key = _regenerated(conversation_id, place)
        return await self._once.first(key, REGENERATION_TAKING_S)

    async def keep_regeneration(self, conversation_id: str, place: dict[str, Any]) -> None:
        """The regeneration's turn is recorded: it stays the answer's one, as long as the
        history does."""
        await self._redis.expire(_regenerated(conversation_id, place), self.ttl_seconds)

    async def forget_regeneration(self, conversation_id: str, place: dict[str, Any]) -> None:
        """The regeneration asked of the answer at `place` was not taken: it may be again."""
        await self._redis.delete(_regenerated(conversation_id, place))

    async def answer_place(self, conversation_id: str) -> dict[str, Any] | None:
        """Where the conversation's newest answer is shown, if known and readable."""
        try:
            place = json.loads(await self._redis.get(keys.answer_place(conversation_id)) or "null")
        except ValueError:
            place = None
        return place if isinstance(place, dict) else None


def _decode(entry: str | bytes) -> ChatMessage | None:
    try:
        value = json.loads(entry)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both land here
        return None
    if not isinstance(value, dict):
        return None
    role, content, name = value.get("role"), value.get("content"), value.get("name")
    if role not in _ROLES or not isinstance(content, str):
        return None
    message = ChatMessage(role=role, content=content)
    if isinstance(name, str) and name:
        message["name"] = name
    return message


def _regenerated(conversation_id: str, place: dict[str, Any]) -> str:
    """The key that marks the answer shown at `place` as regenerated."""
    shown = json.dumps(place, sort_keys=True).encode()
    return keys.regenerated(conversation_id, hashlib.blake2b(shown, digest_size=16).hexdigest())
