"""The Slack app manifest asks for what the adapter uses: scopes, events, the pane and
the slash command."""

from __future__ import annotations

from pathlib import Path

import yaml

from adapters.slack_command import SLASH_COMMAND

MANIFEST = Path(__file__).parent.parent / "slack-app-manifest.yml"


def test_the_manifest_asks_for_the_pane_the_command_and_their_scopes():
    manifest = yaml.safe_load(MANIFEST.read_text())
    scopes = manifest["oauth_config"]["scopes"]["bot"]
    assert {"assistant:write", "chat:write", "commands", "im:history"} <= set(scopes)
    events = manifest["settings"]["event_subscriptions"]["bot_events"]
    assert {"assistant_thread_started", "assistant_thread_context_changed", "message.im"} <= set(
        events
    )
    assert manifest["features"]["assistant_view"]["assistant_description"]
    [command] = manifest["features"]["slash_commands"]
    assert command["command"] == SLASH_COMMAND and command["should_escape"] is False


def test_the_manifest_hears_group_dms_and_asks_for_no_unused_scope():
    """Group DMs need their history scope and event; the bot opens no DM of its own, so
    it needs no im:write."""
    manifest = yaml.safe_load(MANIFEST.read_text())
    scopes = manifest["oauth_config"]["scopes"]["bot"]
    events = manifest["settings"]["event_subscriptions"]["bot_events"]
    assert {"mpim:history", "mpim:read"} <= set(scopes) and "message.mpim" in events
    assert "im:write" not in scopes
    assert len(scopes) == len(set(scopes)) and len(events) == len(set(events))
