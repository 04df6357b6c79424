"""The `threadbot` command (also `python -m bot`): `chat` in the terminal, `run` the bots.

The only place that reads settings and configures logging. Imports stay light so that
`threadbot --help` answers at once; the model's libraries load inside the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bot.config import Settings, describe_error

if TYPE_CHECKING:
    from adapters.base import Adapter

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(describe_error(error), file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    command = {"chat": chat, "run": run}[args.command]
    try:
        return asyncio.run(_stopped_by_sigterm(command(settings, args)))
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


async def chat(settings: Settings, args: argparse.Namespace) -> int:
    from adapters.console import ConsoleAdapter
    from bot.runtime import open_service

    async with open_service(settings) as service:
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
        await adapter.run()
    return 0


async def run(settings: Settings, args: argparse.Namespace) -> int:
    from adapters.discord_adapter import DiscordAdapter
    from adapters.slack_adapter import SlackAdapter
    from bot.runtime import open_service

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
    async with open_service(settings) as service:
        await _run_all([platform.from_settings(settings, service) for platform in platforms])
    return 0


async def _run_all(adapters: list[Adapter]) -> None:
    """Run every adapter; the first to fail stops the others and its error is raised."""
    tasks = [asyncio.create_task(adapter.run()) for adapter in adapters]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
