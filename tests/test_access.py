"""Access rules on platform ids: allow and deny lists, DMs, Slack Connect, roles, admins."""

from __future__ import annotations

import pytest

from bot.access import Requester, refusal
from bot.config import Access


def access(**rules: object) -> Access:
    return Access.model_validate(rules)


ALICE = Requester("slack", "UALICE", "CGENERAL", workspace="TACME")


def test_by_default_everyone_everywhere() -> None:
    assert refusal(Access(), ALICE) is None
    assert refusal(Access(), Requester("discord", "1", "2", workspace="3", roles=("4",))) is None


@pytest.mark.parametrize(
    ("rules", "reason"),
    [
        ({"users": {"deny": ["UALICE"]}}, "user not allowed"),
        ({"users": {"allow": ["UBOB"]}}, "user not allowed"),
        ({"channels": {"deny": ["CGENERAL"]}}, "channel not allowed"),
        ({"channels": {"allow": ["CSUPPORT"]}}, "channel not allowed"),
        ({"workspaces": {"allow": ["TOTHER"]}}, "workspace not allowed"),
        ({"users": {"allow": ["UALICE"], "deny": ["UALICE"]}}, "user not allowed"),  # deny wins
    ],
)
def test_slack_lists(rules: dict, reason: str) -> None:
    assert refusal(access(slack=rules), ALICE) == reason


def test_allowed_by_every_list() -> None:
    rules = {"users": {"allow": ["UALICE"]}, "channels": {"allow": ["CGENERAL"]}}
    assert refusal(access(slack=rules), ALICE) is None


def test_dms_off_and_dms_ignore_channel_lists() -> None:
    dm = Requester("slack", "UALICE", "DALICE", workspace="TACME", dm=True)
    assert refusal(access(slack={"dms": False}), dm) == "direct messages are off"
    assert refusal(access(slack={"channels": {"allow": ["CSUPPORT"]}}), dm) is None


def test_slack_connect_strangers_need_an_explicit_allow() -> None:
    stranger = Requester("slack", "UGUEST", "CSHARED", workspace="TACME", stranger=True)
    assert refusal(Access(), stranger) == "user from another organisation"
    assert refusal(access(slack={"users": {"allow": ["UGUEST"]}}), stranger) is None


@pytest.mark.parametrize(
    ("rules", "roles", "reason"),
    [
        ({"roles": {"allow": ["10"]}}, ("10", "11"), None),
        ({"roles": {"allow": ["10"]}}, ("11",), "no allowed role"),
        ({"roles": {"allow": ["10"]}}, (), "no allowed role"),
        ({"roles": {"deny": ["11"]}}, ("10", "11"), "no allowed role"),
        ({"servers": {"allow": [999]}}, ("10",), "workspace not allowed"),
        ({"servers": {"deny": [500]}}, ("10",), "workspace not allowed"),
    ],
)
def test_discord_servers_and_roles(rules: dict, roles: tuple[str, ...], reason: str | None):
    member = Requester("discord", "7", "8", workspace="500", roles=roles)
    assert refusal(access(discord=rules), member) == reason


def test_discord_dms_have_no_server_or_roles() -> None:
    dm = Requester("discord", "7", "9", dm=True)
    strict = {"servers": {"allow": ["500"]}, "roles": {"allow": ["10"]}}
    assert refusal(access(discord=strict), dm) is None
    assert refusal(access(discord=strict | {"dms": False}), dm) == "direct messages are off"


def test_admins_pass_every_rule_and_the_console_is_never_checked() -> None:
    rules = access(admins=["UALICE"], slack={"users": {"deny": ["UALICE"]}, "dms": False})
    assert refusal(rules, ALICE) is None
    assert refusal(access(slack={"dms": False}), Requester("console", "you", "c", dm=True)) is None
