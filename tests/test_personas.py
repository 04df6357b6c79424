"""Personas: the most specific one wins, value by value; placeholders filled, other braces kept."""

from __future__ import annotations

from datetime import UTC, datetime

from bot.config import Settings
from bot.personas import Voice, fill, placeholder_values, voice_for
from bot.types import ConversationKey, Turn

SUPPORT = ConversationKey("slack", "TACME", "CSUPPORT", "1700000000.000100")


def settings(*personas: dict, **values: object) -> Settings:
    return Settings(_env_file=None, personas=personas, **values)


def test_global_settings_without_personas() -> None:
    voice = voice_for(settings(system_prompt="Be kind."), SUPPORT)
    assert voice == Voice("Be kind.", max_new_tokens=None, temperature=None)


def test_the_most_specific_persona_wins_value_by_value() -> None:
    team = settings(
        {"channel": "CSUPPORT", "temperature": 0.1},  # most specific, whatever its order
        {"platform": "slack", "system_prompt": "Slack voice", "max_new_tokens": 50},
        {"platform": "slack", "workspace": "TACME", "system_prompt": "Acme voice"},
        {"platform": "discord", "system_prompt": "Discord voice"},
        {"platform": "slack", "channel": "COTHER", "system_prompt": "Other channel"},
        system_prompt="Global",
    )
    voice = voice_for(team, SUPPORT)
    assert voice.system_prompt == "Acme voice"
    assert voice.max_new_tokens == 50
    assert voice.temperature == 0.1
    elsewhere = ConversationKey("slack", "TELSE", "CRANDOM", "1")
    assert voice_for(team, elsewhere).system_prompt == "Slack voice"
    assert voice_for(team, ConversationKey("console", "-", "x", "x")).system_prompt == "Global"


def test_placeholders_are_filled_and_other_braces_kept() -> None:
    turn = Turn(SUPPORT, "UALICE", "hi", "m1", author_name="Alice", channel_name="support",
                bot_name="Helper")  # fmt: skip
    values = placeholder_values(turn, now=datetime(2026, 12, 1, 9, 30, tzinfo=UTC))
    text = fill('{bot_name} in #{channel_name} for {user_name}, {date} {time}. JSON: {"a": 1}',
                values)  # fmt: skip
    assert (
        text == 'Helper in #support for Alice, Tuesday 01 December 2026 09:30 UTC. JSON: {"a": 1}'
    )
