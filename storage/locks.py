"""One turn at a time per conversation, across every process on one Redis.

Each prompt holds the previous answer, so a conversation's turns must run one after the
other, even when two of its messages reach two gateways behind one app. In a process, an
asyncio.Lock per conversation keeps its turns in arrival order; across processes, a lease
in Redis: a key holding its holder's token, with a TTL that the holder renews while it
holds it, deleted only by its holder. A process that dies holding one leaves it for its
term at most (`threadbot run`: twice TURN_LEASE_S, after which its turns are taken over).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from weakref import WeakValueDictionary

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

from bot.waiting import set_within
from storage import keys

logger = logging.getLogger(__name__)

LEASE_S = 30
POLL_S = 0.1  # how often a process waiting for another's lease asks again


class _Lease(Lock):
    """redis-py's lock, which does not wait out a lease of its own: a SET NX whose reply
    was lost and that the client sent again finds the key set, to this lease's token."""

    async def do_acquire(self, token: str | bytes) -> bool:
        if await super().do_acquire(token):
            return True
        held_by = await self.redis.get(self.name)
        return held_by is not None and _as_bytes(held_by) == _as_bytes(token)


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


class ConversationLocks:
    def __init__(self, *, redis: Redis, lease_s: float = LEASE_S) -> None:
        self._redis = redis
        self.lease_s = lease_s
        # Entries vanish once no turn holds or awaits their lock.
        self._local: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()
        # Leases whose release failed (Redis was out): their token, and when they lapse.
        self._unreleased: dict[str, tuple[str | bytes, float]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, conversation: str) -> AsyncIterator[None]:
        """The conversation's turn, once every earlier one here and elsewhere is done."""
        if (local := self._local.get(conversation)) is None:
            local = self._local[conversation] = asyncio.Lock()
        async with local:
            lease = self._lease(conversation)
            # A lease of ours left in Redis by a release that failed is taken up at once,
            # where a new token would wait for it to lapse; kept until then, should Redis
            # fail this turn too.
            left = self._left(conversation)
            token = left if left is not None else uuid.uuid4().hex
            try:
                await lease.acquire(token=token)
            except BaseException:  # its SET may have landed (a lost reply, a cancel then)
                self._keep_unreleased(conversation, token)
                raise
            self._unreleased.pop(conversation, None)
            if left is not None:  # its TTL is what was left of it: a whole term from now
                # Lapsed, or Redis failing: the turn goes on, as after a failed renewal.
                with contextlib.suppress(LockError, RedisError):
                    await lease.reacquire()
            released = asyncio.Event()
            renewing = asyncio.create_task(self._renew(lease, released))
            try:
                yield
            finally:
                released.set()
                await renewing
                await self._release(conversation, lease)

    async def busy(self, conversation: str) -> bool:
        """Whether a turn of the conversation runs, or waits, in any process."""
        if (local := self._local.get(conversation)) is not None and local.locked():
            return True
        if (token := self._left(conversation)) is not None:  # no turn holds it: let go
            # Ours to release now: a turn starting meanwhile must not take it up (it would
            # run on a lease this release then deletes); a release that fails keeps it.
            self._unreleased.pop(conversation, None)
            lease = self._lease(conversation)
            lease.local.token = token
            await self._release(conversation, lease)
        return bool(await self._redis.exists(keys.turn_lock(conversation)))

    def _lease(self, conversation: str) -> _Lease:
        return _Lease(
            self._redis, keys.turn_lock(conversation), timeout=self.lease_s, sleep=POLL_S,
            thread_local=False,
        )  # fmt: skip

    async def _release(self, conversation: str, lease: _Lease) -> None:
        """Release a lease; where Redis is out, keep its token for the conversation's next
        turn here, or `busy`, to let go of (else it would keep every turn out until it
        lapsed, after Redis was back)."""
        token = lease.local.token
        try:
            await lease.release()
        except LockError:  # lapsed already
            pass
        except RedisError:
            self._keep_unreleased(conversation, token)
            return
        self._unreleased.pop(conversation, None)

    def _keep_unreleased(self, conversation: str, token: str | bytes) -> None:
        """A lease of ours that may be in Redis, for the next turn here to take up, or
        `busy` to let go of, where a new token would wait for it to lapse."""
        now = asyncio.get_running_loop().time()
        self._unreleased = {c: kept for c, kept in self._unreleased.items() if kept[1] > now}
        self._unreleased[conversation] = (token, now + self.lease_s)

    def _left(self, conversation: str) -> str | bytes | None:
        """The token of the conversation's lease that failed to be released, if any."""
        token, _lapses = self._unreleased.get(conversation, (None, 0.0))
        return token

    async def idle(self, conversation: str, *, within: float) -> bool:
        """Whether the conversation's turns, here and elsewhere, are all done within
        `within` seconds. (A deadline, not a timeout: a cancelled Redis call would cost
        its connection.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while await self.busy(conversation):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True

    async def _renew(self, lease: Lock, released: asyncio.Event) -> None:
        """Renew the lease a third of the way through each term, until released. (A flag
        stops it, not a cancel: redis-py's own `wait_for` may swallow one.)"""
        while not await set_within(released, self.lease_s / 3):
            try:
                await lease.reacquire()
            except (LockError, RedisError) as error:  # the turn goes on; it may overlap
                logger.warning("could not renew the turn lock %s: %s", lease.name, error)
