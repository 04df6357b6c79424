"""Settings: one object, read once at start from the environment and `.env`, passed down.

Every setting is an environment variable of the same name (case-insensitive). Invalid
values fail at start with a message that names the setting (`describe_error`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
BUNDLED = "bundled"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="forbid", frozen=True)

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
    max_new_tokens: int = Field(512, ge=1, description="Longest answer, in tokens.")
    max_context_tokens: int | None = Field(
        None, ge=64, description="Prompt + answer budget; unset: the model's own window."
    )
    system_prompt: str | None = Field(None, description="Unset: the chat template's own default.")

    # Conversations
    redis_url: str | None = Field(None, description="Unset: an embedded Redis in DATA_DIR.")
    data_dir: Path = Path("data")
    history_max_messages: int = Field(50, ge=2)
    history_ttl_days: float = Field(30, gt=0)
    max_input_chars: int = Field(16000, ge=1)

    # The inference queue
    queue_max: int = Field(32, ge=1, description="Requests waiting or running before 'busy'.")
    max_pending_per_user: int = Field(
        4, ge=1, description="One user's unanswered messages before 'slow down'."
    )
    max_batch: int = Field(16, ge=1, description="Answers generated together in one batch.")
    max_step_tokens: int = Field(
        128, ge=16, description="Tokens of work per batch step (prompts prefill in chunks)."
    )
    kv_cache_mb: int = Field(
        512, ge=0, description="Memory for idle conversations' KV caches (0: none kept)."
    )
    request_timeout: float = Field(300, gt=0, description="Seconds from submit to the last token.")

    # Durable turns
    shutdown_grace_s: float = Field(
        30, ge=0, description="On SIGTERM, seconds running answers get to finish."
    )
    turn_max_attempts: int = Field(
        3, ge=1, description="Tries at a turn (crashes count, clean stops not) before giving up."
    )
    turn_lease_s: float = Field(
        15, gt=0, description="A dead process's turns are taken over this long after it stopped."
    )
    redis_retries: int = Field(3, ge=0, description="Retries of a failed Redis call, backing off.")
    redis_health_check_s: float = Field(
        10, ge=0, description="Seconds idle before a Redis connection is checked (0: never)."
    )

    # Platforms (their adapters read these)
    slack_bot_token: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_api_url: str = Field(
        "https://slack.com/api/", description="Slack Web API base URL (GovSlack, proxies)."
    )
    slack_port: int = Field(3000, ge=1, le=65535, description="HTTP Events API port.")
    stream_edit_interval: float = Field(1.0, gt=0, description="Seconds between Slack edits.")
    discord_bot_token: SecretStr | None = None
    discord_api_url: str = Field(
        "https://discord.com/api/v10", description="Discord REST base URL (proxies)."
    )
    discord_reply_mode: Literal["thread", "inline"] = "thread"
    discord_edit_interval: float = Field(1.5, gt=0, description="Seconds between Discord edits.")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("device", "dtype", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def history_ttl_seconds(self) -> int:
        return round(self.history_ttl_days * 86400)


def describe_error(error: ValidationError) -> str:
    """One line per bad setting, named as the user wrote it (the environment variable)."""
    lines = []
    for problem in error.errors():
        name = ".".join(str(part) for part in problem["loc"]).upper() or "settings"
        lines.append(f"invalid setting {name}: {problem['msg']}")
    return "\n".join(lines)
