"""The `threadbot` command (also `python -m bot`): `chat` in the terminal, `run` the bots.

The only place that reads settings and configures logging. Imports stay light so that
`threadbot --help` answers at once; the model's libraries load inside the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from bot.config import ConfigError, Settings, export_hugging_face_variables, load_settings

if TYPE_CHECKING:
    from adapters.base import Adapter
    from bot.service import ChatService

logger = logging.getLogger(__name__)

OUR_LOGGERS = ("bot", "adapters", "storage")

NO_PLATFORM = """\
threadbot run: no platform is configured.
  Slack:   set SLACK_BOT_TOKEN and SLACK_APP_TOKEN (Socket Mode) or SLACK_SIGNING_SECRET.
  Discord: set DISCORD_BOT_TOKEN.
Put them in the environment or in a .env file (see the README).
To try the bot without a platform: threadbot chat"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threadbot",
        description="A self-hosted Slack and Discord chatbot that answers in threads "
        "with a local Hugging Face model. Settings come from the environment and .env.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chat = commands.add_parser(
        "chat", help="chat in the terminal, through the same path as the bots"
    )
    chat.add_argument(
        "--conversation",
        default="default",
        metavar="NAME",
        help="stored conversation to continue (default: %(default)s)",
    )
    commands.add_parser("run", help="start every platform adapter whose credentials are set")
    commands.add_parser(
        "doctor",
        help="check the settings, Redis, the model, the platforms' tokens and free disk; "
        "exit 1 if a check fails",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # First: the Hugging Face libraries read these at import (doctor's model check too).
    exported = export_hugging_face_variables()
    if args.command == "doctor":
        return doctor()
    try:
        settings = load_settings()
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if exported:
        logger.debug("passed on from .env to the Hugging Face libraries: %s", ", ".join(exported))
    command = {"chat": chat, "run": run}[args.command]
    try:
        return asyncio.run(command(settings, args))
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if not _is_operator_error(error):
            raise
        print(f"threadbot: {error}", file=sys.stderr)
        return 1


async def _stopped_by_sigterm(command: Coroutine[Any, Any, int]) -> int:
    """Run a command; SIGTERM (docker stop, systemd) ends it as cleanly as Ctrl-C does."""
    task = asyncio.ensure_future(command)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        logger.info("stopped by SIGTERM")
        return 143  # 128 + SIGTERM, as a shell reports it


def configure_logging(level: str) -> None:
    """Our loggers at LOG_LEVEL on stderr (stdout is the conversation); libraries at WARNING."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)


def _is_operator_error(error: Exception) -> bool:
    """Errors whose message already says what to fix: shown as one line, no traceback."""
    from adapters.base import AdapterError
    from bot.loading import ModelError
    from storage.errors import StorageError

    return isinstance(error, (AdapterError, ModelError, StorageError))


def doctor() -> int:
    """Reads the settings itself: a bad one is one of its findings, not the end."""
    from bot.doctor.runner import run_doctor

    configure_logging("WARNING")  # stdout is the report; stderr only for what goes wrong
    try:
        return asyncio.run(run_doctor(out=sys.stdout))
    except KeyboardInterrupt:
        return 130


async def chat(settings: Settings, args: argparse.Namespace) -> int:
    return await _stopped_by_sigterm(_chat(settings, args))


async def _chat(settings: Settings, args: argparse.Namespace) -> int:
    from adapters.console import ConsoleAdapter
    from bot.runtime import open_service
    from bot.team import Team

    async with open_service(Team(settings)) as service:
        interactive = sys.stdin.isatty()
        if interactive:
            print(
                f"threadbot chat: conversation '{args.conversation}'. /reset clears it, "
                "/quit or Ctrl-D ends.",
                file=sys.stderr,
            )
        adapter = ConsoleAdapter(
            service=service,
            conversation=args.conversation,
            input=sys.stdin,
            output=sys.stdout,
            interactive=interactive,
        )
        await service.resume()  # first, what an earlier chat left unanswered
        await adapter.run()
        # At the end of the input, answers still running (resumed ones) get the grace.
        await service.drain(settings.shutdown_grace_s)
    return 0


async def run(settings: Settings, args: argparse.Namespace) -> int:
    from adapters.discord_adapter import DiscordAdapter
    from adapters.slack_adapter import SlackAdapter
    from bot.runtime import open_service
    from bot.team import Team

    platforms = []
    if settings.slack_bot_token:
        if not (settings.slack_app_token or settings.slack_signing_secret):
            print(
                "threadbot run: SLACK_BOT_TOKEN is set, but Slack also needs SLACK_APP_TOKEN "
                "(Socket Mode) or SLACK_SIGNING_SECRET (HTTP events).",
                file=sys.stderr,
            )
            return 2
        platforms.append(SlackAdapter)
    if settings.discord_bot_token:
        platforms.append(DiscordAdapter)
    if not platforms:
        print(NO_PLATFORM, file=sys.stderr)
        return 2
    async with open_service(Team(settings)) as service:
        adapters = [platform.from_settings(settings, service) for platform in platforms]
        return await _serve(service, adapters, grace=settings.shutdown_grace_s)


async def _serve(service: ChatService, adapters: list[Adapter], *, grace: float) -> int:
    """Run the adapters until a signal, an adapter's failure or the engine's death; then
    drain (running answers get `grace` seconds, the rest stay pending for the next start)
    and stop. Exit status: 0 after a signal, 1 after the engine died; an adapter's error
    is raised. A second signal exits at once; SIGHUP reloads the team's configuration."""
    stop = asyncio.Event()
    _stop_on_signals(stop)
    # SIGHUP reloads the team's file; connections and conversations stay as they are.
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.reload)
    tasks = [asyncio.create_task(adapter.run()) for adapter in adapters]
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(service.queue.died.wait())]
    try:
        await asyncio.wait([*tasks, *waits], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            logger.info("stopping: no new turns; running answers get %gs to finish", grace)
        left = await service.drain(grace)
        for task in tasks:
            if task.done():
                task.result()  # an adapter's error, raised now that every turn is safe
        if service.queue.died.is_set():
            logger.critical(
                "the engine thread died: exiting so that a supervisor restarts threadbot "
                "(%d turns stay pending and are answered after the restart)",
                left,
            )
            return 1
        logger.info("stopped cleanly; %d turns stay pending for the next start", left)
        return 0
    finally:
        for task in tasks + waits:
            task.cancel()
        await asyncio.gather(*tasks, *waits, return_exceptions=True)


def _stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM (docker stop, systemd) and SIGINT set `stop`; a second one exits at once,
    leaving what is pending pending."""

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.info("%s received", signal.Signals(signum).name)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
