"""Who may use the bot where: the team's access rules, checked on platform ids.

Adapters describe each request (`Requester`) before anything is stored or generated; the
rules decide, never the model. Admins pass every rule; otherwise deny wins, an empty allow
list admits everyone, and a Slack Connect user from another organisation must be allowed
by user id. A Discord DM is in no server: where role rules are set, the asker must pass
them as a member of a server the bot shares with them that the `servers` rule admits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bot.config import Access, DiscordAccess, SlackAccess

OPERATOR_PLATFORMS = frozenset({"console"})
"""Whoever runs the terminal chat owns the machine: no rule applies, and they are admin."""


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asks and where, by the ids the platform gave."""

    platform: str
    user: str
    channel: str  # a thread's parent channel
    workspace: str | None = None  # Slack team, Discord server; None if none (Discord DMs)
    dm: bool = False
    roles: tuple[str, ...] = ()  # Discord role ids
    # A Discord DM's asker in the servers looked up (see `dm_role_servers`): each server's
    # id and the asker's role ids there. Kept apart, as each server is judged on its own.
    memberships: tuple[tuple[str, tuple[str, ...]], ...] = ()
    stranger: bool = False  # Slack Connect: a user of another organisation


def refusal(access: Access, who: Requester) -> str | None:
    """Why `who` may not use the bot here (for the log), or None if they may."""
    if who.user in access.admins or who.platform in OPERATOR_PLATFORMS:
        return None
    rules: SlackAccess | DiscordAccess = getattr(access, who.platform)
    if not rules.users.admits(who.user):
        return "user not allowed"
    if who.stranger and who.user not in rules.users.allow:
        return "user from another organisation"
    workspaces = rules.workspaces if isinstance(rules, SlackAccess) else rules.servers
    if who.workspace is not None and not workspaces.admits(who.workspace):
        return "workspace not allowed"
    if who.dm:
        if not rules.dms:
            return "direct messages are off"
        if isinstance(rules, DiscordAccess) and not _dm_roles_pass(rules, who.memberships):
            return "no allowed role in an allowed server"
        return None
    if not rules.channels.admits(who.channel):
        return "channel not allowed"
    if isinstance(rules, DiscordAccess) and not rules.roles.admits(*who.roles):
        return "no allowed role"
    return None


def dm_role_servers(access: Access, servers: Iterable[str]) -> list[str]:
    """Of the Discord servers the bot is in, those where a DM asker's roles are to be looked
    up: the ones the `servers` rule admits, or none when no role rule is set."""
    rules = access.discord
    if not _role_rules_set(rules):
        return []
    return [server for server in servers if rules.servers.admits(server)]


def _role_rules_set(rules: DiscordAccess) -> bool:
    return bool(rules.roles.allow or rules.roles.deny)


def _dm_roles_pass(
    rules: DiscordAccess, memberships: Iterable[tuple[str, tuple[str, ...]]]
) -> bool:
    """Whether a DM passes the role rules: none are set, or some server the `servers` rule
    admits has the asker with an allowed role and no denied one."""
    return not _role_rules_set(rules) or any(
        rules.servers.admits(server) and rules.roles.admits(*roles) for server, roles in memberships
    )
