"""The `threadbot` command end to end: `python -m bot` run as a real subprocess.

Each run gets its own working directory (no stray `.env`) and an environment cleared of
every threadbot setting, so only what a test sets applies. The slow tests chat with the
bundled SmolLM2 through the CLI's own embedded Redis, sharing the one-time GGUF
conversion through the `bundled_cache` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import NOT_OURS, data_dir_with, unreadable_dotenv
from processes import PROXY_NAMES, silent_proxy
from redis.asyncio import Redis

from bot import replies
from bot.types import ConversationKey
from storage.embedded import HOLDER, LOCK_FILE, EmbeddedRedis, _alive
from storage.store import ConversationStore

FAST_TIMEOUT = 60  # seconds; a run that loads no model
CHAT_TIMEOUT = 240  # seconds; a run that loads the (already converted) bundled model
FRANCE = "What is the capital of France?"


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli_env(**settings: str) -> dict[str, str]:
    """This process's environment (no threadbot setting in it during a test: conftest's
    `only_the_tests_settings`), plus `settings`; the ops server is off (HTTP_PORT=0)
    unless a test names a port, so that runs side by side never compete for the default."""
    return {**os.environ, "HTTP_PORT": "0", **settings}


def run_cli(
    *args: str,
    cwd: Path,
    env: dict[str, str],
    input: str = "",
    timeout: float = FAST_TIMEOUT,
) -> Result:
    """`python -m bot ARGS` with piped stdin; on timeout its whole process group is killed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a hung run takes its redis-server down with it
    )
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"threadbot {' '.join(args)} ran over {timeout}s; stderr:\n{stderr}")
    return Result(process.returncode, stdout, stderr)


def run_python(code: str, *, cwd: Path) -> Result:
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=FAST_TIMEOUT,
    )
    return Result(completed.returncode, completed.stdout, completed.stderr)


def console_id(name: str, login: str | None = None) -> str:
    """The conversation id the console adapter stores `--conversation NAME` under, for
    `login` (by default this test's)."""
    return str(ConversationKey("console", login or getpass.getuser(), name, name))


def prompt_sizes(stderr: str, conversation: str) -> list[int]:
    """Message counts of each prompt built for `conversation`, from the DEBUG log."""
    pattern = rf"prompt for {re.escape(conversation)}: (\d+) messages, \d+ dropped"
    return [int(count) for count in re.findall(pattern, stderr)]


# --- Without a model ----------------------------------------------------------------------


def test_help_lists_the_commands(tmp_path: Path) -> None:
    """`threadbot --help` answers, listing the `chat` and `run` commands."""
    result = run_cli("--help", cwd=tmp_path, env=cli_env())
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+chat\s", result.stdout, re.MULTILINE)
    assert re.search(r"^\s+run\s", result.stdout, re.MULTILINE)


def test_cli_import_does_not_load_the_model_libraries(tmp_path: Path) -> None:
    """Imports stay light so `--help` and setting errors answer at once (no torch at start)."""
    result = run_python(
        "import bot.cli, sys; print('torch' in sys.modules, 'transformers' in sys.modules)",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", ["a:b", ""])
def test_a_chat_name_with_a_colon_or_none_is_refused(tmp_path: Path, name: str) -> None:
    """A colon would make "a" the chat that resumes "a:b"'s answers: refused, as a
    usage error, before anything starts."""
    result = run_cli("chat", "--conversation", name, cwd=tmp_path, env=cli_env())
    assert result.returncode == 2
    assert "without ':'" in result.stderr and "Traceback" not in result.stderr


def test_run_without_credentials_explains_what_to_set(tmp_path: Path) -> None:
    """`threadbot run` with no platform configured exits 2 and names the tokens and `chat`."""
    result = run_cli("run", cwd=tmp_path, env=cli_env())
    assert result.returncode == 2
    assert "SLACK_BOT_TOKEN" in result.stderr
    assert "DISCORD_BOT_TOKEN" in result.stderr
    assert "threadbot chat" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_run_with_a_slack_bot_token_alone_says_what_else_slack_needs(tmp_path: Path) -> None:
    result = run_cli("run", cwd=tmp_path, env=cli_env(SLACK_BOT_TOKEN="xoxb-1"))
    assert result.returncode == 2
    assert "SLACK_APP_TOKEN" in result.stderr and "SLACK_SIGNING_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("role", ["gateway", "worker"])
def test_a_gateway_or_worker_without_redis_url_says_they_need_one_redis(
    tmp_path: Path, role: str
) -> None:
    """Each would start an embedded Redis of its own, which no other process reaches: the
    gateway timed every turn out, and the worker waited for jobs that never came."""
    env = cli_env(SLACK_BOT_TOKEN="xoxb-1", SLACK_APP_TOKEN="xapp-1")
    result = run_cli("run", "--role", role, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "REDIS_URL" in result.stderr and "Traceback" not in result.stderr


def test_run_in_json_log_mode_says_it_in_json(tmp_path: Path) -> None:
    """With LOG_FORMAT=json even the start-up advice is a JSON line, so that every line parses."""
    result = run_cli("run", cwd=tmp_path, env=cli_env(LOG_FORMAT="json"))
    assert result.returncode == 2
    [entry] = [json.loads(line) for line in result.stderr.splitlines()]
    assert entry["level"] == "ERROR" and "SLACK_BOT_TOKEN" in entry["message"]


def test_bad_settings_in_json_log_mode_are_said_in_json(tmp_path: Path) -> None:
    """A refused setting was a plain line among JSON logs, one no log shipper parses."""
    env = cli_env(LOG_FORMAT="json", LOG_LEVEL="LOUD", MAX_NEW_TOKENS="abc")
    result = run_cli("chat", cwd=tmp_path, env=env)
    assert result.returncode == 2
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [entry["level"] for entry in entries] == ["ERROR", "ERROR"]
    assert {entry["message"].split(":")[0] for entry in entries} == {
        "invalid setting LOG_LEVEL",
        "invalid setting MAX_NEW_TOKENS",
    }


def test_slack_http_mode_with_the_ops_server_off_names_http_port(tmp_path: Path) -> None:
    """Slack's HTTP events are served on HTTP_PORT: HTTP_PORT=0 with SLACK_SIGNING_SECRET
    stops the start at once (before the model loads), naming both."""
    env = cli_env(SLACK_BOT_TOKEN="xoxb-1", SLACK_SIGNING_SECRET="s", HTTP_PORT="0")
    result = run_cli("run", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "SLACK_SIGNING_SECRET" in result.stderr and "HTTP_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_taken_http_port_stops_the_start_naming_it(tmp_path: Path) -> None:
    """The ops server starts first (before Redis and the model): a port in use is one line."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = cli_env(SLACK_BOT_TOKEN="xoxb-1", SLACK_APP_TOKEN="xapp-1", HTTP_PORT=str(port))
        result = run_cli("run", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert f"HTTP_PORT={port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_setting_is_one_line_naming_it(tmp_path: Path) -> None:
    """An invalid value fails at start (exit 2) with one line naming the setting."""
    result = run_cli("chat", cwd=tmp_path, env=cli_env(MAX_NEW_TOKENS="abc"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "MAX_NEW_TOKENS" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_mistake_in_threadbot_yml_stops_the_start_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "threadbot.yml").write_text("access:\n  deny: reply\n  amdins: [U1]\n")
    result = run_cli("run", cwd=tmp_path, env=cli_env(DISCORD_BOT_TOKEN="x"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "threadbot.yml line 3: invalid setting access.amdins: Extra inputs are not permitted"
    ]


def test_typo_in_dotenv_is_refused_by_name(tmp_path: Path) -> None:
    """A `.env` in the working directory is read, and an unknown key in it fails start."""
    (tmp_path / ".env").write_text("MAX_NEW_TOKEN=64\n")
    result = run_cli("chat", cwd=tmp_path, env=cli_env())
    assert result.returncode == 2
    assert "MAX_NEW_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["chat", "run"])
def test_a_dotenv_not_in_utf8_stops_the_start_with_one_line(tmp_path: Path, command: str) -> None:
    (tmp_path / ".env").write_text("DISCORD_BOT_TOKEN=x\n", encoding="utf-16")
    result = run_cli(command, cwd=tmp_path, env=cli_env())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [".env: not UTF-8 text: invalid start byte"]


@pytest.mark.parametrize("why", [NOT_OURS, "Is a directory"])
def test_an_unreadable_dotenv_stops_the_start_with_one_line(tmp_path: Path, why: str) -> None:
    unreadable_dotenv(tmp_path / ".env", why)
    result = run_cli("run", cwd=tmp_path, env=cli_env())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f".env: cannot be read: {why}"]


def test_hugging_face_lines_in_dotenv_pass_through_to_the_hub_library(tmp_path: Path) -> None:
    """HF_TOKEN, HF_HOME, HF_HUB_OFFLINE in `.env` do not stop the start; they are handed
    on to the environment (named at DEBUG, their values never logged)."""
    (tmp_path / ".env").write_text(
        "HF_TOKEN=hf_do_not_log_me\nHF_HOME=./hf\nHF_HUB_OFFLINE=1\nLOG_LEVEL=DEBUG\n"
    )
    env = {k: v for k, v in cli_env().items() if not k.startswith("HF_")}
    result = run_cli("run", cwd=tmp_path, env=env)
    assert result.returncode == 2  # it went on to say that no platform is configured
    assert "DISCORD_BOT_TOKEN" in result.stderr and "Traceback" not in result.stderr
    assert "Hugging Face libraries: HF_TOKEN, HF_HOME, HF_HUB_OFFLINE" in result.stderr
    assert "hf_do_not_log_me" not in result.stderr


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("localhost:6379", "starts with redis://"),
        ("redis://:hunter2/pw@host/0", "percent-encode"),
        ("redis://:12/hunter2@redis:6379/0", "percent-encode"),  # it went to localhost:12
        ("redis://:p@ss/hunter2@localhost:6379/0", "percent-encode"),  # it went to host "ss"
        ("redis://:hun?ter2@redis:6379/0", "percent-encode"),
        ("redis://user:hunter2@localhost:99999/0", "from 1 to 65535"),
        # A rediss:// URL's option kept with redis://, a misspelt one: a TypeError's
        # traceback once the first connection was made.
        ("redis://:hunter2@127.0.0.1:6390/0?ssl_cert_reqs=none", "take (ssl_cert_reqs)"),
        ("redis://localhost:6379/0?socket_timout=5&password=hunter2", "(socket_timout)"),
        # A database that is no number was taken for db 0, another's data; ?db=x was
        # said to be a password's fault.
        ("redis://:hunter2@127.0.0.1:1/db1", "its database is not a number"),
        ("redis://:hunter2@127.0.0.1:1/-1", "its database is not a number"),
        ("redis://:hunter2@127.0.0.1:1/0?db=x", "its db after the ? is not a number"),
    ],
)
def test_a_redis_url_no_restart_can_fix_is_a_setting(tmp_path: Path, url: str, said: str) -> None:
    """A URL without its scheme, with a password not percent-encoded, or with an option
    redis-py does not take, exited 1 as if Redis were out of reach, and a service
    (RestartPreventExitStatus=2) restarted it."""
    result = run_cli("chat", cwd=tmp_path, env=cli_env(REDIS_URL=url, DATA_DIR=str(tmp_path)))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("invalid setting REDIS_URL:") and said in line
    assert "hunter2" not in line


def test_unreachable_redis_names_redis_url_and_hides_the_password(tmp_path: Path) -> None:
    """A bad REDIS_URL fails start (exit 1) with one readable line, password redacted."""
    env = cli_env(REDIS_URL="redis://:hunter2secret@127.0.0.1:1/0", DATA_DIR=str(tmp_path))
    result = run_cli("chat", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2secret" not in result.stderr


def test_a_redis_that_refuses_writes_fails_start_with_one_line(tmp_path: Path) -> None:
    """REDIS_URL at a read-only replica answers PING, then refuses the first write: one
    line naming REDIS_URL, without its password, where it was a traceback."""
    from processes import RedisServer

    server = RedisServer(tmp_path / "redis", password="hunter2secret")
    server.start()
    try:
        asyncio.run(server.refuse_writes())
        env = cli_env(REDIS_URL=server.url, DATA_DIR=str(tmp_path / "data"), MODEL="bundled")
        result = run_cli("chat", cwd=tmp_path, env=env, timeout=CHAT_TIMEOUT)
    finally:
        server.kill()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("threadbot:")]
    assert "REDIS_URL=redis://:***@" in line and "refuses writes" in line
    assert "hunter2secret" not in result.stderr


def test_missing_model_folder_names_model(tmp_path: Path, redis_url: str) -> None:
    """MODEL naming a folder that does not exist fails start with one line naming MODEL,
    and exit status 2, as a bad setting does: a restart would not fix it."""
    missing = tmp_path / "no-such-model"
    env = cli_env(MODEL=str(missing), REDIS_URL=redis_url, DATA_DIR=str(tmp_path / "data"))
    result = run_cli("chat", cwd=tmp_path, env=env, timeout=CHAT_TIMEOUT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("threadbot:")]
    assert len(errors) == 1, result.stderr
    assert f"MODEL={missing}" in errors[0]
    assert result.stdout == ""


@pytest.mark.parametrize("setting", ["DATA_DIR", "THREADBOT_CONFIG", "MODEL"])
def test_a_path_under_a_user_not_here_names_its_setting(
    tmp_path: Path, redis_url: str, setting: str
) -> None:
    """`~someone/...` where there is no such user: pathlib's RuntimeError ended the start in
    a traceback, with status 1, so a service restarted it again and again."""
    path = "~no-such-user-here/threadbot"
    settings = {"REDIS_URL": redis_url, "DATA_DIR": str(tmp_path / "data"), setting: path}
    result = run_cli("chat", cwd=tmp_path, env=cli_env(**settings), timeout=CHAT_TIMEOUT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if "~no-such-user-here" in line]
    assert setting in error and "no user's home on this machine" in error


def test_a_server_out_of_reach_fails_start_with_status_1(tmp_path: Path, redis_url: str) -> None:
    """An OpenAI-compatible server still starting may answer after a restart: status 1."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    env = cli_env(INFERENCE_URL=url, REDIS_URL=redis_url, DATA_DIR=str(tmp_path / "data"))
    result = run_cli("chat", cwd=tmp_path, env=env, timeout=CHAT_TIMEOUT)
    assert result.returncode == 1
    assert f"INFERENCE_URL={url} cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr


# --- With the bundled model ---------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path, bundled_engine: object, bundled_cache: Path) -> Path:
    """A fresh DATA_DIR whose `models/` is the session's converted bundled model (and
    `kernels/` the session's decode kernel: `data_dir_with`).

    Depends on `bundled_engine` so the one-time conversion happens in this process first.
    """
    return data_dir_with(bundled_cache, tmp_path / "data")


def chat(data_dir: Path, conversation: str, input: str, **settings: str) -> Result:
    """`threadbot chat` on the bundled model and the CLI's own embedded Redis (no REDIS_URL)."""
    defaults = {"MODEL": "bundled", "MAX_NEW_TOKENS": "48", "DATA_DIR": str(data_dir)}
    env = cli_env(**(defaults | settings))
    result = run_cli(
        "chat",
        "--conversation",
        conversation,
        cwd=data_dir.parent,
        env=env,
        input=input,
        timeout=CHAT_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


async def stored(data_dir: Path, conversation_id: str) -> list[dict[str, str]]:
    """What the CLI left in its embedded Redis, read after it exited."""
    with EmbeddedRedis(data_dir=data_dir) as server:
        async with Redis.from_url(server.url, decode_responses=True) as client:
            store = ConversationStore(redis=client, max_messages=50, ttl_seconds=3600)
            return [dict(message) for message in await store.load(conversation_id)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("leave", "status"),
    [(b"\x03", 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129), (b"\x04", 0)],
)
def test_a_chat_ended_at_its_prompt_gives_the_terminal_back_as_it_was(
    data_dir: Path, leave: bytes | signal.Signals, status: int
) -> None:
    """Ctrl-C (or SIGTERM, or Ctrl-D) at `you>`, where readline holds the terminal raw on
    its own thread: the terminal echoes again after, where the shell went on typing blind;
    the shell's prompt starts a line of its own. Its terminal closed (SIGHUP): as SIGTERM,
    where the signal killed it and left its embedded redis-server running."""
    import termios

    env = cli_env(MODEL="bundled", MAX_NEW_TOKENS="8", DATA_DIR=str(data_dir))
    with chat_in_a_terminal(data_dir, env) as (pid, terminal):
        shown = read_until(terminal, b"you> ")
        if isinstance(leave, bytes):
            os.write(terminal, leave)
        else:
            os.kill(pid, leave)
        wait_status, output = exited(pid, terminal)
        shown += output
        assert os.waitstatus_to_exitcode(wait_status) == status
        assert termios.tcgetattr(terminal)[3] & termios.ECHO
        assert shown.rpartition(b"you> ")[2].startswith(b"\r\n"), shown[-200:]


@pytest.mark.slow
def test_a_chat_whose_reader_goes_stops_quietly(data_dir: Path) -> None:
    """`threadbot chat < questions | head -c 3`: once no one reads its answers, it stops,
    with no traceback, where it answered every line left, with two each."""
    env = cli_env(MODEL="bundled", MAX_NEW_TOKENS="24", DATA_DIR=str(data_dir))
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "chat", "--conversation", "piped"],
        cwd=data_dir.parent, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("Say hi.\nSay hello.\nSay bye.\n")
        process.stdin.close()
        assert process.stdout.read(3)
        process.stdout.close()  # as `head -c 3` does
        process.wait(timeout=CHAT_TIMEOUT)
        assert process.stderr is not None
        stderr = process.stderr.read()
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in stderr
    assert len(re.findall(r"answered turn", stderr)) == 1


@pytest.mark.slow
def test_piped_chat_answers_on_stdout(data_dir: Path) -> None:
    """Piped input: each line is a turn, the answer goes to stdout, logs to stderr, exit 0."""
    result = chat(data_dir, "france", f"{FRANCE}\n")
    assert "paris" in result.stdout.lower()
    assert "you>" not in result.stdout  # no interactive prompt when piped
    assert "bot.runtime" not in result.stdout  # logs stay off stdout...
    assert "bot.runtime" in result.stderr  # ...and go to stderr


@pytest.mark.slow
async def test_conversation_continues_across_runs(data_dir: Path) -> None:
    """Without REDIS_URL the embedded Redis keeps history in DATA_DIR: a second run continues."""
    name = "trip"
    conversation = console_id(name)
    chat(data_dir, name, f"{FRANCE}\n")

    second = chat(data_dir, name, "And of Italy?\n", LOG_LEVEL="DEBUG")
    assert f"prompt for {conversation}: 3 messages" in second.stderr  # user, assistant, user

    messages = await stored(data_dir, conversation)
    assert [message["role"] for message in messages] == ["user", "assistant"] * 2
    assert messages[0]["content"] == FRANCE
    assert messages[2]["content"] == "And of Italy?"
    assert "paris" in messages[1]["content"].lower()

    # Another login's chat of that name is its own: on a Redis a team shares, nobody
    # continues, or resumes, someone else's.
    other = chat(data_dir, name, "And of Spain?\n", LOG_LEVEL="DEBUG", LOGNAME="someone-else")
    assert f"prompt for {console_id(name, 'someone-else')}: 1 messages" in other.stderr
    assert len(await stored(data_dir, conversation)) == 4


@pytest.mark.slow
def test_json_logs_every_stderr_line_parses(data_dir: Path) -> None:
    """LOG_FORMAT=json, at DEBUG: each line on stderr is one JSON object (no progress bar,
    no library's own format), the answer still on stdout."""
    result = chat(data_dir, "json", f"{FRANCE}\n", LOG_FORMAT="json", LOG_LEVEL="DEBUG")
    assert "paris" in result.stdout.lower()
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert {entry["logger"] for entry in entries} >= {"bot.runtime", "bot.turn_report"}
    assert all(entry.keys() >= {"time", "level", "logger", "message"} for entry in entries)


@pytest.mark.slow
def test_a_terminal_that_cannot_show_a_character_still_gets_the_reply(data_dir: Path) -> None:
    """The help's bullets on an ASCII (or Latin-1) terminal: the reply was lost, and a
    traceback logged."""
    result = chat(data_dir, "ascii", "/help\n", PYTHONIOENCODING="ascii")
    assert "? `stats`: turns, tokens" in result.stdout  # a bullet it cannot show: "?"


@pytest.mark.parametrize(
    ("closed", "said"),
    [(0, "standard input is closed: nothing to read"),
     (1, "standard output is closed: nowhere to answer")],
)  # fmt: skip
def test_a_chat_with_its_standard_input_or_output_closed_says_so(
    tmp_path: Path, closed: int, said: str
) -> None:
    """`threadbot chat <&-` or `>&-`: one line, where it was a traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat"], cwd=tmp_path, env=cli_env(MODEL="bundled"),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=FAST_TIMEOUT,
        preexec_fn=lambda: os.close(closed),
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"threadbot chat: {said}"]


@pytest.mark.slow
def test_reset_clears_the_conversation(data_dir: Path) -> None:
    """`/reset` clears the conversation: the next turn's prompt holds that turn alone."""
    conversation = console_id("reset")
    result = chat(data_dir, "reset", f"{FRANCE}\n/reset\nHello\n", LOG_LEVEL="DEBUG")
    assert "Conversation cleared" in result.stdout
    assert prompt_sizes(result.stderr, conversation) == [1, 1]  # France, then Hello alone


@pytest.mark.slow
async def test_empty_line_gets_the_empty_reply_and_no_generation(data_dir: Path) -> None:
    """A blank piped line asks nothing; one of only invisible characters is answered
    with the 'empty message' reply. Nothing is generated."""
    conversation = console_id("blank")
    result = chat(data_dir, "blank", "\n   \n\u200b\n", LOG_LEVEL="DEBUG")
    assert result.stdout == f"{replies.empty_message()}\n"
    assert prompt_sizes(result.stderr, conversation) == []
    assert await stored(data_dir, conversation) == []


# At the end of its input, a chat gives a resumed answer the shutdown grace: as long as
# the chat itself may take, however busy the machine.
RESUMING = {"MAX_NEW_TOKENS": "100", "TURN_LEASE_S": "1", "SHUTDOWN_GRACE_S": str(CHAT_TIMEOUT)}


async def killed_mid_answer(data_dir: Path, conversation: str, **settings: str) -> None:
    """kill -9 of a chat while it writes an answer, and its lease left to run out."""
    env = cli_env(MODEL="bundled", DATA_DIR=str(data_dir), **RESUMING | settings)
    killed = subprocess.Popen(
        [sys.executable, "-m", "bot", "chat", "--conversation", conversation],
        cwd=data_dir.parent, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert killed.stdin is not None and killed.stdout is not None
        killed.stdin.write(b"Write a long story about a dragon.\n")
        killed.stdin.flush()
        ready, _, _ = select.select([killed.stdout], [], [], CHAT_TIMEOUT)
        assert ready, "no answer began"
        os.read(killed.stdout.fileno(), 10)  # the answer is streaming
    finally:
        killed.kill()
        killed.wait()
    await asyncio.sleep(1.5)  # the lease runs out


def read_until(terminal: int, marker: bytes) -> bytes:
    """What a pseudo-terminal shows until `marker` (bounded: CHAT_TIMEOUT)."""
    shown = b""
    for _ in range(CHAT_TIMEOUT * 10):
        if select.select([terminal], [], [], 0.1)[0]:
            shown += os.read(terminal, 65536)
        if marker in shown:
            return shown
    raise AssertionError(f"no {marker!r} in {shown[-2000:]!r}")


def exited(pid: int, terminal: int) -> tuple[int, bytes]:
    """The wait status of a child on a pseudo-terminal once it exits (bounded: about 60 s),
    and what it wrote meanwhile."""
    shown = b""
    for _ in range(1200):
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return wait_status, shown
        if select.select([terminal], [], [], 0.05)[0]:
            with contextlib.suppress(OSError):
                shown += os.read(terminal, 65536)
        time.sleep(0.05)  # select answers at once once the child has closed its side
    raise AssertionError("the chat did not exit")


@contextlib.contextmanager
def chat_in_a_terminal(
    data_dir: Path, env: dict[str, str], *args: str
) -> Iterator[tuple[int, int]]:
    """`threadbot chat ARGS` on a pseudo-terminal: its pid and the terminal's side of ours;
    killed at the end if it still runs."""
    import pty

    pid, terminal = pty.fork()
    if pid == 0:  # the child: the chat, on the pseudo-terminal
        os.chdir(data_dir.parent)
        os.execve(sys.executable, [sys.executable, "-m", "bot", "chat", *args], env)
    try:
        yield pid, terminal
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.close(terminal)


def ended_at_its_prompt(pid: int, terminal: int) -> int:
    """Ctrl-D at `you>`: the chat's exit status."""
    os.write(terminal, b"\x04")
    wait_status, _ = exited(pid, terminal)
    return os.waitstatus_to_exitcode(wait_status)


def stopped_by_ctrl_c(pid: int, terminal: int) -> None:
    """Ctrl-C while an answer is written: it ends there, marked stopped, `you>` comes back,
    and the chat goes on (Ctrl-D then ends it, exit 0)."""
    os.write(terminal, b"\x03")
    shown = read_until(terminal, b"you> ")
    assert ended_at_its_prompt(pid, terminal) == 0
    note = replies.stopped().strip("_")
    assert shown.decode().replace("\r\n", "\n").endswith(f"\n\n{note}\nyou> "), shown


@pytest.mark.slow
async def test_a_chat_killed_mid_answer_is_answered_by_the_next_chat(data_dir: Path) -> None:
    """Injected: kill -9 of `threadbot chat` while it writes an answer (its embedded
    redis-server lives on, holding DATA_DIR). Holds: the next chat of that conversation
    stops the orphaned server, and answers the question in full, once."""
    await killed_mid_answer(data_dir, "crash")
    result = chat(data_dir, "crash", "", **RESUMING)
    assert "left behind by a threadbot that died" in result.stderr
    assert "resuming turn" in result.stderr
    messages = await stored(data_dir, console_id("crash"))
    assert [message["role"] for message in messages] == ["user", "assistant"]
    assert messages[1]["content"] in result.stdout  # printed in full in this chat


@pytest.mark.slow
async def test_an_answer_resumed_as_a_chat_starts_is_shown_before_its_prompt(
    data_dir: Path,
) -> None:
    """In a terminal, the answer an earlier chat left unfinished comes first, then `you>`:
    it was streamed after the prompt, on its line, and no prompt followed it."""
    await killed_mid_answer(data_dir, "crash")
    env = cli_env(MODEL="bundled", DATA_DIR=str(data_dir), **RESUMING)
    with chat_in_a_terminal(data_dir, env, "--conversation", "crash") as (pid, terminal):
        shown = read_until(terminal, b"you> ")
        ended_at_its_prompt(pid, terminal)
    messages = await stored(data_dir, console_id("crash"))
    assert [message["role"] for message in messages] == ["user", "assistant"]
    before_the_prompt = shown.partition(b"you> ")[0].decode().replace("\r\n", "\n")
    assert messages[1]["content"] in before_the_prompt


@pytest.mark.slow
async def test_ctrl_c_stops_an_answer_resumed_as_a_chat_starts(data_dir: Path) -> None:
    """The answer an earlier chat left unfinished is stopped by Ctrl-C as any answer is,
    and the chat goes on: it ended the chat, and the next one wrote it all again."""
    long = {"MAX_NEW_TOKENS": "400", "LOG_LEVEL": "WARNING"}  # the terminal shows the chat
    await killed_mid_answer(data_dir, "crash", **long)
    env = cli_env(MODEL="bundled", DATA_DIR=str(data_dir), **RESUMING | long)
    with chat_in_a_terminal(data_dir, env, "--conversation", "crash") as (pid, terminal):
        read_until(terminal, b"that died\r\n")  # its redis-server stopped: the chat starts
        read_until(terminal, b"ragon")  # the resumed story is being written
        stopped_by_ctrl_c(pid, terminal)
    _question, stopped = await stored(data_dir, console_id("crash"))
    assert stopped["content"].endswith(f"\n\n{replies.stopped()}")


@pytest.mark.slow
async def test_ctrl_c_while_an_answer_is_written_stops_it_and_the_chat_goes_on(
    data_dir: Path,
) -> None:
    """In a terminal, Ctrl-C during an answer stops it where it is, as the Stop button
    does (kept, and remembered, marked stopped), and `you>` comes back; it ended the chat,
    leaving the answer to the next chat, written again in full, each time."""
    env = cli_env(
        MODEL="bundled", MAX_NEW_TOKENS="400", DATA_DIR=str(data_dir), LOG_LEVEL="WARNING"
    )  # the terminal shows the chat alone
    with chat_in_a_terminal(data_dir, env) as (pid, terminal):
        read_until(terminal, b"you> ")
        os.write(terminal, b"Write a long story about a dragon.\r")
        read_until(terminal, b"dragon.\r\n")  # the line, echoed
        for _ in range(CHAT_TIMEOUT * 10):  # until the answer's first words are out
            if select.select([terminal], [], [], 0.1)[0]:
                break
        stopped_by_ctrl_c(pid, terminal)
    question, stopped = await stored(data_dir, console_id("default"))
    assert question["content"] == "Write a long story about a dragon."
    assert stopped["content"].endswith(f"\n\n{replies.stopped()}")


@pytest.mark.parametrize("platform", ["slack", "discord"])
async def test_a_token_refused_stops_the_start_before_the_model_loads(
    tmp_path: Path, redis_url: str, platform: str
) -> None:
    """A mistyped token was found once the model was loaded: at a first start, after a
    download and a load, minutes on; now it is asked first, and the start ends with the
    refusal's one line, exit 2, the model never loaded."""
    from fake_discord import FakeDiscord
    from fake_slack import FakeSlack

    async with FakeSlack() as slack, FakeDiscord() as discord:
        tokens = {
            "slack": {"SLACK_BOT_TOKEN": "xoxb-revoked", "SLACK_APP_TOKEN": slack.app_token},
            "discord": {"DISCORD_BOT_TOKEN": "not-the-token"},
        }[platform]
        err = await start_refused(
            tmp_path, **tokens, SLACK_API_URL=slack.api_url, DISCORD_API_URL=discord.api_url,
            MODEL="bundled", REDIS_URL=redis_url,
        )  # fmt: skip
    assert "Loading model" not in err
    [line] = [line for line in err.splitlines() if line.startswith("threadbot:")]
    assert f"refused {platform.upper()}_BOT_TOKEN" in line


@pytest.mark.parametrize("platform", ["slack", "discord"])
async def test_a_platform_silent_at_the_token_check_is_left_to_its_start(
    monkeypatch, platform: str
) -> None:
    """Its packets dropped (an egress firewall): the check waited through the SDK's
    timeouts and retries, minutes with no model loading, and asked again after it."""
    from discord.http import Route

    from adapters.discord_adapter import DiscordAdapter
    from adapters.slack_adapter import SlackAdapter
    from bot import cli
    from bot.config import Settings

    monkeypatch.setattr(cli, "TOKEN_CHECK_S", 0.5)
    monkeypatch.setattr(Route, "BASE", Route.BASE)  # the check points discord.py at the fake
    with silent_proxy() as silent:
        settings = Settings(
            _env_file=None, slack_bot_token="xoxb-1", slack_app_token="xapp-1",
            slack_api_url=f"{silent}/api/", discord_bot_token="t", discord_api_url=silent,
        )  # fmt: skip
        adapter = {"slack": SlackAdapter, "discord": DiscordAdapter}[platform]
        async with asyncio.timeout(5):
            await cli._tokens_checked([adapter], settings)


def stalled_hub_env(data_dir: Path, proxy: str) -> dict[str, str]:
    """Settings whose model is fetched from the hub through `proxy` (`silent_proxy`)."""
    env = cli_env(MODEL="someone/some-model", DATA_DIR=str(data_dir))
    for name in ("HF_HUB_OFFLINE", *PROXY_NAMES):
        env.pop(name, None)
    return env | {"HTTPS_PROXY": proxy, "HTTP_PORT": "0"}


def test_ctrl_c_while_doctor_fetches_the_model_ends_it_at_once(tmp_path: Path) -> None:
    """Ctrl-C in the model check, whose download a stalled hub holds up: 130 at once, where
    it waited for the download's thread, up to HUB_TIMEOUT_S (30 s) a request."""
    with silent_proxy() as proxy:
        process = subprocess.Popen(
            [sys.executable, "-m", "bot", "doctor"], cwd=tmp_path,
            env=stalled_hub_env(tmp_path, proxy), text=True, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            for line in process.stdout:  # ends with the process, if it never gets that far
                if "redis:" in line:  # the check before the model's
                    break
            time.sleep(3)  # the model check asks the hub
            process.send_signal(signal.SIGINT)
            process.wait(timeout=15)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130


@pytest.mark.parametrize("command", ["chat", "run"])
def test_a_stop_while_the_model_downloads_does_not_wait_for_the_download(
    tmp_path: Path, command: str
):
    """SIGTERM while the hub (here a proxy that takes the connection and never answers)
    holds up the model's download: the chat, or the service starting, stops at once,
    where it waited for the download's thread, up to HUB_TIMEOUT_S (30 s) a request; and
    its embedded redis-server stops with it (`run` was killed outright, and left it)."""
    with silent_proxy() as proxy:
        env = stalled_hub_env(tmp_path, proxy) | {"DISCORD_BOT_TOKEN": "not-used"}
        process = subprocess.Popen(
            [sys.executable, "-m", "bot", command], cwd=tmp_path, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # so a hung run takes its redis-server down with it
        )  # fmt: skip
        server = None
        try:
            assert process.stderr is not None
            for line in process.stderr:  # ends with the process, if it never gets that far
                if "Fetching someone/some-model" in line:
                    break
            holder = (tmp_path / LOCK_FILE).read_text()
            server = int(HOLDER.fullmatch(holder.strip())["server"])
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            if server is not None and (orphaned := _alive(server)):
                os.kill(server, signal.SIGKILL)
    assert process.returncode == 143
    assert server is not None and not orphaned


async def test_a_platform_token_refused_at_start_is_a_setting(tmp_path: Path, redis_url: str):
    """Slack refused SLACK_BOT_TOKEN once the answers' side was up (a model's load, here a
    server's): exit 1, so a supervisor started it again, a whole start each time, for a
    refusal that no restart fixes. Now 2, as for a bad setting."""
    from fake_openai import FakeOpenAI
    from fake_slack import FakeSlack

    async with FakeSlack() as slack, FakeOpenAI() as server:
        err = await start_refused(
            tmp_path, SLACK_BOT_TOKEN="xoxb-revoked", SLACK_APP_TOKEN=slack.app_token,
            SLACK_API_URL=slack.api_url, INFERENCE_URL=server.url, REDIS_URL=redis_url,
        )  # fmt: skip
    [line] = [line for line in err.splitlines() if line.startswith("threadbot:")]
    assert "Slack refused SLACK_BOT_TOKEN (invalid_auth)" in line


async def start_refused(tmp_path: Path, **settings: str) -> str:
    """The stderr of `threadbot run` with `settings`, a start that must end with exit 2."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", cwd=tmp_path,
        env=cli_env(**settings, DATA_DIR=str(tmp_path / "data")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2, err.decode()
    return err.decode()
