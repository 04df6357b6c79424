"""Prompts: trimmed to the budget with hysteresis; for strict chat templates, roles
alternate, and well-formed prompts stay as they were."""

from __future__ import annotations

import copy

import pytest
from conftest import answer_alone

from bot.batching import Batcher
from bot.engine import Engine
from bot.kv_cache import PrefixCache
from bot.prompt import TRIM_TO, Fitted, fit
from bot.tokens import alternating

# Mistral's and Llama 2's rule, in their words: after an optional system message, user and
# assistant take turns, starting with the user.
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


SYSTEM = {"role": "system", "content": "Be brief."}
# Two people spoke before the bot was asked; an answer was stored twice (a retry).
UNEVEN = [user("Alice: the build is red"), user("Bob: since this morning"),
          assistant("Which job?"), assistant("Which job fails?"), user("the lint job")]  # fmt: skip
WELL_FORMED = [
    [user("hi")],
    [SYSTEM, user("Why is the sky blue?")],
    [SYSTEM, user("hi"), assistant("Hello!"), user("What is 2 + 2?")],
    [user("a"), assistant("b"), user("c"), assistant("d"), user("e")],
    [SYSTEM],
]


@pytest.fixture
def strict_engine(tiny_model, qwen_tokenizer) -> Engine:
    """The tiny model behind the real tokenizer with a template that raises like Mistral's."""
    tokenizer = copy.copy(qwen_tokenizer)
    tokenizer.chat_template = STRICT_TEMPLATE
    return Engine(model=tiny_model, tokenizer=tokenizer, max_new_tokens=8)


def test_the_strict_template_rejects_repeated_roles(strict_engine):
    """The fixture's template is as strict as Mistral's, so the tests below mean something."""
    with pytest.raises(Exception, match="must alternate"):
        strict_engine.tokenizer.apply_chat_template(UNEVEN, tokenize=False)
    with pytest.raises(Exception, match="must alternate"):
        strict_engine.tokenizer.apply_chat_template([SYSTEM, *UNEVEN[2:]], tokenize=False)


def test_repeated_roles_are_merged_with_a_blank_line():
    assert alternating(UNEVEN) == [
        user("Alice: the build is red\n\nBob: since this morning"),
        assistant("Which job?\n\nWhich job fails?"),
        user("the lint job"),
    ]
    assert UNEVEN[0] == user("Alice: the build is red")  # the caller's messages are untouched


def test_a_conversation_starts_with_the_user():
    assert alternating([SYSTEM, assistant("Welcome!"), user("thanks")]) == [
        SYSTEM, user(""), assistant("Welcome!"), user("thanks"),
    ]  # fmt: skip
    assert alternating([assistant("Welcome!"), user("thanks")])[0] == user("")


def test_a_strict_template_answers_repeated_roles_on_both_paths(strict_engine):
    """`generate` (the seed's path) and the batcher (the service's) both render through
    the alternation, and give the same answer."""
    for messages in (UNEVEN, [SYSTEM, *UNEVEN], [SYSTEM, *UNEVEN[2:]]):
        [prompt] = strict_engine.render([messages])
        assert prompt.endswith("[INST] the lint job [/INST]")
        [answer] = strict_engine.generate([messages])
        assert answer
        batcher = Batcher(
            engine=strict_engine, max_batch=1, step_tokens=64, prefix_cache=PrefixCache(0)
        )
        assert answer_alone(batcher, messages) == answer


@pytest.mark.parametrize("messages", WELL_FORMED)
def test_a_well_formed_prompt_is_rendered_byte_for_byte_as_before(
    make_engine, strict_engine, messages
):
    for engine in (make_engine(), strict_engine):
        template = engine.tokenizer.apply_chat_template
        before = template(messages, tokenize=False, add_generation_prompt=True)
        assert engine.render([messages]) == [before]


def test_a_merged_turn_stays_the_prefix_of_the_next_prompt(make_engine):
    """The next turn's prompt starts with this turn's prompt and answer, so its KV cache
    is still reused."""
    engine = make_engine()
    first = [user("Alice: the build is red"), user("Bob: since this morning")]
    second = [*first, assistant("Which job?"), user("the lint job")]
    [prompt] = engine.render([first])
    assert engine.render([second])[0].startswith(prompt + "Which job?")
    assert engine.prompt_ids(second)[: len(engine.prompt_ids(first))] == engine.prompt_ids(first)


def words(messages: list[dict]) -> int:
    """A token count that is easy to follow: one token a word."""
    return sum(len(message["content"].split()) for message in messages)


SAID = [user("one two three"), assistant("four five six")] * 4  # 24 words


async def test_a_history_that_fits_is_kept_whole():
    assert await fit([SYSTEM], SAID, count_tokens=words, budget=26) == Fitted([SYSTEM, *SAID], 0, 0)


async def test_past_the_budget_the_oldest_go_down_to_two_thirds_of_it():
    newest = user("seven eight")
    prompt, cut, dropped = await fit([SYSTEM], [*SAID, newest], count_tokens=words, budget=26)
    # 28 words do not fit 26; trimmed to 17 (not to 26, which a next turn would pass again),
    # whole exchanges at a time, so the kept history starts with a user message.
    assert (cut, dropped) == (4, 4)
    assert prompt == [SYSTEM, *SAID[4:], newest]
    assert words(prompt) <= 26 * TRIM_TO < words([SYSTEM, *SAID[2:], newest])


async def test_a_newest_message_past_two_thirds_of_the_budget_keeps_what_fits_beside_it():
    """Two thirds of 30 is 20 words, which the 20-word question and the system prompt
    pass alone: the trim keeps what fits the budget itself, not the question alone."""
    newest = user(" ".join(["word"] * 20))
    prompt, cut, dropped = await fit([SYSTEM], [*SAID, newest], count_tokens=words, budget=30)
    assert (cut, dropped) == (6, 6)
    assert prompt == [SYSTEM, *SAID[6:], newest]
    assert words(prompt) <= 30 < words([SYSTEM, *SAID[4:], newest])


async def test_an_answer_left_first_by_the_store_is_cut_but_not_counted_as_dropped():
    history = SAID[1:]  # the store's cap left an answer first: never part of a prompt
    assert await fit([], history, count_tokens=words, budget=30) == Fitted(history[1:], 1, 0)
    prompt, cut, dropped = await fit([], history, count_tokens=words, budget=16)
    # Two thirds of 16 is 10 words: the newest 9 (3 messages) fit but start with an answer,
    # so the kept history starts at the user message after it.
    assert (prompt, cut, dropped) == (history[5:], 5, 4)
