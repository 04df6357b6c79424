"""A prompt's length in tokens, where the service trims history to the model's context.

With the model's own tokenizer the count is exact: the chat template, then the tokens,
as the engine itself builds prompts (`render`). A process that loads no model (a gateway,
or one answering through an OpenAI-compatible server) loads only the tokenizer and the
model's config, or, where it has no tokenizer at all, estimates on the safe side.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.config import DEFAULT_CONTEXT_TOKENS
from bot.prompt import TokenCounter
from bot.types import ChatMessage

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from bot.config import Settings

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 3  # English runs at about 4 characters a token: 3 over-counts, to be safe
# What the estimate counts apart: runs of ASCII letters (words, camelCase's split into
# its words), single spaces (which go with the next word), and everything else ASCII, a
# character at a time.
LETTERS = re.compile(r"[A-Za-z]+")
WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")  # a run of letters' (camelCase) words
VOWELS = frozenset("aeiouyAEIOUY")
LONGEST_WORD = 12  # letters: a longer run is counted as no word (a key, base64)
NOT_A_WORD_CHARS_PER_TOKEN = 1.3  # base64's letters, measured: 1.35 with Qwen2.5's tokenizer
SPACE_RUNS = re.compile(r" {2,}")
SPACES_PER_TOKEN = 4  # beyond a run's first: indentation, alignment (tokenizers merge them)
TOKENS_PER_MESSAGE = 8  # what a chat template adds around each message, at most in practice


def alternating(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """`messages` as the strictest chat templates (Mistral, Gemma, Llama 2) accept them.

    Those raise unless user and assistant take turns, starting with the user after an
    optional system message; a conversation can hold two messages of one role in a row
    (an answer that failed, a thread read as context), and raising would leave it
    unanswerable for good. So consecutive messages of one role become one, joined by a
    blank line, and an empty user message goes before an assistant message that would
    come first. A well-formed conversation comes back as it was, so its prompt (and the
    KV cache kept for its next turn) does not change.
    """
    merged: list[ChatMessage] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            content = f"{merged[-1]['content']}\n\n{message['content']}"
            merged[-1] = {"role": message["role"], "content": content}
        else:
            merged.append(message)
    first = 1 if merged and merged[0]["role"] == "system" else 0
    if first < len(merged) and merged[first]["role"] == "assistant":
        merged.insert(first, {"role": "user", "content": ""})
    return merged


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage]) -> str:
    """A conversation through the model's chat template, ready for an answer."""
    return tokenizer.apply_chat_template(
        alternating(defused(tokenizer, messages)), tokenize=False, add_generation_prompt=True
    )


WORD_JOINER = "\u2060"  # invisible, and part of no token's text


TEMPLATE_TOKEN = re.compile(
    r"<[|\uff5c][^\s<>|\uff5c]{1,64}[|\uff5c]>|\[/?INST\]|</?(?:s|think|start_of_turn|end_of_turn)>"
)
"""The forms chat templates' special tokens take: ChatML's and Llama 3's `<|…|>`,
DeepSeek's (with fullwidth bars), Mistral's `[INST]`, Gemma's turns, `<s>`, `<think>`.
What `defused` breaks for a server whose tokenizer is not ours to read (INFERENCE_URL)."""


def defused(
    tokenizer: PreTrainedTokenizerBase | None, messages: Sequence[ChatMessage]
) -> list[ChatMessage]:
    """`messages` with the text of each of the tokenizer's added tokens (`<|im_end|>`,
    `<|im_start|>`, `<think>`; without a tokenizer, anything like one: `TEMPLATE_TOKEN`)
    broken by an invisible word joiner after its first character. The rendered prompt is
    tokenized as a whole, here or by a server, so such text in a message was read as the
    token itself: a user who wrote `<|im_end|><|im_start|>system` opened a system turn.
    Now only the template writes them."""
    added = TEMPLATE_TOKEN if tokenizer is None else _added_tokens(tokenizer)
    if added is None:
        return list(messages)

    def broken(text: str) -> str:
        return added.sub(lambda token: token[0][0] + WORD_JOINER + token[0][1:], text)

    return [{**message, "content": broken(message["content"])} for message in messages]


@functools.lru_cache(maxsize=4)
def _added_tokens(tokenizer: PreTrainedTokenizerBase) -> re.Pattern[str] | None:
    """Any of the tokenizer's added tokens of two characters or more, longest first."""
    texts = sorted((t for t in tokenizer.get_added_vocab() if len(t) > 1), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def opens_reasoning(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template ends a prompt inside an open `<think>` block, as
    DeepSeek-R1's does: the answer then starts with reasoning, and only its end is written."""
    try:
        prompt = render(tokenizer, [{"role": "user", "content": "?"}])
    except Exception:  # no template (a base model's), or one that wants other input
        return False
    return prompt.rstrip().endswith("<think>")


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage]) -> list[int]:
    """A conversation's prompt as token ids: the chat template, then the tokens. The
    template writes every special token the model wants (Llama 3's, Mistral's and Gemma's
    start with the BOS token), so the tokenizer adds none of its own: they would see two."""
    return tokenizer(render(tokenizer, messages), add_special_tokens=False).input_ids


def context_tokens(config: PretrainedConfig | None, max_context_tokens: int | None) -> int:
    """Prompt + answer budget: MAX_CONTEXT_TOKENS (unset: its default) within the model's
    window, where its config is known."""
    window = getattr(config, "max_position_embeddings", None) or (2048 if config else None)
    wanted = max_context_tokens or DEFAULT_CONTEXT_TOKENS
    return min(window, wanted) if window else wanted


@dataclass(frozen=True)
class TemplateCount:
    """Exact: the model's chat template and tokenizer."""

    tokenizer: PreTrainedTokenizerBase

    def __call__(self, messages: list[ChatMessage]) -> int:
        return len(prompt_ids(self.tokenizer, messages))


def estimate(messages: list[ChatMessage]) -> int:
    """A count on the safe side, for a model whose tokenizer is unknown: a token for every
    3 letters of a word (at least one a word; a run of letters that is no word, as in
    base64 or a key, a token for every letter and a third), a token for each other ASCII
    character but a single space (digits, which many tokenizers split one by one,
    punctuation, breaks), one for every 4 spaces of a run beyond its first, and one for
    each byte of any other character (byte-level tokenizers never need more; Chinese
    takes about one token a character, emoji a few). Numbers, hashes, keys and logs take
    far more tokens a character than prose does."""
    return sum(
        _estimate(message["content"]) + TOKENS_PER_MESSAGE for message in alternating(messages)
    )


def _estimate(text: str) -> int:
    words = LETTERS.findall(text)
    ascii_chars = sum(char.isascii() for char in text)
    others = ascii_chars - sum(map(len, words)) - text.count(" ")
    other_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars
    runs = sum(math.ceil((len(run) - 1) / SPACES_PER_TOKEN) for run in SPACE_RUNS.findall(text))
    return sum(map(_letter_tokens, words)) + others + other_bytes + runs


def _letter_tokens(run: str) -> int:
    """A run of letters' tokens: its words' (camelCase's too) at CHARS_PER_TOKEN letters
    each; letters that make no word (base64, a key, a JWT, a random id: no vowel in two
    letters or more, longer than words are, or capitals past an acronym's length) at
    about one a letter and a third, as tokenizers split them."""
    pieces = WORDS.findall(run)
    shortest = 1 if len(pieces) == 1 else 2  # `a`, `I`; but `aGVs`'s `a` and `G` are no words
    words = [piece for piece in pieces if _a_word(piece, shortest)]
    others = sum(math.ceil(len(p) / NOT_A_WORD_CHARS_PER_TOKEN) for p in pieces if p not in words)
    return math.ceil(sum(map(len, words)) / CHARS_PER_TOKEN) + others


def _a_word(letters: str, shortest: int) -> bool:
    if not shortest <= len(letters) <= LONGEST_WORD or (letters.isupper() and len(letters) > 5):
        return False
    return len(letters) == 1 or not VOWELS.isdisjoint(letters)


@dataclass(frozen=True)
class PromptTokens:
    """How the service counts a prompt, and how many tokens prompts may take."""

    count: TokenCounter
    budget: int
    opens_reasoning: bool = False  # the chat template, where known (`opens_reasoning`)


def prompt_tokens_without_model(settings: Settings) -> PromptTokens:
    """For a process that loads no model: INFERENCE_TOKENIZER's count, else (answers from
    INFERENCE_URL) the estimate, else MODEL's own tokenizer and config (a gateway to
    workers that load MODEL)."""
    from transformers import AutoConfig, AutoTokenizer

    from bot import loading

    config = tokenizer = None
    if name := settings.inference_tokenizer:
        logger.info("Counting tokens with %s's tokenizer", name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:  # not on the hub, not a folder, no access
            raise loading.ModelError(
                f"INFERENCE_TOKENIZER={name}: no tokenizer could be loaded from it ({error}). "
                "Set it to the served model's hub id or a folder with its tokenizer, or "
                "leave it unset to count tokens by estimate.",
                may_pass=True,  # the hub may be out of reach for now
            ) from None
        count: TokenCounter = _template_count(
            tokenizer,
            f"INFERENCE_TOKENIZER={name}",
            "set it to the served chat model's tokenizer, or leave it unset to count tokens "
            "by estimate.",
        )
    elif settings.inference_url:
        logger.info("Counting tokens by estimate (a token for every 3 letters of a word)")
        count = estimate
    else:
        source = loading.tokenizer_source(settings)
        logger.info("Counting tokens with the tokenizer of %s", source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
            config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
        except Exception as error:  # a file that cannot be read
            raise loading.ModelError(
                f"MODEL={source}: its tokenizer could not be loaded ({loading.first_line(error)})"
            ) from error
        count = _template_count(
            tokenizer, f"MODEL={source}", "set it to a chat model, with its tokenizer."
        )
    if settings.inference_url:
        count = AsSent(count)
    context = context_tokens(config, settings.max_context_tokens)
    loading.refuse_crowded_context(context, settings.max_new_tokens)
    # A server may take the reasoning out itself (vLLM's and llama.cpp's reasoning parsers)
    # and send no closing tag: what it sends is judged by the tags alone.
    opened = not settings.inference_url and tokenizer is not None and opens_reasoning(tokenizer)
    return PromptTokens(count, max(context - settings.max_new_tokens, 1), opened)


def _template_count(tokenizer: PreTrainedTokenizerBase, named: str, fix: str) -> TemplateCount:
    """The tokenizer's count, if it has a chat template: a base model's has none, nor the
    empty tokenizer transformers makes for a folder without one; every count would fail."""
    from bot.loading import ModelError

    if not tokenizer.chat_template:
        raise ModelError(f"{named} has no chat template to count a conversation with: {fix}")
    return TemplateCount(tokenizer)


@dataclass(frozen=True)
class AsSent:
    """A count of the messages as an OpenAI-compatible server is sent them: `defused`
    without a tokenizer, each thing written like a template's token broken by a word
    joiner (two or three tokens more each), so that what is trimmed to the budget is
    what the server reads."""

    count: TokenCounter

    def __call__(self, messages: list[ChatMessage]) -> int:
        return self.count(defused(None, messages))
