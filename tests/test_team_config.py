"""The team's YAML file: loaded into the settings, the environment winning; errors that name
the key and its line; reloads that keep the old rules when the new file is wrong."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bot.access import Requester, refusal
from bot.config import ConfigError, load_settings
from bot.team import Team

EXAMPLE = Path(__file__).parent.parent / "threadbot.example.yml"


@pytest.fixture(autouse=True)
def own_working_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A working directory of the test's own, for the `.env` and team file it writes (the
    developer's settings are kept out by conftest's `only_the_tests_settings`)."""
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_threadbot_yml_is_read_when_present(tmp_path: Path) -> None:
    write(
        tmp_path / "threadbot.yml",
        "system_prompt: You are {bot_name}.\n"
        "access:\n  admins: [U1, 123456789012345678]\n  discord:\n    roles:\n"
        "      allow: [42]\n"
        "personas:\n  - platform: slack\n    channel: C1\n    temperature: 0.2\n",
    )
    settings = load_settings()
    assert settings.system_prompt == "You are {bot_name}."
    assert settings.access.admins == ("U1", "123456789012345678")  # YAML's numbers as ids
    assert settings.access.discord.roles.allow == ("42",)
    assert settings.personas[0].channel == "C1"
    assert settings.personas[0].temperature == 0.2


def test_without_a_file_the_environment_alone_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEM_PROMPT", "Be brief.")
    assert load_settings().system_prompt == "Be brief."
    assert load_settings().access.rate_limit_per_minute == 0


def test_the_environment_wins_over_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    config = write(tmp_path / "team.yml", "max_new_tokens: 100\naccess:\n  deny: reply\n")
    monkeypatch.setenv("THREADBOT_CONFIG", str(config))
    monkeypatch.setenv("MAX_NEW_TOKENS", "7")
    monkeypatch.setenv("ACCESS__DENY", "silent")
    settings = load_settings()
    assert (settings.max_new_tokens, settings.access.deny) == (7, "silent")


def test_an_unknown_key_names_the_key_and_its_line(tmp_path: Path) -> None:
    write(tmp_path / "threadbot.yml", "access:\n  slack:\n    dms: false\n    userz: {}\n")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).count("\n") == 0
    assert "threadbot.yml line 4" in str(info.value)
    assert "access.slack.userz" in str(info.value)


def test_a_bad_value_names_the_key_and_its_line(tmp_path: Path) -> None:
    write(
        tmp_path / "threadbot.yml",
        "personas:\n  - channel: C1\n    system_prompt: hi\n  - channel: C2\n"
        "    temperature: hot\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "threadbot.yml line 5: invalid setting personas.1.temperature" in str(info.value)


def test_a_bad_value_from_the_environment_is_named_there_not_in_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The environment wins over the file: its value is the one refused."""
    write(tmp_path / "threadbot.yml", "max_new_tokens: 256\naccess:\n  deny: reply\n")
    monkeypatch.setenv("MAX_NEW_TOKENS", "abc")
    monkeypatch.setenv("ACCESS", '{"deny": "loudly"}')
    with pytest.raises(ConfigError) as info:
        load_settings()
    [tokens, deny] = str(info.value).splitlines()
    assert tokens.startswith("invalid setting MAX_NEW_TOKENS:")
    assert deny.startswith("invalid setting ACCESS__DENY:")


@pytest.mark.parametrize("key", ["on", "yes", "1"])
def test_a_key_yaml_reads_as_no_name_is_one_line(tmp_path: Path, key: str) -> None:
    write(tmp_path / "threadbot.yml", f"{key}: true\n")
    with pytest.raises(ConfigError, match=r"threadbot.yml: .* is not a setting's name"):
        load_settings()


def test_broken_yaml_and_a_missing_file_are_one_line_each(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write(tmp_path / "threadbot.yml", "access:\n  deny: [unclosed\n")
    with pytest.raises(ConfigError, match=r"threadbot.yml line \d+: not valid YAML"):
        load_settings()
    monkeypatch.setenv("THREADBOT_CONFIG", str(tmp_path / "nowhere.yml"))
    with pytest.raises(ConfigError, match="THREADBOT_CONFIG: no such file"):
        load_settings()


def test_a_yaml_alias_that_holds_itself_is_one_line(tmp_path: Path) -> None:
    """It was a RecursionError's traceback."""
    write(tmp_path / "threadbot.yml", "access: &a {slack: *a}\n")
    with pytest.raises(ConfigError, match=r"^threadbot.yml: a YAML alias \(\*name\) holds itself$"):
        load_settings()


@pytest.mark.parametrize("kind", ["a link to nothing", "a directory"])
def test_a_team_file_that_is_not_a_file_is_refused_not_skipped(tmp_path: Path, kind: str) -> None:
    """`threadbot.yml` a dangling link, or the directory Docker makes where a bind-mounted
    file is missing: read as no file at all, the team's access rules silently went."""
    default = tmp_path / "threadbot.yml"
    if kind == "a directory":
        default.mkdir()
    else:
        default.symlink_to(tmp_path / "nowhere.yml")
    why = "a directory, not a file" if kind == "a directory" else "no such file"
    with pytest.raises(ConfigError, match=f"THREADBOT_CONFIG: {why}: threadbot.yml"):
        load_settings()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "access:\n  admins: [U1]\nmax_new_tokens: 9\naccess:\n  deny: silent\n",
            "line 4: not valid YAML: access is set twice (first on line 1)",
        ),
        (
            "access:\n  slack:\n    dms: false\n  slack:\n    channels:\n      allow: [C1]\n",
            "line 4: not valid YAML: slack is set twice (first on line 2)",
        ),
    ],
)
def test_a_key_set_twice_is_refused_with_its_line(tmp_path: Path, text: str, problem: str) -> None:
    """A second `access:` (or `slack:` in it) would silently drop the first one's rules:
    the admins gone, DMs open again. YAML forbids it; PyYAML keeps the last."""
    write(tmp_path / "threadbot.yml", text)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == f"threadbot.yml {problem}"


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ("'@bob'", "'@bob' is not a platform id"),
        ("u0blocked", "'u0blocked' is not a platform id"),
        ("# U0BLOCKED (paused)", "an empty item (an id commented out?)"),
    ],
)
def test_what_can_be_no_id_is_refused_with_its_line(
    tmp_path: Path, item: str, problem: str
) -> None:
    """A name, a lower-case id or a commented-out item would match no one: a deny list
    that blocks nobody, an allow list that shuts everyone out."""
    write(
        tmp_path / "threadbot.yml",
        f"access:\n  admins: [U0ADMIN01]\n  slack:\n    users:\n      deny:\n        - {item}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    [line] = str(info.value).splitlines()
    assert line.startswith("threadbot.yml line 5: invalid setting access.slack.users.deny")
    assert problem in line


@pytest.mark.parametrize("channel", ["general", "'#support'"])
def test_a_persona_for_a_channel_named_rather_than_its_id_is_refused_with_its_line(
    tmp_path: Path, channel: str
) -> None:
    """It would match no conversation, and its prompt apply nowhere, in silence; the
    console's channels are conversations' names, and stay allowed."""
    write(
        tmp_path / "threadbot.yml",
        "personas:\n  - platform: console\n    channel: general\n    system_prompt: Hi.\n"
        f"  - platform: slack\n    channel: {channel}\n    system_prompt: Be brief.\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    [line] = str(info.value).splitlines()
    assert line.startswith("threadbot.yml line 6: invalid setting personas.1.channel")
    assert "is not a platform id" in line


def test_a_persona_for_every_platform_names_its_channel_by_id(tmp_path: Path) -> None:
    """Without a platform, `#general` passed, and matched no conversation on Slack or
    Discord: refused, pointing a console conversation's name to `platform: console`."""
    write(
        tmp_path / "threadbot.yml", "personas:\n  - channel: '#general'\n    system_prompt: Hi.\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    [line] = str(info.value).splitlines()
    assert line.startswith("threadbot.yml line 2: invalid setting personas.0.channel")
    assert "is not a platform id" in line and "platform: console" in line


def test_empty_strings_in_the_team_file_mean_unset(tmp_path: Path) -> None:
    """As empty lines in `.env` are: `redis_url: ""` the embedded Redis, not a URL without
    its scheme; `model: ""` the default, not the working directory; `inference_url: ""`
    no server, not a bad URL."""
    write(
        tmp_path / "threadbot.yml",
        'redis_url: ""\nmodel: ""\ninference_url: ""\naccess:\n  deny: ""\n',
    )
    settings = load_settings()
    assert (settings.redis_url, settings.model, settings.inference_url) == (None,) * 3
    assert settings.access.deny == "reply"


def test_a_team_file_named_in_lower_case_is_read(tmp_path: Path) -> None:
    """Settings' names are read in any case: THREADBOT_CONFIG's too, or the file it names
    was skipped while the setting was taken, and its access rules went unapplied."""
    write(tmp_path / "team.yml", "max_new_tokens: 77\n")
    write(tmp_path / ".env", "threadbot_config=team.yml\n")
    assert load_settings().max_new_tokens == 77


def test_the_home_folder_in_data_dir_and_the_team_files_name_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither `.env`, systemd nor compose expands `~`: a folder named `~` would have held
    the conversations."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write((tmp_path / "home").mkdir() or tmp_path / "home" / "team.yml", "max_new_tokens: 9\n")
    write(tmp_path / ".env", "THREADBOT_CONFIG=~/team.yml\nDATA_DIR=~/threadbot\n")
    settings = load_settings()
    assert settings.max_new_tokens == 9
    assert settings.data_dir == tmp_path / "home" / "threadbot"
    assert settings.threadbot_config == tmp_path / "home" / "team.yml"


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    write(
        tmp_path / "threadbot.yml",
        "access:\n  slack: &rules\n    dms: false\n    users:\n      deny: [U9]\n"
        "  discord:\n    <<: *rules\n    dms: true\n",
    )
    access = load_settings().access
    assert (access.slack.dms, access.discord.dms) == (False, True)
    assert access.discord.users.deny == ("U9",)


def test_a_nested_setting_that_is_not_json_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ACCESS__ADMINS=U0123ABCD` (a word where JSON is taken) names the setting."""
    monkeypatch.setenv("ACCESS__ADMINS", "U0123ABCD")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).count("\n") == 0
    assert str(info.value).startswith("invalid setting ACCESS (or one of ACCESS__*): not valid")


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "threadbot.yml").write_bytes("system_prompt: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"threadbot.yml: not UTF-8 text"):
        load_settings()


def test_empty_values_in_the_file_mean_unset(tmp_path: Path) -> None:
    """`model:` with nothing after it, or `null`, is the default, as `MODEL=` is in `.env`."""
    write(
        tmp_path / "threadbot.yml",
        "model:\nmax_new_tokens: null\nmax_context_tokens: ~\naccess:\n  deny:\n"
        "  slack:\nsystem_prompt: Be brief.\n",
    )
    settings = load_settings()
    assert (settings.model, settings.max_new_tokens, settings.max_context_tokens) == (
        None,
        512,
        None,
    )
    assert settings.access.deny == "reply" and settings.access.slack.dms
    assert settings.system_prompt == "Be brief."


def test_contradictory_settings_in_the_file_name_the_line(tmp_path: Path) -> None:
    write(tmp_path / "threadbot.yml", "max_new_tokens: 300\nmax_context_tokens: 256\n")
    with pytest.raises(ConfigError) as info:
        load_settings()
    [line] = str(info.value).splitlines()
    assert line.startswith("threadbot.yml line 2: invalid setting max_context_tokens:")
    assert "MAX_NEW_TOKENS=300" in line


def test_a_file_that_is_not_a_mapping_is_one_line(tmp_path: Path) -> None:
    write(tmp_path / "threadbot.yml", "- max_new_tokens: 64\n")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == "threadbot.yml: not a mapping of settings (`name: value` lines)"


def test_the_file_naming_another_file_is_one_line(tmp_path: Path) -> None:
    """It is read once THREADBOT_CONFIG chose it: the line was taken and then ignored."""
    write(tmp_path / "threadbot.yml", "threadbot_config: other.yml\n")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("threadbot.yml: threadbot_config names this file itself")


def test_the_example_file_is_valid_and_shows_every_section(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THREADBOT_CONFIG", str(EXAMPLE))
    settings = load_settings()
    text = EXAMPLE.read_text()
    for section in ("access:", "admins:", "rate_limit_per_minute:", "deny:", "slack:",
                    "discord:", "roles:", "servers:", "workspaces:", "personas:",
                    "max_attachment_chars:", "strip_reasoning:"):  # fmt: skip
        assert section in text
    assert settings.personas and settings.access.admins
    # Copied as it stands, it shuts nobody out but its sample ids: a Discord server and DM,
    # a Slack channel and DM of anyone else's are answered.
    for who in (Requester("discord", "42", "7", workspace="9"),
                Requester("discord", "42", "7", dm=True),
                Requester("slack", "U0ALICE", "C0GENERAL", workspace="T0ACME"),
                Requester("slack", "U0ALICE", "D0ALICE", workspace="T0ACME", dm=True)):  # fmt: skip
        assert refusal(settings.access, who) is None, who


@pytest.mark.parametrize(("rate", "taken"), [("0", True), ("0.0007", True), ("1e-13", False)])
def test_a_rate_limit_under_a_message_a_day_is_refused(
    tmp_path: Path, rate: str, taken: bool
) -> None:
    """Slower, its bucket outlasted Redis's expiry times, and every message failed."""
    write(tmp_path / "threadbot.yml", f"access:\n  rate_limit_per_minute: {rate}\n")
    if taken:
        assert load_settings().access.rate_limit_per_minute == float(rate)
        return
    with pytest.raises(ConfigError, match=r"line 2: .*at least 1/1440 \(a message a day\)"):
        load_settings()


def test_reload_swaps_the_rules_and_an_invalid_file_keeps_them(tmp_path: Path) -> None:
    config = write(tmp_path / "threadbot.yml", "access:\n  admins: [U1]\n")
    team = Team(load_settings())
    assert team.is_admin("U1")

    write(config, "access:\n  admins: [U2]\nsystem_prompt: new\n")
    summary = team.reload()
    assert "access" in summary and "system_prompt" in summary
    assert team.is_admin("U2") and not team.is_admin("U1")
    assert team.settings.system_prompt == "new"

    write(config, "access:\n  admins: [U3]\n  rate_limit_per_minute: -1\n")
    with pytest.raises(ConfigError, match="line 3"):
        team.reload()
    assert team.is_admin("U2")  # the old rules stay
    write(config, "access:\n  admins: [U3]\ndata_dir: ~no-such-user-here/data\n")
    with pytest.raises(ConfigError, match="no user's home on this machine"):
        team.reload()  # a RuntimeError, which stopped every resume pass (and the lease)
    assert team.is_admin("U2")

    write(config, "access:\n  admins: [U2]\nsystem_prompt: new\nqueue_max: 3\n")
    summary = team.reload()
    assert "QUEUE_MAX only after a restart" in summary
    assert team.settings.queue_max == 32  # what the process runs with


def test_catching_up_reloads_only_what_changed_since_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As a process's start reads the count of `reload` commands, once it is connected:
    one run before then was counted as seen, so the file it was run for is read again
    here; nothing is said where nothing changed, and an invalid file keeps the rules."""
    config = write(tmp_path / "threadbot.yml", "access:\n  admins: [U1]\n")
    team = Team(load_settings())
    with caplog.at_level(logging.INFO, logger="bot.team"):
        team.catch_up()
    assert not caplog.records and team.is_admin("U1")
    write(config, "access:\n  admins: [U2]\n")
    team.catch_up()
    assert team.is_admin("U2") and not team.is_admin("U1")
    write(config, "access:\n  admins: [U3]\n  rate_limit_per_minute: -1\n")
    team.catch_up()
    assert team.is_admin("U2")
    assert "the rules read at start stay" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("written", ["before the start", "after it, then reloaded"])
def test_a_reload_after_the_file_went_keeps_its_rules(tmp_path: Path, written: str) -> None:
    """threadbot.yml moved aside (a backup, a git stash) as a reload comes: its rules stay,
    where the defaults (everyone let in, no admins) took over in silence; and so they did
    still for a file that came after the start."""
    if written == "before the start":
        config = write(tmp_path / "threadbot.yml", "access:\n  admins: [U1]\n")
        team = Team(load_settings())
    else:
        team = Team(load_settings())
        config = write(tmp_path / "threadbot.yml", "access:\n  admins: [U1]\n")
        team.reload()
    config.rename(tmp_path / "threadbot.yml.bak")
    with pytest.raises(ConfigError, match=r"threadbot\.yml is gone"):
        team.reload()
    assert team.is_admin("U1")
