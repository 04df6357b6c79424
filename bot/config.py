"""Settings: one object, read at start from the environment, `.env` and the team's YAML
file (`THREADBOT_CONFIG`, else `threadbot.yml` where present), and passed down.

Every setting is an environment variable of the same name (case-insensitive), or a key of
the YAML file; the environment wins. Nested sections (`access`, `personas`) come from the
file; an environment variable can still set one of their keys (`ACCESS__DENY=silent`).
An empty value (`MODEL=`, or `null` in the file) means unset. Invalid values, and settings
that contradict each other, fail at start with one line naming the setting, and in the
file its line (`load_settings`).

`.env` may also hold the Hugging Face libraries' own variables (`HF_TOKEN`, `HF_HOME`, …):
they are no settings of ours, so they are left out of the settings and passed on to those
libraries through the environment (`export_hugging_face_variables`). Docker Compose's
variables (`COMPOSE_PROFILES`, and those docker-compose.yml reads) are left out too. Any
other unknown name in `.env` is refused as a likely typo. The environment holds many
variables that are not ours, so there only a near-miss of a setting's name is warned about
(`misspelt_settings`): Docker Compose's `env_file` and systemd's `EnvironmentFile` turn
`.env` into environment variables, where a typo would otherwise pass unseen.
"""

from __future__ import annotations

import difflib
import io
import os
import re
from collections.abc import Hashable, Mapping, MutableMapping
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeGuard, cast, get_origin

import yaml
from dotenv import dotenv_values
from dotenv.parser import parse_stream
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from storage.connection import url_problem

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
BUNDLED = "bundled"
# Every row of the batch's KV cache is as wide as its longest row, so the model's whole
# window (32k for Qwen2.5) as the default would let one thread claim gigabytes; 8k still
# holds a long thread.
DEFAULT_CONTEXT_TOKENS = 8192
DEFAULT_CONFIG_FILE = Path("threadbot.yml")
DAY_S = 86400  # the longest duration a setting takes: far longer ones overflow Redis's times
ENV_FILE = Path(".env")
HUGGING_FACE_PREFIXES = ("HF_", "HUGGINGFACE_", "HUGGING_FACE_", "TRANSFORMERS_", "TOKENIZERS_")
"""Names of the Hugging Face libraries' own variables (huggingface_hub, transformers,
tokenizers), which `.env` may hold beside our settings."""
COMPOSE_PREFIX = "COMPOSE_"
COMPOSE_VARIABLES = frozenset(
    {"THREADBOT_PUBLISH", "THREADBOT_STOP_GRACE", "GRAFANA_ADMIN_PASSWORD"}
)
"""What Docker Compose reads from the same `.env`: its own COMPOSE_* and the variables
docker-compose.yml names (`${THREADBOT_PUBLISH:-…}`)."""
OTHER_TOOLS_PREFIXES = ("PYTHON", "PIP_", "LC_", "XDG_", "CUDA_", "NVIDIA_", "TORCH", "TQDM_")
"""Environment variables of Python, the locale, the GPU and the libraries we run on: a
name close to a setting's among them is theirs, not a typo of ours."""
NEAR_MISS_CUTOFF = 0.9  # MAX_NEW_TOKEN (0.96), ACCES__DENY (0.96) pass; MODEL_NAME (0.7) not


class ConfigError(Exception):
    """The settings cannot be used; the message says which, and where (one line each)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


PLATFORM_ID = re.compile(r"[A-Z0-9]+")
"""Slack's ids (U0123ABCD, C0123ABCD, T0123ABCD) and Discord's (digits): a rule compares
them exactly, so a name or a lower-case id would match no one."""


def _platform_id(value: object) -> str:
    """An id of an access list as text (YAML reads Discord's as numbers); ValueError, saying
    what to write, for what can be no id."""
    if value is None:
        raise ValueError("an empty item (an id commented out?): remove its line")
    text = str(value)
    if not PLATFORM_ID.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a platform id: Slack's are capitals and digits (U0123ABCD), "
            "Discord's digits; a profile's menu shows them (Slack: Copy member ID; Discord, "
            "in developer mode: Copy User ID)"
        )
    return text


class Rule(_Section):
    """Who or where, by platform id: an empty allow list admits everyone; deny wins."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def admits(self, *ids: str) -> bool:
        """Whether any of `ids` is allowed and none is denied (a user has several roles)."""
        if any(i in self.deny for i in ids):
            return False
        return not self.allow or any(i in self.allow for i in ids)

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _ids_as_text(cls, value: object) -> object:
        return [_platform_id(v) for v in value] if isinstance(value, list | tuple) else value


class SlackAccess(_Section):
    dms: bool = True
    users: Rule = Rule()
    channels: Rule = Rule()
    workspaces: Rule = Rule()  # team ids; Slack Connect strangers must be allowed by user id


class DiscordAccess(_Section):
    dms: bool = True
    users: Rule = Rule()
    channels: Rule = Rule()  # a thread is judged by its parent channel
    servers: Rule = Rule()  # guild ids
    roles: Rule = Rule()  # role ids; users with no allowed role are denied if the list is set


class Access(_Section):
    deny: Literal["reply", "silent"] = Field(
        "reply", description="A denied person gets a short reply, at most hourly, or nothing."
    )
    admins: tuple[str, ...] = Field((), description="User ids that may reload, see stats, reset.")
    rate_limit_per_minute: float = Field(
        0, ge=0, description="Messages a user may send a minute (a token bucket; 0: no limit)."
    )
    slack: SlackAccess = SlackAccess()
    discord: DiscordAccess = DiscordAccess()

    _ids_as_text = field_validator("admins", mode="before")(Rule._ids_as_text.__func__)

    @field_validator("rate_limit_per_minute")
    @classmethod
    def _a_message_a_day_at_least(cls, value: float) -> float:
        """Slower than that, a bucket's refill outlasts what Redis's expiry times take:
        every message would fail."""
        if 0 < value < 1 / 1440:
            raise ValueError("must be 0 (no limit) or at least 1/1440 (a message a day)")
        return value


class Persona(_Section):
    """A system prompt and generation settings for a platform, workspace or channel; the
    most specific persona that sets a value wins."""

    platform: Literal["slack", "discord", "console"] | None = None
    workspace: str | None = None  # Slack team id, Discord server id
    channel: str | None = None
    system_prompt: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)

    @field_validator("workspace", "channel", mode="before")
    @classmethod
    def _id_as_text(cls, value: object, info: ValidationInfo) -> object:
        """Slack's and Discord's workspaces and channels are ids (a name, `#general`, would
        match no conversation, and the persona apply nowhere), and so are those of a
        persona for every platform; the console's channel is a conversation's name."""
        platform = info.data.get("platform")
        if value is None or platform == "console":
            return str(value) if isinstance(value, int) else value
        try:
            return _platform_id(value)
        except ValueError as error:
            if platform is None:  # perhaps meant for the console
                raise ValueError(
                    f"{error}; for a console conversation, add platform: console"
                ) from None
            raise


class SettingsInDotEnv(DotEnvSettingsSource):
    """`.env` less the Hugging Face libraries' and Docker Compose's variables: those are
    not ours to refuse."""

    def __call__(self) -> dict[str, Any]:
        return {
            name: value
            for name, value in super().__call__().items()
            if not (is_hugging_face(name) or is_for_compose(name))
        }


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=ENV_FILE,
        env_nested_delimiter="__",
        env_ignore_empty=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,  # `inf` seconds or days would pass, then fail at start
    )
    dotenv_source: ClassVar[type[DotEnvSettingsSource]] = SettingsInDotEnv
    """How `.env` is read (the doctor's lenient settings read it their own way)."""

    threadbot_config: Path | None = Field(
        None, description=f"The team's YAML file; unset: {DEFAULT_CONFIG_FILE} where present."
    )

    # The model
    model: str | None = Field(
        None,
        description=f"Hub id or local path; unset: {DEFAULT_MODEL}; '{BUNDLED}': offline SmolLM2.",
    )
    model_file: str | None = Field(
        None, description="GGUF file inside MODEL, if it is a GGUF repo."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: linear weights stored as int8 (less memory, other answers)."
    )
    decode_kernel: Literal["auto", "off"] = Field(
        "auto", description="auto: decode steps by our kernels where they are faster."
    )
    max_new_tokens: int = Field(512, ge=1, description="Longest answer, in tokens.")
    max_context_tokens: int | None = Field(
        None,
        ge=64,
        validate_default=True,  # the default must leave room for MAX_NEW_TOKENS too
        description=f"Prompt + answer budget; unset: {DEFAULT_CONTEXT_TOKENS}, or the model's "
        "window if smaller.",
    )
    system_prompt: str | None = Field(None, description="Unset: the chat template's own default.")

    # Conversations
    redis_url: str | None = Field(None, description="Unset: an embedded Redis in DATA_DIR.")
    data_dir: Path = Path("data")
    history_max_messages: int = Field(50, ge=2)
    history_ttl_days: float = Field(30, ge=1 / 1440, le=36500)  # a minute to a century
    max_input_chars: int = Field(16000, ge=1)

    # The inference queue
    queue_max: int = Field(32, ge=1, description="Requests waiting or running before 'busy'.")
    max_pending_per_user: int = Field(
        4, ge=1, description="One user's unanswered messages before 'slow down'."
    )
    max_batch: int = Field(32, ge=1, description="Answers generated together in one batch.")
    max_step_tokens: int = Field(
        128, ge=16, description="Tokens of work per batch step (prompts prefill in chunks)."
    )
    prefill_first_steps: int = Field(
        2, ge=0, description="Steps in a row the running answers sit out while a prompt waits."
    )
    kv_cache_mb: int = Field(
        512, ge=0, description="Memory for idle conversations' KV caches (0: none kept)."
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="The batch's KV cache in tokens, padding counted: rows * the longest "
        "prompt + answer; unset: what fits in the memory left after the weights.",
    )
    request_timeout: float = Field(
        300, gt=0, le=DAY_S, description="Seconds from submit to the last token."
    )

    # Durable turns
    shutdown_grace_s: float = Field(
        30, ge=0, le=DAY_S, description="On SIGTERM, seconds running answers get to finish."
    )
    turn_max_attempts: int = Field(
        3, ge=1, description="Tries at a turn (crashes count, clean stops not) before giving up."
    )
    turn_lease_s: float = Field(
        15,
        ge=1,
        le=DAY_S,
        description="A dead process's turns are taken over this long after it stopped.",
    )
    redis_retries: int = Field(3, ge=0, description="Retries of a failed Redis call, backing off.")
    redis_health_check_s: float = Field(
        10,
        ge=0,
        le=DAY_S,
        description="Seconds idle before a Redis connection is checked (0: never).",
    )

    # Scaling out: workers behind Redis Streams, or an OpenAI-compatible server
    inference_url: str | None = Field(
        None,
        description="An OpenAI-compatible API (vLLM, TGI, llama.cpp, Ollama), e.g. "
        "http://vllm:8000/v1: answers come from it and no model is loaded.",
    )
    inference_model: str | None = Field(
        None, description="The model name INFERENCE_URL serves; unset: the first it lists."
    )
    inference_api_key: SecretStr | None = None
    inference_tokenizer: str | None = Field(
        None,
        description="Hub id or folder of the served model's tokenizer, for the history "
        "budget; unset: an estimate (3 ASCII characters a token, a token a byte of others).",
    )
    inference_retries: int = Field(
        3, ge=0, description="Retries of a failed INFERENCE_URL request, backing off."
    )
    job_claim_idle_s: float = Field(
        30,
        gt=0,
        le=DAY_S,
        description="A worker silent this long loses its jobs to another worker.",
    )
    job_max_deliveries: int = Field(
        3, ge=1, description="Failed tries at a job on workers before it is dead-lettered."
    )

    # Platforms (their adapters read these)
    slack_bot_token: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_api_url: str = Field(
        "https://slack.com/api/", description="Slack Web API base URL (GovSlack, proxies)."
    )
    stream_edit_interval: float = Field(
        1.0, gt=0, le=DAY_S, description="Seconds between Slack edits."
    )
    discord_bot_token: SecretStr | None = None
    discord_api_url: str = Field(
        "https://discord.com/api/v10", description="Discord REST base URL (proxies)."
    )
    discord_reply_mode: Literal["thread", "inline"] = "thread"
    discord_edit_interval: float = Field(
        1.5, gt=0, le=DAY_S, description="Seconds between Discord edits."
    )
    slack_streaming: Literal["auto", "native", "edit"] = Field(
        "auto", description="Slack's AI streaming methods (auto: where the workspace allows)."
    )
    discord_global_commands: bool = Field(
        False, description="Register slash commands globally, not per server (slow to appear)."
    )

    # The team's rules (usually from the YAML file)
    access: Access = Access()
    personas: tuple[Persona, ...] = ()
    max_attachment_chars: int = Field(
        20000, ge=0, description="Text read from a message's attached text files."
    )
    strip_reasoning: bool = Field(True, description="Leave <think> blocks out of answers.")

    # Operations
    http_port: int = Field(
        8080,
        ge=0,
        le=65535,
        description="/healthz, /readyz, /metrics (and Slack's HTTP events); 0: off.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field("text", description="json: one object per line.")

    @field_validator("device", "dtype", "quantize", "decode_kernel", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("threadbot_config", "data_dir")
    @classmethod
    def _home_expanded(cls, value: Path | None) -> Path | None:
        # `~/data` in `.env`, a unit or compose is not expanded by any of them: a folder
        # named `~` would hold the conversations.
        return home_expanded(value) if value is not None else None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("model_file")
    @classmethod
    def _model_file_needs_a_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Fields validate in order, so MODEL is known here (absent if it was invalid).
        if value is None or "model" not in info.data:
            return value
        if info.data["model"] is None:
            raise _contradiction(
                "it names a GGUF file inside MODEL, but MODEL is unset: set MODEL to the "
                "repo or folder that holds the file"
            )
        if info.data["model"] == BUNDLED:
            raise _contradiction(
                f"it names a GGUF file inside MODEL, but MODEL={BUNDLED} has its own file: "
                "unset MODEL_FILE, or set MODEL to the repo or folder that holds it"
            )
        return value

    @field_validator("inference_url")
    @classmethod
    def _an_http_url(cls, value: str | None) -> str | None:
        # Checked here: aiohttp takes `vllm:8000/v1` for a URL of scheme `vllm`, and its
        # error, "cannot be reached", would print the URL, password and all.
        if value is not None and not re.match(r"https?://[^/?#\s]", value):
            raise PydanticCustomError(
                "url", "an OpenAI-compatible API's URL starts with http:// or https:// and its "
                "host (e.g. http://vllm:8000/v1)",
            )  # fmt: skip
        return value

    @field_validator("slack_api_url", "discord_api_url")
    @classmethod
    def _a_platform_url(cls, value: str) -> str:
        # A user and password in it: the SDKs refuse them beside the bot's token, with a
        # ValueError at the first call (a traceback), and every error line would show them.
        if not re.match(r"https?://[^/?#@\s]+(?:[/?#]|$)", value):
            raise PydanticCustomError(
                "url", "an API's URL starts with http:// or https:// and its host, with no "
                "user or password (the platform's SDK refuses them beside the bot's token)",
            )  # fmt: skip
        return value

    @field_validator("redis_url")
    @classmethod
    def _a_redis_url(cls, value: str | None) -> str | None:
        # Checked here, not at connect: a URL no restart can fix is a setting (exit 2).
        if value and (problem := url_problem(value)):
            raise PydanticCustomError("url", problem)
        return value

    @field_validator("inference_api_key")
    @classmethod
    def _one_credential(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        url = info.data.get("inference_url")
        if value is not None and url is not None and re.match(r"https?://[^/?#]*@", url):
            raise _contradiction(
                "INFERENCE_URL carries a user and password as well, and a request carries "
                "one or the other: keep one of them"
            )
        return value

    @field_validator("max_context_tokens")
    @classmethod
    def _context_holds_a_prompt(cls, value: int | None, info: ValidationInfo) -> int | None:
        answer = info.data.get("max_new_tokens")
        context = value or DEFAULT_CONTEXT_TOKENS
        if answer is not None and context <= answer:
            given = "" if value else " (the default, as it is unset)"
            raise _contradiction(
                f"{context}{given} leaves no room for a prompt beside MAX_NEW_TOKENS={answer}: "
                "make it larger than MAX_NEW_TOKENS, or lower MAX_NEW_TOKENS",
                "max_new_tokens",
            )
        return value

    @property
    def history_ttl_seconds(self) -> int:
        return round(self.history_ttl_days * 86400)

    @property
    def kernel_folder(self) -> Path | None:
        """Where our decode kernel is built (`bot.decode_kernel`); None: DECODE_KERNEL=off."""
        return self.data_dir / "kernels" if self.decode_kernel == "auto" else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        given = cast(DotEnvSettingsSource, dotenv_settings)  # pydantic-settings' own
        dotenv = cls.dotenv_source(
            settings_cls,
            env_file=given.env_file,  # as Settings(_env_file=...) may have changed it
            env_file_encoding=given.env_file_encoding,
        )
        sources = [init_settings, env_settings, dotenv]
        if (path := config_file()) is not None:
            sources.append(_SettingsInYaml(settings_cls, yaml_file=path))
        return (*sources, file_secret_settings)


class _SettingsInYaml(YamlConfigSettingsSource):
    """The team's file, its empty (`null`) values left out as unset; ConfigError if it is
    not a mapping of settings."""

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        with file_path.open(encoding=self.yaml_file_encoding or "utf-8") as file:
            data = yaml.load(file, Loader=_KeysOnceLoader) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{file_path}: not a mapping of settings (`name: value` lines)")
        if words := [key for key in data if not isinstance(key, str)]:
            raise ConfigError(
                f"{file_path}: {words[0]!r} is not a setting's name (YAML reads a bare on, "
                f"off, yes or no as true or false, and digits as a number: quote it)"
            )
        if "threadbot_config" in data:  # read before this file is: it would be ignored
            raise ConfigError(
                f"{file_path}: threadbot_config names this file itself; set THREADBOT_CONFIG "
                "in the environment or .env"
            )
        return _without_nulls(data)


class _KeysOnceLoader(yaml.SafeLoader):
    """YAML's rule that PyYAML does not enforce: a key is set once in its mapping. Else a
    second `access:` section would silently replace the first, its rules gone."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *rules`: the keys set beside it may override the merged ones
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # refused below, as any YAML reader does
            if key in first:
                problem = f"{key} is set twice (first on line {first[key]})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _without_nulls(data: dict[str, Any]) -> dict[str, Any]:
    """The file's settings but those left empty (`model:`, `model: ""`): unset, as an
    empty environment variable is."""
    return {
        key: _without_nulls(value) if isinstance(value, dict) else value
        for key, value in data.items()
        if value is not None and value != ""
    }


def _contradiction(message: str, *beside: str) -> PydanticCustomError:
    """A setting at odds with others; `beside` names those its default may be at odds with
    too (doctor resets them, to check the rest)."""
    return PydanticCustomError("contradiction", message, {"beside": beside})


def is_hugging_face(name: str) -> bool:
    """Whether a variable is one of the Hugging Face libraries' (`HF_TOKEN`, `hf_home`)."""
    return name.upper().startswith(HUGGING_FACE_PREFIXES)


def is_for_compose(name: str) -> bool:
    """Whether a variable is one Docker Compose reads from `.env` (`COMPOSE_PROFILES`)."""
    upper = name.upper()
    return upper.startswith(COMPOSE_PREFIX) or upper in COMPOSE_VARIABLES


def export_hugging_face_variables(
    env_file: Path = ENV_FILE, *, environ: MutableMapping[str, str] = os.environ
) -> list[str]:
    """Put the Hugging Face variables of `.env` into the environment, where those
    libraries read them (at import: call this first), named in capitals as they read them;
    a variable already set there wins, and an empty one counts as unset. Returns the names
    put there; ConfigError if `.env` cannot be read."""
    exported = []
    for name, value in read_env_file(env_file).items():
        if is_hugging_face(name) and value and not environ.get(name.upper()):
            environ[name.upper()] = value
            exported.append(name.upper())
    return exported


def read_env_file(env_file: Path = ENV_FILE) -> dict[str, str | None]:
    """The variables of `.env` (none where there is no such file); ConfigError, in one line
    naming the file, where it cannot be read (not ours to read, not UTF-8, a directory: as
    Docker makes a bind mount of a file that is missing), or a line of it is no
    `NAME=value` (python-dotenv would skip it: a token silently unset)."""
    try:
        text = env_file.read_text(encoding="utf-8") if env_file.exists() else ""
    except (UnicodeDecodeError, OSError) as error:
        raise _unreadable(error, env_file) from None
    # A bare word too: python-dotenv reads it as a name with no value, so a value wrapped
    # onto the next line (a password's end, say) would be named as an unknown setting.
    bindings = parse_stream(io.StringIO(text))
    if bad := next((b for b in bindings if b.error or (b.key and b.value is None)), None):
        # Not the line itself: it may hold a token.
        raise ConfigError(f"{env_file} line {bad.original.line}: not a NAME=value line")
    return dotenv_values(stream=io.StringIO(text))


def _unreadable(error: UnicodeDecodeError | OSError, where: Path) -> ConfigError:
    """One line naming the file that cannot be read, and why."""
    if isinstance(error, UnicodeDecodeError):
        return ConfigError(f"{where}: not UTF-8 text: {error.reason}")
    return ConfigError(f"{error.filename or where}: cannot be read: {error.strerror or error}")


def misspelt_settings(environ: Mapping[str, str] = os.environ) -> list[str]:
    """One line for each environment variable that is no setting but so close to one's name
    that it is likely a typo of it (`MAX_NEW_TOKEN`); it is ignored, as the settings read
    only the names they know. Only names written like a setting are looked at (in capitals,
    not another tool's)."""
    known = _setting_names(Settings)
    lines = []
    for name in sorted(filter(_may_be_a_typo, environ)):
        if close := difflib.get_close_matches(name, known, n=1, cutoff=NEAR_MISS_CUTOFF):
            lines.append(f"{name} is not a setting (did you mean {close[0]}?); it is ignored")
    return lines


def _setting_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every variable name that sets something: `MAX_NEW_TOKENS`, and for a section each
    of its keys too (`ACCESS__DENY`, `ACCESS__SLACK__USERS__ALLOW`)."""
    names = []
    for field, info in model.model_fields.items():
        name = prefix + field.upper()
        names.append(name)
        if _is_section(info.annotation):
            names += _setting_names(info.annotation, f"{name}__")
    return names


def _is_section(annotation: object) -> TypeGuard[type[_Section]]:
    # A generic alias (`tuple[Persona, ...]`) is no class for issubclass.
    return (
        get_origin(annotation) is None
        and isinstance(annotation, type)
        and issubclass(annotation, _Section)
    )


def _may_be_a_typo(name: str) -> bool:
    """Written like a setting, and not one the settings read: those under a setting's name
    (`ACCESS__DENYY`) they read, and refuse if unknown, themselves."""
    return (
        name.isupper()
        and name.split("__", 1)[0].lower() not in Settings.model_fields
        and not name.startswith(OTHER_TOOLS_PREFIXES)
        and not (is_hugging_face(name) or is_for_compose(name))
    )


def config_file() -> Path | None:
    """The team's YAML file: THREADBOT_CONFIG (environment, then `.env`), else
    `threadbot.yml` in the working directory where there is one."""
    if named := _value_of("THREADBOT_CONFIG", os.environ) or _value_of(
        "THREADBOT_CONFIG", read_env_file()
    ):
        try:
            return home_expanded(Path(named))
        except ValueError as error:
            raise ConfigError(f"THREADBOT_CONFIG={error}") from None
    # A directory, or a link to nothing, too: the team's rules must not go unread (Docker
    # makes a directory where a bind-mounted file is missing).
    return DEFAULT_CONFIG_FILE if os.path.lexists(DEFAULT_CONFIG_FILE) else None


def home_expanded(path: Path) -> Path:
    """`path` with a leading `~` or `~user` expanded; ValueError, naming it, where there is
    no such user here (pathlib's RuntimeError would end the start in a traceback)."""
    try:
        return path.expanduser()
    except RuntimeError:
        raise ValueError(
            f"{path}: {path.parts[0]} is no user's home on this machine; write the path in full"
        ) from None


def _value_of(name: str, variables: Mapping[str, str | None]) -> str | None:
    """A variable's value, its name in any case, as the settings read names."""
    return next((value for key, value in variables.items() if key.upper() == name and value), None)


def load_settings(**values: Any) -> Settings:
    """The settings, or ConfigError with one line per problem, naming the environment
    variable, or the file's key and line."""
    read_env_file()  # one that cannot be read is said, whatever else is set
    path = config_file()
    if path is not None and not path.is_file():
        why = "a directory, not a file" if path.is_dir() else "no such file"
        raise ConfigError(f"THREADBOT_CONFIG: {why}: {path}")
    try:
        return Settings(**values)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or error
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    except ValidationError as error:
        raise ConfigError(describe_error(error, path)) from None
    except SettingsError as error:  # a nested setting given as a word, not JSON
        raise ConfigError(_not_json(error)) from None
    except (UnicodeDecodeError, OSError) as error:
        raise _unreadable(error, path or ENV_FILE) from None
    except RecursionError:  # `access: &a {slack: *a}`: YAML takes it, nothing reads it
        raise ConfigError(f"{path}: a YAML alias (*name) holds itself") from None


def _not_json(error: SettingsError) -> str:
    """One line for a setting with parts (`ACCESS`, `PERSONAS`) whose value in the
    environment or `.env` is not the JSON it must be."""
    field = re.search(r'field "(\w+)"', str(error))
    name = field[1].upper() if field else "a setting"
    cause = f" ({error.__cause__})" if error.__cause__ else ""
    return (
        f"invalid setting {name} (or one of {name}__*): not valid JSON{cause}; in the "
        f"environment and .env these take JSON, e.g. ACCESS__ADMINS='[\"U0123ABCD\"]'"
    )


def describe_error(error: ValidationError, path: Path | None = None) -> str:
    """One line per bad setting: the environment variable's name where the environment or
    `.env` sets it (they win over the file), else where the file sets it, its key and line."""
    tree = _yaml_tree(path)
    environment = {name.upper() for name in (*os.environ, *read_env_file())}
    lines = []
    for problem in error.errors():
        loc = tuple(problem["loc"])
        parts = [str(part) for part in loc]
        # Set there, or a section holding it (ACCESS as JSON): the environment wins.
        from_environment = any(
            "__".join(parts[:end]).upper() in environment for end in range(1, len(parts) + 1)
        )
        line = None if from_environment or tree is None else _line_of(tree, loc)
        if line is not None:
            lines.append(f"{path} line {line}: invalid setting {'.'.join(parts)}: {problem['msg']}")
        else:
            name = "__".join(parts).upper() or "settings"
            lines.append(f"invalid setting {name}: {problem['msg']}")
    return "\n".join(lines)


def _yaml_tree(path: Path | None) -> yaml.Node | None:
    try:
        return yaml.compose(path.read_text()) if path is not None else None
    except (OSError, yaml.YAMLError):
        return None


def _line_of(node: yaml.Node, loc: tuple[Any, ...]) -> int | None:
    """The line (1-based) of the key or item at `loc` in the file, if the file holds it."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = [(k, v) for k, v in node.value if k.value == str(part)]
            if not found:
                return None
            key, node = found[0]
            line = key.start_mark.line + 1
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
