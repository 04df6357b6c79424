"""Access rules on platform ids: allow and deny lists, DMs, Slack Connect, roles, admins."""

from __future__ import annotations

import pytest

from bot.access import Requester, dm_membership_admits, dm_servers, refusal
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


def discord_dm(*memberships: tuple[str, tuple[str, ...]]) -> Requester:
    return Requester("discord", "7", "9", dm=True, memberships=memberships)


NO_ROLE_IN_A_SERVER = "not in an allowed server with an allowed role"


def test_discord_dms_ignore_channels_and_need_no_server_without_server_or_role_rules() -> None:
    assert refusal(access(discord={"channels": {"allow": ["8"]}}), discord_dm()) is None
    assert refusal(access(discord={"dms": False}), discord_dm()) == "direct messages are off"
    assert dm_servers(access(discord={"channels": {"allow": ["8"]}}), "7", ["500"]) == []


@pytest.mark.parametrize(
    ("rules", "memberships", "reason"),
    [
        ({"roles": {"allow": ["10"]}}, [("500", ("10",))], None),
        ({"roles": {"allow": ["10"]}}, [("500", ("11",))], NO_ROLE_IN_A_SERVER),
        ({"roles": {"allow": ["10"]}}, [], NO_ROLE_IN_A_SERVER),  # in none of the servers
        ({"roles": {"deny": ["11"]}}, [("500", ())], None),
        ({"roles": {"deny": ["11"]}}, [], NO_ROLE_IN_A_SERVER),
        ({"roles": {"deny": ["11"]}}, [("500", ("10", "11"))], NO_ROLE_IN_A_SERVER),
        # each server is judged alone: denied in one, allowed in another
        ({"roles": {"deny": ["11"]}}, [("500", ("11",)), ("600", ())], None),
        # the role counts only in a server the servers rule admits
        ({"roles": {"allow": ["10"]}, "servers": {"deny": ["500"]}}, [("500", ("10",))],
         NO_ROLE_IN_A_SERVER),
        ({"roles": {"allow": ["10"]}, "servers": {"allow": ["600"]}},
         [("500", ("10",)), ("600", ("10",))], None),
        # the servers rule alone: a member of a server it admits, whatever the roles
        ({"servers": {"allow": ["500"]}}, [("500", ("10",))], None),
        ({"servers": {"allow": ["500"]}}, [("600", ("10",))], NO_ROLE_IN_A_SERVER),
        ({"servers": {"allow": ["500"]}}, [], NO_ROLE_IN_A_SERVER),
        ({"servers": {"deny": ["500"]}}, [("500", ("10",))], NO_ROLE_IN_A_SERVER),
        ({"servers": {"deny": ["500"]}}, [("500", ()), ("600", ())], None),
        ({"servers": {"deny": ["500"]}}, [], NO_ROLE_IN_A_SERVER),
    ],
)  # fmt: skip
def test_discord_dms_pass_server_and_role_rules_as_a_member_of_an_allowed_server(
    rules: dict, memberships: list, reason: str | None
) -> None:
    assert refusal(access(discord=rules), discord_dm(*memberships)) == reason


def test_discord_dm_memberships_are_looked_up_in_allowed_servers_with_server_or_role_rules():
    servers = ["500", "600"]
    assert dm_servers(Access(), "7", servers) == []
    assert dm_servers(access(discord={"roles": {"deny": ["11"]}}), "7", servers) == servers
    assert dm_servers(access(discord={"servers": {"deny": ["500"]}}), "7", servers) == ["600"]
    strict = {"roles": {"allow": ["10"]}, "servers": {"deny": ["500"]}}
    assert dm_servers(access(discord=strict), "7", servers) == ["600"]
    assert dm_servers(access(admins=["7"], discord=strict), "7", servers) == []  # passes anyway


def test_no_dm_memberships_are_looked_up_for_a_dm_refused_whatever_they_are():
    strict = {"roles": {"allow": ["10"]}}
    servers = ["500", "600"]
    assert dm_servers(access(discord=strict | {"dms": False}), "7", servers) == []
    assert dm_servers(access(discord=strict | {"users": {"deny": ["7"]}}), "7", servers) == []
    assert dm_servers(access(discord=strict | {"users": {"allow": ["8"]}}), "7", servers) == []
    assert dm_servers(access(discord=strict | {"users": {"allow": ["7"]}}), "7", servers) == servers


def test_one_discord_membership_admits_a_dm_by_the_servers_and_roles_rules() -> None:
    strict = access(discord={"roles": {"allow": ["10"]}, "servers": {"deny": ["500"]}})
    assert dm_membership_admits(strict, "600", ("600", "10"))
    assert not dm_membership_admits(strict, "600", ("600", "11"))
    assert not dm_membership_admits(strict, "500", ("500", "10"))


def test_admins_pass_every_rule_and_the_console_is_never_checked() -> None:
    rules = access(admins=["UALICE"], slack={"users": {"deny": ["UALICE"]}, "dms": False})
    assert refusal(rules, ALICE) is None
    assert refusal(access(slack={"dms": False}), Requester("console", "you", "c", dm=True)) is None
