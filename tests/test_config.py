"""Settings: defaults, environment and `.env` overrides, and errors that name the setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import NOT_OURS, unreadable_dotenv
from pydantic import ValidationError

from bot.batching import PREFILL_FIRST_STEPS
from bot.config import (
    ConfigError,
    Settings,
    describe_error,
    export_hugging_face_variables,
    is_for_compose,
    load_settings,
    misspelt_settings,
)


@pytest.fixture(autouse=True)
def own_working_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A working directory of the test's own, for the `.env` and team file it writes (the
    developer's settings are kept out by conftest's `only_the_tests_settings`)."""
    monkeypatch.chdir(tmp_path)


def settings_error(**env: str) -> str:
    """`describe_error`'s text for settings that must fail (given as environment variables)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with pytest.raises(ValidationError) as info:
            Settings()
    return describe_error(info.value)


def test_defaults() -> None:
    """README Configuration: each setting's documented default when nothing is set."""
    settings = Settings()
    assert settings.model is None
    assert settings.model_file is None
    assert settings.device == "auto"
    assert settings.dtype == "auto"
    assert settings.quantize == "none"
    assert settings.max_new_tokens == 512
    assert settings.max_context_tokens is None
    assert settings.system_prompt is None
    assert settings.redis_url is None
    assert settings.data_dir == Path("data")
    assert settings.history_max_messages == 50
    assert settings.history_ttl_days == 30
    assert settings.max_input_chars == 16000
    assert settings.queue_max == 32
    assert settings.max_pending_per_user == 4
    assert (settings.max_batch, settings.max_step_tokens, settings.kv_cache_mb) == (32, 128, 512)
    assert settings.prefill_first_steps == PREFILL_FIRST_STEPS  # the batcher's own default
    assert settings.request_timeout == 300
    assert settings.slack_bot_token is None
    assert settings.discord_bot_token is None
    assert settings.log_level == "INFO"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every setting is an environment variable of the same name."""
    monkeypatch.setenv("MODEL", "bundled")
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("MAX_NEW_TOKENS", "48")
    monkeypatch.setenv("MAX_CONTEXT_TOKENS", "1024")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/2")
    monkeypatch.setenv("DATA_DIR", "/srv/threadbot")
    monkeypatch.setenv("HISTORY_MAX_MESSAGES", "10")
    monkeypatch.setenv("REQUEST_TIMEOUT", "12.5")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    settings = Settings()
    assert settings.model == "bundled"
    assert settings.device == "cpu"
    assert settings.max_new_tokens == 48
    assert settings.max_context_tokens == 1024
    assert settings.redis_url == "redis://example:6379/2"
    assert settings.data_dir == Path("/srv/threadbot")
    assert settings.history_max_messages == 10
    assert settings.request_timeout == 12.5
    assert settings.log_level == "DEBUG"


def test_variable_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings module promise: environment variable names are case-insensitive."""
    monkeypatch.setenv("max_new_tokens", "7")
    assert Settings().max_new_tokens == 7


def test_dotenv_is_read_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Settings come from `.env` in the working directory; the environment takes precedence."""
    (tmp_path / ".env").write_text("MAX_NEW_TOKENS=64\nQUEUE_MAX=4\n")
    settings = Settings()
    assert (settings.max_new_tokens, settings.queue_max) == (64, 4)

    monkeypatch.setenv("MAX_NEW_TOKENS", "99")
    assert Settings().max_new_tokens == 99


def test_unknown_key_in_dotenv_is_rejected_by_name(tmp_path: Path) -> None:
    """A typo in `.env` fails at start, naming the unknown key, instead of being ignored."""
    (tmp_path / ".env").write_text("MAX_NEW_TOKEN=64\n")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "MAX_NEW_TOKEN" in describe_error(info.value)


def test_unrelated_environment_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only `.env` is strict: the shell's other variables (PATH, HOME, ...) never fail start."""
    monkeypatch.setenv("THREADBOT_NOT_A_SETTING", "x")
    assert Settings().max_new_tokens == 512


def test_a_near_miss_of_a_setting_in_the_environment_is_named_with_the_setting() -> None:
    """Docker Compose's `env_file` and systemd's `EnvironmentFile` turn `.env` into
    environment variables, where an unknown name is ignored: a typo gets a warning line."""
    assert misspelt_settings({"MAX_NEW_TOKEN": "1024", "QUEUE_MAX": "4"}) == [
        "MAX_NEW_TOKEN is not a setting (did you mean MAX_NEW_TOKENS?); it is ignored"
    ]


def test_a_near_miss_of_a_nested_setting_is_named_with_the_setting() -> None:
    """A typo in the section's name is ignored (one under it, `ACCESS__DENYY`, is refused
    at start)."""
    assert misspelt_settings({"ACCES__DENY": "silent"}) == [
        "ACCES__DENY is not a setting (did you mean ACCESS__DENY?); it is ignored"
    ]


def test_other_variables_and_exact_settings_are_not_taken_for_typos() -> None:
    """The environment is shared with the shell, Python, the locale, the Hugging Face
    libraries and Docker Compose; lower-case names are nobody's settings by convention."""
    environ = {
        "PATH": "/usr/bin",
        "HOSTNAME": "3f2a9c1d",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HF_HOME": "/data/hf",
        "PYTHON_VERSION": "3.11.9",
        "COMPOSE_PROJECT_NAME": "bot",
        "MODEL_NAME": "mine",
        "max_new_token": "7",
        "MAX_NEW_TOKENS": "1024",
        "REDIS_URL": "redis://redis:6379/0",
        "ACCESS__DENY": "silent",
        "ACCESS__SLACK__USERS__ALLOW": '["U1"]',
        "ACCESS__DENYY": "silent",  # refused by the settings themselves, not ignored
    }
    assert misspelt_settings(environ) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_NEW_TOKENS", "abc"),
        ("MAX_NEW_TOKENS", "0"),
        ("DEVICE", "gpu"),
        ("DTYPE", "float8"),
        ("MAX_CONTEXT_TOKENS", "10"),
        ("HISTORY_MAX_MESSAGES", "1"),
        ("HISTORY_TTL_DAYS", "0"),
        ("HISTORY_TTL_DAYS", "0.000001"),  # under a minute: under a second, it crashed
        ("HISTORY_TTL_DAYS", "1e12"),  # past what Redis's EXPIRE takes: every turn failed
        ("TURN_LEASE_S", "0.001"),  # a lock lapsing between its renewals
        ("TURN_LEASE_S", "1e16"),  # past what Redis's PX takes: a traceback at the start
        ("JOB_CLAIM_IDLE_S", "1e16"),
        ("SHUTDOWN_GRACE_S", "1e16"),
        ("QUEUE_MAX", "0"),
        ("MAX_BATCH", "0"),
        ("MAX_STEP_TOKENS", "8"),
        ("PREFILL_FIRST_STEPS", "-1"),
        ("KV_CACHE_MB", "-1"),
        ("MAX_PENDING_PER_USER", "0"),
        ("REQUEST_TIMEOUT", "-1"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_invalid_value_names_the_setting(name: str, value: str) -> None:
    """Invalid values fail at start with one line naming the setting as the user wrote it."""
    message = settings_error(**{name: value})
    assert message.splitlines() == [message]
    assert message.startswith(f"invalid setting {name}:")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_number_that_is_not_finite_is_refused(value: str) -> None:
    """`inf` days would pass as more than 0, then fail when the service starts."""
    assert settings_error(HISTORY_TTL_DAYS=value).startswith("invalid setting HISTORY_TTL_DAYS:")


def test_each_bad_setting_gets_its_own_line() -> None:
    """`describe_error`: one line per bad setting, so all mistakes show at once."""
    lines = settings_error(MAX_NEW_TOKENS="abc", DEVICE="gpu").splitlines()
    assert len(lines) == 2
    assert any("MAX_NEW_TOKENS" in line for line in lines)
    assert any("DEVICE" in line for line in lines)


@pytest.mark.parametrize(("days", "seconds"), [("30", 2_592_000), ("0.5", 43_200), ("1", 86_400)])
def test_history_ttl_seconds(monkeypatch: pytest.MonkeyPatch, days: str, seconds: int) -> None:
    """HISTORY_TTL_DAYS is given in days (fractions allowed) and applied in seconds."""
    monkeypatch.setenv("HISTORY_TTL_DAYS", days)
    assert Settings().history_ttl_seconds == seconds


def test_platform_tokens_are_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets stay out of logs: a settings repr never shows a token."""
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-very-secret")
    monkeypatch.setenv("DISCORD_BOT_TOKEN", "discord-very-secret")
    settings = Settings()
    assert settings.slack_bot_token is not None
    assert settings.slack_bot_token.get_secret_value() == "xoxb-very-secret"
    assert "very-secret" not in repr(settings)
    assert "very-secret" not in str(settings)


def test_settings_are_read_once_and_frozen() -> None:
    """Settings are one object read at start and passed down; nobody changes them later."""
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.max_new_tokens = 1  # type: ignore[misc]


# --- a new admin's `.env`: other libraries' variables, empty values, contradictions -------


def test_hugging_face_variables_in_dotenv_are_not_refused(tmp_path: Path) -> None:
    """`.env` may hold the hub's own variables beside the settings (HF_TOKEN for a gated
    model, HF_HOME, HF_HUB_OFFLINE…); they are no settings of ours."""
    (tmp_path / ".env").write_text(
        "HF_TOKEN=hf_secret\nHF_HOME=/srv/hf\nHF_HUB_OFFLINE=1\nhf_hub_disable_telemetry=1\n"
        "TRANSFORMERS_VERBOSITY=error\nTOKENIZERS_PARALLELISM=false\nMAX_NEW_TOKENS=64\n"
        "HUGGING_FACE_HUB_TOKEN=hf_older_name\n"
    )
    assert Settings().max_new_tokens == 64


def test_docker_compose_variables_in_dotenv_are_not_refused(tmp_path: Path) -> None:
    """The same `.env` serves docker compose (`cp .env.example .env`): its variables do not
    stop a start outside Docker (systemd, `threadbot run`)."""
    (tmp_path / ".env").write_text(
        "COMPOSE_PROFILES=gpu,monitoring\nCOMPOSE_PROJECT_NAME=bot\n"
        "THREADBOT_PUBLISH=127.0.0.1:8080\nGRAFANA_ADMIN_PASSWORD=secret\nQUEUE_MAX=4\n"
    )
    assert Settings().queue_max == 4


def test_every_variable_docker_compose_reads_is_known_to_the_settings() -> None:
    """docker-compose.yml's `${NAME}`s come from the same `.env`: each is a setting, or one
    that `.env` may hold for Compose."""
    compose = (Path(__file__).parent.parent / "docker-compose.yml").read_text()
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", compose))
    assert names  # the pattern still finds them
    for name in names:
        assert name.lower() in Settings.model_fields or is_for_compose(name), name


def test_beside_hugging_face_variables_a_typo_is_still_refused_alone(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HF_TOKEN=hf_secret\nMAX_NEW_TOKEN=64\n")
    with pytest.raises(ValidationError) as info:
        Settings()
    [line] = describe_error(info.value).splitlines()
    assert line.startswith("invalid setting MAX_NEW_TOKEN:")


def test_hugging_face_variables_of_dotenv_reach_the_environment(tmp_path: Path) -> None:
    """The hub library reads its variables from the environment: `.env`'s are put there,
    in capitals (settings are case-insensitive), never over one the environment sets (an
    empty one counts as unset), and nothing else of `.env` is."""
    (tmp_path / ".env").write_text(
        "HF_TOKEN=hf_from_dotenv\nHF_HOME=/dotenv/hf\nhf_hub_offline=1\nHF_ENDPOINT=\n"
        "MAX_NEW_TOKENS=64\n"
    )
    environ = {"HF_HOME": "/real/hf", "HF_TOKEN": ""}
    exported = export_hugging_face_variables(tmp_path / ".env", environ=environ)
    assert sorted(exported) == ["HF_HUB_OFFLINE", "HF_TOKEN"]
    assert environ == {"HF_HOME": "/real/hf", "HF_TOKEN": "hf_from_dotenv", "HF_HUB_OFFLINE": "1"}


def test_without_a_dotenv_nothing_is_exported(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    assert export_hugging_face_variables(tmp_path / ".env", environ=environ) == []
    assert environ == {}


def test_a_dotenv_not_in_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    """A `.env` saved as UTF-16 (Windows editors): the start and the Hugging Face
    variables' export both stop with the same one line, not a UnicodeDecodeError."""
    (tmp_path / ".env").write_text("MAX_NEW_TOKENS=64\n", encoding="utf-16")
    for read in (load_settings, export_hugging_face_variables):
        with pytest.raises(ConfigError, match=r"^\.env: not UTF-8 text: invalid start byte$"):
            read()


@pytest.mark.parametrize(
    "line",
    ["SLACK_BOT_TOKEN xoxb-do-not-print", "WrappedPasswordEndDoNotPrint"],
    ids=["no =", "a bare word"],
)
def test_a_dotenv_line_that_is_no_setting_is_one_line_not_a_silent_skip(
    tmp_path: Path, line: str
) -> None:
    """`SLACK_BOT_TOKEN xoxb-…` (no `=`): python-dotenv skips it with a warning, and the
    token was silently unset; a value wrapped onto a line of its own was read as a name
    with no value, and printed as an unknown setting (a password's end). The line is
    named, its text is not."""
    (tmp_path / ".env").write_text(f"MAX_NEW_TOKENS=64\n{line}\n")
    for read in (load_settings, export_hugging_face_variables):
        with pytest.raises(ConfigError) as info:
            read()
        assert str(info.value) == ".env line 2: not a NAME=value line"


@pytest.mark.parametrize("why", [NOT_OURS, "Is a directory"])
def test_an_unreadable_dotenv_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """A `.env` not ours to read (root's, mode 640), or a directory (as Docker makes a
    bind mount of a file that is missing): one line, not a traceback nor settings left out
    in silence."""
    unreadable_dotenv(tmp_path / ".env", why)
    (tmp_path / "team.yml").write_text("max_new_tokens: 64\n")
    monkeypatch.setenv("THREADBOT_CONFIG", str(tmp_path / "team.yml"))  # no reason to read .env
    for read in (load_settings, export_hugging_face_variables):
        with pytest.raises(ConfigError) as info:
            read()
        assert str(info.value) == f".env: cannot be read: {why}"


def test_empty_values_in_dotenv_mean_unset(tmp_path: Path) -> None:
    """`MODEL=` as a template leaves it: the default, not an empty model name."""
    (tmp_path / ".env").write_text(
        "MODEL=\nMODEL_FILE=\nMAX_CONTEXT_TOKENS=\nMAX_NEW_TOKENS=\nSLACK_BOT_TOKEN=\n"
        "REDIS_URL=\nDATA_DIR=\nACCESS__DENY=\n"
    )
    settings = Settings()
    assert (settings.model, settings.model_file, settings.max_context_tokens) == (None,) * 3
    assert (settings.slack_bot_token, settings.redis_url) == (None, None)
    assert (settings.max_new_tokens, settings.data_dir) == (512, Path("data"))
    assert settings.access.deny == "reply"


def test_an_empty_environment_variable_means_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Unset, so `.env` (or the default) applies, as if the variable were not there."""
    (tmp_path / ".env").write_text("MAX_NEW_TOKENS=64\n")
    for name in ("MODEL", "MAX_CONTEXT_TOKENS", "MAX_NEW_TOKENS", "DISCORD_BOT_TOKEN"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert (settings.model, settings.max_context_tokens, settings.discord_bot_token) == (None,) * 3
    assert settings.max_new_tokens == 64


@pytest.mark.parametrize(
    ("env", "named", "other"),
    [
        ({"MAX_CONTEXT_TOKENS": "512"}, "MAX_CONTEXT_TOKENS", "MAX_NEW_TOKENS=512"),
        (
            {"MAX_CONTEXT_TOKENS": "100", "MAX_NEW_TOKENS": "200"},
            "MAX_CONTEXT_TOKENS",
            "MAX_NEW_TOKENS=200",
        ),
        ({"MAX_NEW_TOKENS": "8192"}, "MAX_CONTEXT_TOKENS", "MAX_NEW_TOKENS=8192"),  # default
        ({"MODEL_FILE": "model.Q4_K_M.gguf"}, "MODEL_FILE", "MODEL is unset"),
        ({"MODEL_FILE": "x.gguf", "MODEL": "bundled"}, "MODEL_FILE", "MODEL=bundled"),
        (  # aiohttp refused the pair at start with a bare ValueError, and a traceback
            {"INFERENCE_URL": "http://ops:pw@proxy/v1", "INFERENCE_API_KEY": "k"},
            "INFERENCE_API_KEY",
            "INFERENCE_URL",
        ),
    ],
)
def test_contradictory_settings_are_refused_naming_both(
    env: dict[str, str], named: str, other: str
) -> None:
    """A prompt budget of nothing would drop every turn's history; a MODEL_FILE with no
    MODEL to look in would be ignored: both stop the start, one line naming both."""
    message = settings_error(**env)
    assert message.splitlines() == [message]
    assert message.startswith(f"invalid setting {named}:")
    assert other in message


@pytest.mark.parametrize("url", ["vllm:8000/v1", "ops:hunter2@vllm:8000/v1", "http:///v1"])
def test_an_inference_url_without_its_scheme_or_host_is_refused_at_once(url: str) -> None:
    """It was taken for a URL of scheme `vllm` and said to be out of reach, exit 1 (so a
    service restarted it for ever), with the password it carries in that message."""
    message = settings_error(INFERENCE_URL=url)
    assert message.startswith("invalid setting INFERENCE_URL:") and "http://" in message
    assert "hunter2" not in message


@pytest.mark.parametrize("setting", ["SLACK_API_URL", "DISCORD_API_URL"])
@pytest.mark.parametrize("url", ["https://proxy:hunter2@slack.example/api/", "slack.com/api/"])
def test_a_platform_url_with_a_password_or_no_scheme_is_refused_at_once(
    setting: str, url: str
) -> None:
    """The SDKs refuse a user and password in it beside the bot's token: a ValueError at
    the first call, a traceback; and every line naming the URL showed the password."""
    message = settings_error(**{setting: url})
    assert message.startswith(f"invalid setting {setting}:") and "no user or password" in message
    assert "hunter2" not in message


def test_each_contradiction_gets_its_own_line() -> None:
    lines = settings_error(MAX_CONTEXT_TOKENS="256", MODEL_FILE="x.gguf").splitlines()
    assert len(lines) == 2
    assert any(line.startswith("invalid setting MAX_CONTEXT_TOKENS:") for line in lines)
    assert any(line.startswith("invalid setting MODEL_FILE:") for line in lines)


def test_settings_that_fit_together_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_CONTEXT_TOKENS", "513")
    monkeypatch.setenv("MODEL", "/models/qwen-gguf")
    monkeypatch.setenv("MODEL_FILE", "qwen.Q4_K_M.gguf")
    monkeypatch.setenv("INFERENCE_URL", "https://ops:pw@proxy/v1")  # no INFERENCE_API_KEY
    settings = Settings()
    assert (settings.max_context_tokens, settings.model_file) == (513, "qwen.Q4_K_M.gguf")
    assert settings.inference_url == "https://ops:pw@proxy/v1"
