"""The fake Discord's interactions keep Discord's rules, over plain HTTP (no discord.py):
what the adapter's tests rely on the fake to refuse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import fake_discord
import pytest
from fake_discord import EPHEMERAL, FakeDiscord

COMMAND = {"name": "help", "description": "What I can do", "type": 1}


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as discord_fake:
        yield discord_fake


@pytest.fixture
async def call(fake: FakeDiscord) -> AsyncIterator[Any]:
    """call(method, path, body=None, **query) -> (status, JSON body or None), as the bot."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bot {fake.token}"}) as session:

        async def request(method: str, path: str, body: Any = None, **query: str) -> Any:
            url = fake.api_url + path
            async with session.request(method, url, json=body, params=query) as response:
                payload = await response.json() if response.status != 204 else None
                return response.status, payload

        yield request


async def test_commands_register_only_in_servers_the_bot_is_in(fake, call):
    app = f"/applications/{fake.application_id}"
    assert (await call("PUT", f"{app}/guilds/4242/commands", [COMMAND]))[1]["code"] == 50001
    status, error = await call("PUT", f"{app}/commands", [{**COMMAND, "name": "Bad Name"}])
    assert (status, error["code"]) == (400, 50035)
    status, [registered] = await call("PUT", f"{app}/guilds/{fake.guild_id}/commands", [COMMAND])
    assert status == 200 and registered["guild_id"] == fake.guild_id
    dm = fake.dm_channel(fake.alice["id"])["id"]
    with pytest.raises(LookupError):  # a server's command is not offered in a DM
        await fake.slash_command("help", dm)


async def test_an_interaction_is_answered_once_then_through_its_webhook(fake, call):
    await call("PUT", f"/applications/{fake.application_id}/commands", [COMMAND])
    ran = await fake.slash_command("help", fake.channel_id)
    callback = f"/interactions/{ran.id}/{ran.payload['token']}/callback"
    webhook = f"/webhooks/{fake.application_id}/{ran.payload['token']}"
    assert (await call("POST", webhook, {"content": "early"}, wait="1"))[1]["code"] == 10015
    assert (await call("POST", callback, {"type": 6}))[1]["code"] == 50035  # for components
    deferred = {"type": 5, "data": {"flags": EPHEMERAL}}
    status, response = await call("POST", callback, deferred, with_response="1")
    assert status == 200 and response["interaction"]["response_message_ephemeral"]
    assert (await call("POST", callback, deferred))[1]["code"] == 40060  # answered already
    status, edited = await call("PATCH", f"{webhook}/messages/@original", {"content": "Hi"})
    assert status == 200 and edited["flags"] == EPHEMERAL  # no longer LOADING
    await call("POST", webhook, {"content": "more", "flags": EPHEMERAL}, wait="1")
    assert [reply["content"] for reply in ran.replies] == ["Hi", "more"]
    assert fake.messages.get(fake.channel_id, []) == []  # only alice saw them


async def test_an_interaction_unanswered_for_3_s_is_gone(fake, call, monkeypatch):
    monkeypatch.setattr(fake_discord, "ACK_WINDOW_S", 0.0)
    await call("PUT", f"/applications/{fake.application_id}/commands", [COMMAND])
    ran = await fake.slash_command("help", fake.channel_id)
    callback = f"/interactions/{ran.id}/{ran.payload['token']}/callback"
    assert (await call("POST", callback, {"type": 4, "data": {"content": "late"}}))[0] == 404


async def test_only_a_button_on_the_message_can_be_pressed(fake, call):
    path = f"/channels/{fake.channel_id}/messages"
    row = {"type": 1, "components": [{"type": 2, "style": 2, "label": "Go", "custom_id": "go"}]}
    too_long = {**row, "components": [{**row["components"][0], "custom_id": "x" * 101}]}
    assert (await call("POST", path, {"content": "hi", "components": [too_long]}))[0] == 400
    _, message = await call("POST", path, {"content": "hi", "components": [row]})
    with pytest.raises(LookupError):
        await fake.press_button(fake.channel_id, message["id"], "stop")
    pressed = await fake.press_button(fake.channel_id, message["id"], "go")
    callback = f"/interactions/{pressed.id}/{pressed.payload['token']}/callback"
    assert (await call("POST", callback, {"type": 7, "data": {"components": []}}))[0] == 204
    assert fake.buttons(fake.channel_id, message["id"]) == []  # the update took them off
