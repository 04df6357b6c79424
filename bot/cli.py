"""The `threadbot` command (also `python -m bot`): `chat` in the terminal, `run` the bots.

The only place that reads settings and configures logging. Imports stay light so that
`threadbot --help` answers at once; the model's libraries load inside the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from bot.config import (
    ConfigError,
    Settings,
    export_hugging_face_variables,
    load_settings,
    misspelt_settings,
)
from bot.device import still_loading
from bot.logs import configure_logging
from storage.embedded import stop_all

if TYPE_CHECKING:
    from adapters.base import Adapter
    from adapters.discord_adapter import DiscordAdapter
    from adapters.slack_adapter import SlackAdapter
    from bot.health import Vitals
    from bot.metrics import Metrics
    from bot.ops_server import OpsServer
    from bot.service import ChatService

logger = logging.getLogger(__name__)

TOKEN_CHECK_S = 15  # for each platform's token at start; past it, the adapter's start asks
NO_SHARED_REDIS = (
    "threadbot run --role {role}: gateways and workers meet in one Redis, which an embedded "
    "one is not (it is this process's alone): set REDIS_URL, the same for each of them."
)
NO_PLATFORM = """\
threadbot run: no platform is configured.
  Slack:   set SLACK_BOT_TOKEN and SLACK_APP_TOKEN (Socket Mode) or SLACK_SIGNING_SECRET.
  Discord: set DISCORD_BOT_TOKEN.
Put them in the environment or in a .env file (see the README).
To try the bot without a platform: threadbot chat"""

NO_HTTP_PORT = """\
threadbot run: SLACK_SIGNING_SECRET serves Slack's events on HTTP_PORT, which is 0.
  Set HTTP_PORT (default 8080) to the port that Slack's request URL reaches."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threadbot",
        description="A self-hosted Slack and Discord chatbot that answers in threads "
        "with a local Hugging Face model. Settings come from the environment, .env and the "
        "team's YAML file (THREADBOT_CONFIG, else threadbot.yml).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chat = commands.add_parser(
        "chat", help="chat in the terminal, through the same path as the bots"
    )
    chat.add_argument(
        "--conversation",
        default="default",
        type=_conversation_name,
        metavar="NAME",
        help="stored conversation to continue (default: %(default)s)",
    )
    run_command = commands.add_parser(
        "run", help="start every platform adapter whose credentials are set"
    )
    run_command.add_argument(
        "--role",
        choices=["all", "gateway", "worker"],
        default="all",
        help="all: the adapters and the model in this process (default); gateway: the "
        "adapters, with answers written by workers through Redis; worker: the model only, "
        "answering the gateways' jobs",
    )
    commands.add_parser(
        "doctor",
        help="check the settings, Redis, the model, the platforms' tokens and free disk; "
        "exit 1 if a check fails",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        return doctor()
    try:
        # First: the Hugging Face libraries read these at import.
        exported = export_hugging_face_variables()
        settings = load_settings()
    except ConfigError as error:
        _say_bad_settings(error)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    for line in misspelt_settings():
        logger.warning("%s", line)
    if exported:
        logger.debug("passed on from .env to the Hugging Face libraries: %s", ", ".join(exported))
    return _without_waiting_for_a_load(
        _run({"chat": chat, "run": run}[args.command], settings, args)
    )


def _say_bad_settings(error: ConfigError) -> None:
    """One line per problem on stderr: a JSON one where the environment asks for JSON logs
    (so that every line parses), though the settings it is one of were refused."""
    if os.environ.get("LOG_FORMAT", "").strip().lower() != "json":
        print(error, file=sys.stderr)
        return
    configure_logging("ERROR", "json")
    for line in str(error).splitlines():
        logger.error("%s", line)


def _without_waiting_for_a_load(code: int) -> int:
    """`code`; where a stop came during a model's download or load, the process exits with
    it at once, not waiting for the load's thread (`bot.device.loaded`)."""
    if still_loading():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _conversation_name(name: str) -> str:
    """A chat's name: not empty, and without a colon, which would make "a" the chat that
    resumes "a:b"'s answers (a turn's id is the name, a colon and a random part)."""
    if not name or ":" in name:
        raise argparse.ArgumentTypeError(f"{name!r}: a name, without ':' (such as project-x)")
    return name


def _run(command: Any, settings: Settings, args: argparse.Namespace) -> int:
    """A command's exit status: a failure that says what to fix as one line, others
    logged with their traceback."""
    try:
        return asyncio.run(command(settings, args))
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if not _is_operator_error(error):
            # Logged, so that in JSON mode the traceback is one line too.
            logger.critical("threadbot stopped by an unexpected error", exc_info=error)
            return 1
        _tell(settings, f"threadbot: {error}")
        return 2 if _is_setting(error) else 1


def _tell(settings: Settings, text: str, level: int = logging.ERROR) -> None:
    """A message for whoever started threadbot, on stderr: as written, or in JSON mode a
    log line, so that every line there parses."""
    if settings.log_format == "json":
        logger.log(level, "%s", text)
    else:
        print(text, file=sys.stderr)


async def _stopped_by_sigterm(
    command: Coroutine[Any, Any, int], signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)
) -> int:
    """Run a command; SIGTERM (docker stop, systemd), or another of `signals`, ends it as
    cleanly as Ctrl-C does."""
    task = asyncio.ensure_future(command)
    terminated: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        terminated.append(signum)
        task.cancel()

    for signum in signals:
        asyncio.get_running_loop().add_signal_handler(signum, on_signal, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if not terminated:  # Ctrl-C: asyncio.run raises KeyboardInterrupt (130)
            raise
        logger.info("stopped by %s", terminated[0].name)
        return 128 + terminated[0]  # as a shell reports it


def _is_operator_error(error: Exception) -> bool:
    """Errors whose message already says what to fix: shown as one line, no traceback."""
    from adapters.base import AdapterError
    from bot.loading import ModelError
    from bot.ops_server import OpsServerError
    from storage.errors import StorageError

    return isinstance(error, (AdapterError, ModelError, OpsServerError, StorageError))


def _is_setting(error: Exception) -> bool:
    """A model setting, or a platform's refusal, that a restart cannot fix: exit status 2,
    as for any bad setting (systemd's RestartPreventExitStatus)."""
    from adapters.base import AdapterError
    from bot.loading import ModelError

    if isinstance(error, AdapterError):
        return error.setting
    return isinstance(error, ModelError) and not error.may_pass


def doctor() -> int:
    """Reads the settings itself: a bad one is one of its findings, not the end."""
    # First, for the model check: the Hugging Face libraries read these at import. An
    # unreadable `.env` is left to the settings check, whose FAIL line names it.
    with contextlib.suppress(ConfigError):
        export_hugging_face_variables()
    from bot.doctor.runner import run_doctor

    configure_logging("WARNING")  # stdout is the report; stderr only for what goes wrong
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show `…` gets `?`
    try:
        code = asyncio.run(run_doctor(out=sys.stdout))
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `| head -1`: no one reads on (nor Python's flush at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    return _without_waiting_for_a_load(code)


async def chat(settings: Settings, args: argparse.Namespace) -> int:
    # Its terminal closed (SIGHUP) ends it as SIGTERM does: the default killed the process
    # and left the embedded redis-server running.
    return await _stopped_by_sigterm(_chat(settings, args), (signal.SIGTERM, signal.SIGHUP))


async def _chat(settings: Settings, args: argparse.Namespace) -> int:
    from adapters.console import ConsoleAdapter
    from bot.runtime import open_service
    from bot.team import Team

    if sys.stdin is None:  # started with its standard input closed (`<&-`)
        print("threadbot chat: standard input is closed: nothing to read", file=sys.stderr)
        return 1
    if sys.stdout is None:  # or its output (`>&-`)
        print("threadbot chat: standard output is closed: nowhere to answer", file=sys.stderr)
        return 1
    sys.stdin.reconfigure(errors="replace")  # a byte that is not UTF-8 is no reason to stop
    # A terminal that cannot show a character (a Latin-1 one, and the help's bullets) gets
    # a stand-in for it, not a reply lost.
    sys.stdout.reconfigure(errors="replace")
    async with open_service(Team(settings)) as service:
        interactive = sys.stdin.isatty()
        if interactive:
            _tell(
                settings,
                f"threadbot chat: conversation '{args.conversation}'. /reset clears it, "
                "Ctrl-C stops an answer, /quit or Ctrl-D ends.",
                logging.INFO,
            )
        adapter = ConsoleAdapter(
            service=service,
            conversation=args.conversation,
            input=sys.stdin,
            output=sys.stdout,
            interactive=interactive,
        )
        await adapter.resume()
        await adapter.run()
        # At the end of the input, answers still running (resumed ones) get the grace.
        await service.drain(settings.shutdown_grace_s)
    return 0


async def run(settings: Settings, args: argparse.Namespace) -> int:
    # Until serving takes the signals over: SIGTERM during a long start (a model's download
    # or load) stops it as cleanly, where its default killed the process and left the
    # embedded redis-server behind. SIGHUP's default kills the process too: only log it (a
    # `systemctl reload`). A worker has no team rules to reload.
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _hangup_ignored, args.role)
    return await _stopped_by_sigterm(_run_role(settings, args))


async def _run_role(settings: Settings, args: argparse.Namespace) -> int:
    if args.role != "all" and not settings.redis_url:
        _tell(settings, NO_SHARED_REDIS.format(role=args.role))
        return 2
    if args.role == "worker":
        return await work(settings)
    from adapters.discord_adapter import DiscordAdapter
    from adapters.slack_adapter import SlackAdapter
    from bot.health import Vitals
    from bot.metrics import Metrics
    from bot.runtime import open_service
    from bot.team import Team

    platforms: list[type[SlackAdapter | DiscordAdapter]] = []
    if settings.slack_bot_token:
        if not (settings.slack_app_token or settings.slack_signing_secret):
            _tell(
                settings,
                "threadbot run: SLACK_BOT_TOKEN is set, but Slack also needs SLACK_APP_TOKEN "
                "(Socket Mode) or SLACK_SIGNING_SECRET (HTTP events).",
            )
            return 2
        if not settings.slack_app_token and not settings.http_port:
            _tell(settings, NO_HTTP_PORT)
            return 2
        platforms.append(SlackAdapter)
    if settings.discord_bot_token:
        platforms.append(DiscordAdapter)
    if not platforms:
        _tell(settings, NO_PLATFORM)
        return 2
    metrics = Metrics()
    vitals = Vitals(metrics=metrics, platforms=[platform.platform for platform in platforms])
    # Up before the model loads: /healthz answers and /readyz says so through a long start.
    async with _ops_server(settings, vitals, metrics) as routes:
        await _tokens_checked(platforms, settings)
        async with open_service(Team(settings), metrics=metrics, role=args.role) as service:
            build = {
                SlackAdapter: partial(SlackAdapter.from_settings, routes=routes),
                DiscordAdapter: DiscordAdapter.from_settings,
            }
            adapters = [build[platform](settings, service) for platform in platforms]
            vitals.started(service, adapters)
            return await _serve(service, adapters, grace=settings.shutdown_grace_s)


async def _tokens_checked(
    platforms: Sequence[type[SlackAdapter | DiscordAdapter]], settings: Settings
) -> None:
    """Each platform's token, before the model loads (a download and a load: minutes at
    a first start): one refused stops the start now, not once that is done. A platform
    out of reach (or slow to answer, its packets dropped) is left to its adapter's start,
    which says so (or it is back by then)."""
    from adapters.base import AdapterError

    for platform in platforms:
        try:
            async with asyncio.timeout(TOKEN_CHECK_S):
                await platform.check_token(settings)
        except TimeoutError:
            continue
        except AdapterError as error:
            if error.setting:
                raise


async def work(settings: Settings) -> int:
    """`run --role worker`: answer jobs until a signal (then running answers get the grace
    period, and the rest go to other workers) or the engine thread's death (exit 1)."""
    from bot.health import Vitals
    from bot.metrics import Metrics
    from bot.runtime import open_worker

    metrics = Metrics()
    vitals = Vitals(metrics=metrics, platforms=[])
    async with (
        _ops_server(settings, vitals, metrics),
        open_worker(settings, metrics=metrics) as worker,
    ):
        vitals.working(worker)
        stop = asyncio.Event()
        _stop_on_signals(stop)
        died = worker.inference.died
        working = asyncio.create_task(worker.run())
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(died.wait())]
        try:
            await asyncio.wait([working, *waits], return_when=asyncio.FIRST_COMPLETED)
            worker.stop()
            await working  # a failure of its own is raised here
            left = await worker.finish(settings.shutdown_grace_s)
        finally:
            for task in waits:
                task.cancel()
        if died.is_set():
            logger.critical("the engine thread died: exiting; %d jobs go to other workers", left)
            return 1
        logger.info("worker stopped; %d unfinished jobs go to other workers", left)
        return 0


def _ops_server(
    settings: Settings, vitals: Vitals, metrics: Metrics
) -> contextlib.AbstractAsyncContextManager[OpsServer | None]:
    """The ops server on HTTP_PORT, or nothing where HTTP_PORT is 0."""
    from bot.ops_server import OpsServer

    if not settings.http_port:
        return contextlib.nullcontext()
    return OpsServer(vitals=vitals, metrics=metrics, port=settings.http_port)


async def _serve(service: ChatService, adapters: list[Adapter], *, grace: float) -> int:
    """Run the adapters until a signal, an adapter's failure or the engine thread's death;
    then drain (running answers get `grace` seconds, the rest stay pending for the next
    start) and stop. Exit status: 0 after a signal, 1 after the engine thread died; an
    adapter's error is raised. A second signal exits at once; SIGHUP reloads the team's
    configuration."""
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


def _hangup_ignored(role: str) -> None:
    if role == "worker":
        logger.info("SIGHUP: a worker has no team configuration to reload; nothing done")
    else:
        logger.warning("SIGHUP while starting: nothing reloaded; send it again once ready")


def _stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM (docker stop, systemd) and SIGINT set `stop`; a second one exits at once,
    leaving what is pending pending."""

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            stop_all()  # the embedded redis-server (its own session: no signal reached it)
            os._exit(128 + signum)
        logger.info("%s received", signal.Signals(signum).name)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
