"""Who may use the bot where: the team's access rules, checked on platform ids.

Adapters describe each request (`Requester`) before anything is stored or generated; the
rules decide, never the model. Admins pass every rule; otherwise deny wins, an empty allow
list admits everyone, and a Slack Connect user from another organisation must be allowed
by user id. A Discord DM is in no server: where the `servers` or `roles` rule has a list,
the asker must be a member of a server of the bot's that `servers` admits, holding an
allowed role and no denied one there; with neither, a DM needs no membership.
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
    # A Discord DM's asker in the servers looked up (see `dm_servers`): each server's id
    # and the asker's role ids there. Kept apart, as each server is judged on its own.
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
        if isinstance(rules, DiscordAccess) and not _dm_memberships_pass(access, who.memberships):
            return "not in an allowed server with an allowed role"
        return None
    if not rules.channels.admits(who.channel):
        return "channel not allowed"
    if isinstance(rules, DiscordAccess) and not rules.roles.admits(*who.roles):
        return "no allowed role"
    return None


def dm_servers(access: Access, user: str, servers: Iterable[str]) -> list[str]:
    """Of the Discord servers the bot is in, those where a DM asker's membership is to be
    looked up: the ones the `servers` rule admits; none for an admin (who passes anyway),
    when neither `servers` nor `roles` has a list (a DM then needs no membership), or when
    `refusal` refuses the DM whatever the memberships (DMs off, the user not allowed)."""
    rules = access.discord
    if user in access.admins or not _dm_memberships_needed(rules):
        return []
    if not rules.dms or not rules.users.admits(user):
        return []
    return [server for server in servers if rules.servers.admits(server)]


def dm_membership_admits(access: Access, server: str, roles: Iterable[str]) -> bool:
    """Whether a DM asker who is a member of `server` with `roles` passes the Discord rules
    there: the `servers` rule admits the server, and the `roles` rule those roles."""
    rules = access.discord
    return rules.servers.admits(server) and rules.roles.admits(*roles)


def _dm_memberships_needed(rules: DiscordAccess) -> bool:
    lists = (rules.servers.allow, rules.servers.deny, rules.roles.allow, rules.roles.deny)
    return any(lists)


def _dm_memberships_pass(
    access: Access, memberships: Iterable[tuple[str, tuple[str, ...]]]
) -> bool:
    """Whether a DM passes the `servers` and `roles` rules: neither has a list, or some
    server of the asker's passes them (each server is judged on its own)."""
    return not _dm_memberships_needed(access.discord) or any(
        dm_membership_admits(access, server, roles) for server, roles in memberships
    )
