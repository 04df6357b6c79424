"""Who may use the bot where: the team's access rules, checked on platform ids.

Adapters describe each request (`Requester`) before anything is stored or generated; the
rules decide, never the model. Admins pass every rule; otherwise deny wins, an empty allow
list admits everyone, and a Slack Connect user from another organisation must be allowed
by user id.
"""

from __future__ import annotations

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
        return None if rules.dms else "direct messages are off"
    if not rules.channels.admits(who.channel):
        return "channel not allowed"
    if isinstance(rules, DiscordAccess) and not rules.roles.admits(*who.roles):
        return "no allowed role"
    return None
