"""Each idle conversation's KV cache, kept so that its next turn prefills only what is new.

A conversation's next prompt repeats its last prompt and answer and adds the new message,
so the keys and values already computed for that shared prefix are still right. Entries
are least-recently-used first out, within a byte budget; a prompt that no longer starts
with the cached tokens (history trimmed or edited) reuses only the part that still
matches, which may be nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, keys and values shaped [1, kv_heads, tokens, head_dim]."""


def kv_bytes(kv: KV) -> int:
    return sum(keys.nbytes + values.nbytes for keys, values in kv)


def shared_prefix(cached: list[int], prompt: list[int]) -> int:
    """How many leading tokens two id lists have in common."""
    for index, (left, right) in enumerate(zip(cached, prompt, strict=False)):
        if left != right:
            return index
    return min(len(cached), len(prompt))


@dataclass
class _Entry:
    tokens: list[int]  # the ids whose keys and values are in `kv`
    kv: KV
    size: int


class PrefixCache:
    """Conversation id → the KV cache of its last turn, bounded by `max_bytes` in total."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, conversation: str, prompt: list[int]) -> tuple[KV | None, int]:
        """Remove the conversation's entry and return the part that `prompt` starts with,
        with its length. At least the prompt's last token is left to compute, since its
        logits choose the first answer token."""
        entry = self._entries.pop(conversation, None)
        if entry is None:
            return None, 0
        self.size -= entry.size
        reused = min(shared_prefix(entry.tokens, prompt), len(prompt) - 1)
        if reused <= 0:
            return None, 0
        kv = [(keys[..., :reused, :], values[..., :reused, :]) for keys, values in entry.kv]
        return kv, reused

    def put(self, conversation: str, tokens: list[int], kv: KV) -> None:
        """Keep a finished turn's cache (copied out of any larger batch tensor)."""
        self._drop(conversation)
        size = kv_bytes(kv)
        if size > self.max_bytes or not tokens:
            return
        while self.size + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        kv = [(keys.clone(), values.clone()) for keys, values in kv]
        self._entries[conversation] = _Entry(tokens, kv, size)
        self.size += size

    def _drop(self, conversation: str) -> None:
        if (entry := self._entries.pop(conversation, None)) is not None:
            self.size -= entry.size
