"""docker-compose.yml parses with a real Compose parser, and every service is a CLI command.

Compose fills ``${NAME:-default}`` from the shell and the .env beside the file before it reads
anything else; ``compose(env)`` does the same, so the file is checked as an operator's Compose sees it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import redis
import typer
import yaml
from compose_spec import PyCompose
from typer.main import get_command

from persona.cli import app
from persona.dashboard import create_app
from persona.settings import DashboardSettings, Settings, env_name, setting_fields

ROOT = Path(__file__).resolve().parent.parent

# Compose's interpolation: $$, ${NAME}, ${NAME:-default} (unset or empty), ${NAME-default} (unset), $NAME.
VARIABLE = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def interpolated(value: object, env: dict[str, str]) -> object:
    """``value`` with every variable in its strings filled from ``env``, as Compose fills them."""
    if isinstance(value, dict):
        return {key: interpolated(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolated(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def fill(found: re.Match) -> str:
        if found.group(0) == "$$":
            return "$"
        name = found.group("braced") or found.group("bare")
        given = env.get(name)
        if found.group("op") == ":-" and not given:
            return found.group("default")
        if found.group("op") == "-" and given is None:
            return found.group("default")
        return given or ""

    return VARIABLE.sub(fill, value)


def compose(env: dict[str, str] | None = None) -> dict:
    """The file as Compose reads it, with the shell and .env holding ``env`` (nothing: the defaults)."""
    return interpolated(yaml.safe_load((ROOT / "docker-compose.yml").read_text()), env or {})


@pytest.mark.parametrize("env", [{}, {"PERSONA_DASHBOARD__PORT": "9000", "PERSONA_WORKER__DEVICE": "cpu"}])
def test_compose_file_is_valid_compose(env):
    # YAML merge keys (<<) are resolved by the YAML loader, as Compose itself does.
    parsed = PyCompose.from_json(json.dumps(compose(env)))
    parsed.to_spec()  # and against the Compose specification's schema
    assert {"redis", "worker"} <= set(parsed.service_names())
    assert "${" not in json.dumps(compose(env)), "a variable Compose's interpolation would not fill"


def test_redis_persists_with_append_only_file():
    redis = compose()["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_worker_reserves_a_gpu_and_uses_the_shared_redis():
    worker = compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert worker["environment"]["PERSONA_REDIS_URL"].startswith("redis://redis:")
    assert worker["environment"]["PERSONA_WORKER__DEVICE"] == "cuda"
    assert worker["environment"]["PERSONA_DATA_DIR"] == "/data"  # the shared environment, and the device beside it


def test_what_the_environment_attribute_sets_gives_way_to_the_operators_env_file():
    """`environment:` beats the env_file (.env) in a container: PERSONA_REDIS_URL for a managed
    Redis, set in .env, never reached one, and the worker's --device cuda beat
    PERSONA_WORKER__DEVICE. Each is now filled from .env when it is set there."""
    managed = "rediss://:pw@redis.example.com:6380/0"
    env = {"PERSONA_REDIS_URL": managed, "PERSONA_WORKER__DEVICE": "cpu"}
    for name, service in persona_services(env).items():
        assert service["environment"]["PERSONA_REDIS_URL"] == managed, name
    worker = compose(env)["services"]["worker"]
    assert worker["environment"]["PERSONA_WORKER__DEVICE"] == "cpu"
    assert not any(arg.startswith("--device") for arg in worker["command"])  # a flag would beat it


def test_the_environment_attribute_names_only_settings_with_values_they_take():
    variables = {env_name(names) for names, _ in setting_fields()}
    for name, service in persona_services().items():
        assert set(service["environment"]) <= variables, name
        with pytest.MonkeyPatch.context() as patch:
            for variable, value in service["environment"].items():
                patch.setenv(variable, value)
            Settings(_env_file=None)  # refuses a value it cannot take


def persona_services(env: dict[str, str] | None = None) -> dict[str, dict]:
    return {
        name: service
        for name, service in compose(env)["services"].items()
        if not service.get("image", "").startswith("redis")
    }


def test_every_persona_service_runs_a_real_cli_command():
    # The whole command line, options too, parsed by the CLI's own parser (nothing runs):
    # an option renamed in the CLI breaks this test, not a container at start.
    commands = get_command(app).commands
    for name, service in persona_services().items():
        command, *args = service["command"]
        assert command in commands, f"service {name} runs an unknown command"
        try:
            commands[command].make_context(command, list(args))
        except typer.TyperException as exc:  # an unknown option, a value that is not one
            pytest.fail(f"service {name}: `persona {' '.join(service['command'])}`: {exc.format_message()}")


@pytest.mark.parametrize("port", [None, "18999"])
def test_the_dashboard_is_published_on_its_port_and_checked_at_readyz(port):
    """With PERSONA_DASHBOARD__PORT in .env the dashboard listened there, while the port published
    and the healthcheck stayed at 8787: unhealthy, and the mapped port dead. Set in the shell (or
    --env-file), it moved the port published and the healthcheck, but the dashboard, which sees
    only the container's environment and .env, listened at 8787 still."""
    dashboard = compose({"PERSONA_DASHBOARD__PORT": port} if port else {})["services"]["dashboard"]
    port = port or str(DashboardSettings().port)
    assert dashboard["environment"]["PERSONA_DASHBOARD__PORT"] == port  # the port it listens on
    assert dashboard["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(dashboard["healthcheck"]["test"])
    assert "/readyz" in {route.path for route in create_app(Settings(), redis.Redis()).routes}


def test_every_named_volume_is_declared():
    # Compose refuses to start a service that mounts an undeclared named volume.
    data = compose()
    declared = set(data.get("volumes") or {})
    for name, service in data["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"service {name} mounts undeclared volume {source!r}"


def test_the_parser_rejects_a_broken_file():
    import pytest

    broken = compose()
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"] = "one gpu please"
    with pytest.raises(ValueError):
        PyCompose.from_json(json.dumps(broken))


def test_the_image_copies_files_that_exist_and_leaves_the_venv_out_of_its_context():
    # A COPY of a path that moved fails the image's build, not this suite; and the build
    # context is the checkout, where `make` leaves a venv of gigabytes.
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    copied = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    assert copied, "the Dockerfile copies nothing"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the checkout"
            assert source not in ignored, f"the Dockerfile copies {source}, which .dockerignore leaves out"
    assert {".venv", ".git"} <= ignored
    assert "torch==${TORCH_VERSION}" in dockerfile, "an unpinned torch is whatever its index has newest"
