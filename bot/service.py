"""ChatService: one turn's whole handling, platform-free.

A `Turn` comes in from an adapter; the service drops re-deliveries, checks the text,
stores it, builds the prompt from the stored history, trims it to the model's token
budget, queues it, streams the answer into the adapter's `ReplySink`, and stores the
answer. Every user-facing outcome goes through the sink; nothing here raises to adapters
for a failure the user should hear about.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from weakref import WeakValueDictionary

from bot import replies
from bot.queue import InferenceQueue, InferenceTimeout, QueueFull
from bot.types import ChatMessage, ConversationKey, ReplySink, Turn
from storage.store import ConversationStore

logger = logging.getLogger(__name__)

TokenCounter = Callable[[list[ChatMessage]], int]
"""Prompt length in tokens of a messages list (thread-safe: it runs off the event loop)."""


class ChatService:
    """Answers turns from any adapter, remembering each conversation in the store."""

    def __init__(
        self,
        *,
        store: ConversationStore,
        queue: InferenceQueue,
        count_tokens: TokenCounter,
        prompt_budget: int,
        system_prompt: str | None,
        max_input_chars: int,
        max_pending_per_user: int,
    ) -> None:
        self.store = store
        self.queue = queue
        self.count_tokens = count_tokens
        self.prompt_budget = prompt_budget
        self.system_prompt = system_prompt
        self.max_input_chars = max_input_chars
        self.max_pending_per_user = max_pending_per_user
        self._pending: Counter[str] = Counter()  # per user: turns accepted, not yet answered
        # Entries vanish once no turn holds or awaits their lock.
        self._conversation_locks: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()

    async def knows(self, conversation: ConversationKey) -> bool:
        """Whether the bot has history in this conversation (adapters answer there unasked)."""
        return await self.store.exists(str(conversation))

    async def reset(self, conversation: ConversationKey) -> None:
        """Forget a conversation's history."""
        await self.store.clear(str(conversation))

    async def handle(self, turn: Turn, sink: ReplySink) -> None:
        """Answer one turn through `sink`, unless it was already handled."""
        platform = turn.conversation.platform
        if not await self.store.first_seen(platform, turn.message_id):
            logger.info("skipping re-delivered message %s on %s", turn.message_id, platform)
            return
        text = turn.text.strip()
        if not text:
            await sink.finish(replies.empty_message())
            return
        if len(text) > self.max_input_chars:
            await sink.finish(replies.too_long(len(text), self.max_input_chars))
            return

        if (pending := self._pending[turn.author]) >= self.max_pending_per_user:
            await sink.finish(replies.slow_down(pending))
            return

        conversation = str(turn.conversation)
        self._pending[turn.author] += 1
        try:
            async with self._turns_of(conversation):
                await self._answer(conversation, turn, text, sink)
        finally:
            self._pending[turn.author] -= 1
            if not self._pending[turn.author]:
                del self._pending[turn.author]

    def _turns_of(self, conversation: str) -> asyncio.Lock:
        """One turn at a time per conversation: each prompt holds the previous answer."""
        if (lock := self._conversation_locks.get(conversation)) is None:
            lock = self._conversation_locks[conversation] = asyncio.Lock()
        return lock

    async def _answer(self, conversation: str, turn: Turn, text: str, sink: ReplySink) -> None:
        if turn.context and not await self.store.exists(conversation):
            await self.store.append(conversation, *turn.context)
        await self.store.append(conversation, {"role": "user", "content": text})
        history = await self.store.load(conversation)
        messages, dropped = await self._fit(self._system() + history)
        logger.debug("prompt for %s: %d messages, %d dropped", conversation, len(messages), dropped)
        if dropped:
            await sink.notice(replies.history_dropped(dropped))
        await sink.start()
        try:
            generation = self.queue.submit(messages, user=turn.author, conversation=conversation)
        except QueueFull:
            await sink.fail(replies.busy())
            return
        try:
            async for chunk in generation:
                await sink.append(chunk)
        except InferenceTimeout:
            await sink.fail(replies.timed_out())
            return
        except Exception:
            logger.exception("answering %s failed", conversation)
            await sink.fail(replies.failed())
            return
        finally:
            generation.cancel()  # no-op once finished; stops the engine if we were interrupted
        answer = generation.text.strip()
        if not answer:
            await sink.finish(replies.empty_answer())
            return
        await self.store.append(conversation, {"role": "assistant", "content": answer})
        await sink.finish(answer)

    def _system(self) -> list[ChatMessage]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    async def _fit(self, messages: list[ChatMessage]) -> tuple[list[ChatMessage], int]:
        """The messages that fit the prompt budget, and how many old ones were dropped to fit.

        Drops the oldest history first; never the system prompt or the newest message.
        The kept history starts at a user message, as chat templates expect (the store's
        own trim may have left an assistant message first).
        """
        head = 1 if self.system_prompt else 0
        system, history = messages[:head], messages[head:]
        newest = len(history) - 1

        def next_user(index: int) -> int:
            while index < newest and history[index]["role"] != "user":
                index += 1
            return index

        async def fits(drop: int) -> bool:
            tokens = await asyncio.to_thread(self.count_tokens, system + history[drop:])
            return tokens <= self.prompt_budget

        start = next_user(0)
        low, high = start, newest  # the smallest drop that fits lies in [low, high]
        while low < high:  # binary search: O(log n) token counts, not O(n)
            middle = (low + high) // 2
            if await fits(middle):
                high = middle
            else:
                low = middle + 1
        drop = next_user(low)
        if drop == newest and not await fits(drop):
            logger.warning(
                "the newest message alone exceeds the prompt budget of %d tokens",
                self.prompt_budget,
            )
        return system + history[drop:], drop - start
