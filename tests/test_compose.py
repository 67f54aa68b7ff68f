"""docker-compose.yml parses with a real Compose parser, and every service is a CLI command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
import typer
import yaml
from compose_spec import PyCompose
from typer.main import get_command

from persona.cli import app
from persona.dashboard import create_app
from persona.settings import DashboardSettings, Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_is_valid_compose():
    # YAML merge keys (<<) are resolved by the YAML loader, as Compose itself does.
    parsed = PyCompose.from_json(json.dumps(compose()))
    parsed.to_spec()  # and against the Compose specification's schema
    assert {"redis", "worker"} <= set(parsed.service_names())


def test_redis_persists_with_append_only_file():
    redis = compose()["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_worker_reserves_a_gpu_and_uses_the_shared_redis():
    worker = compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert worker["environment"]["PERSONA_REDIS_URL"].startswith("redis://redis:")


def persona_services() -> dict[str, dict]:
    return {
        name: service
        for name, service in compose()["services"].items()
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


def test_the_dashboard_is_published_on_its_port_and_checked_at_readyz():
    dashboard = compose()["services"]["dashboard"]
    port = DashboardSettings().port
    assert all(p.endswith(f":{port}") for p in dashboard["ports"])
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
