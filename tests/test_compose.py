"""compose.yaml checked against the package (Docker cannot run on these machines)."""

from __future__ import annotations

import importlib.util
from typing import Any

import yaml

from shared.settings import ENV_PREFIX, Settings
from tests.helpers import REPO_ROOT


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    return data


def test_every_service_command_is_a_module_of_the_package() -> None:
    for name, service in _compose()["services"].items():
        command = service.get("command")
        if service.get("build") is None:
            continue
        assert command[:2] == ["python", "-m"], name
        assert importlib.util.find_spec(command[2]) is not None, f"{name}: no module {command[2]}"


def test_every_environment_variable_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    for name, service in _compose()["services"].items():
        if service.get("build") is None:
            continue  # third-party images have their own settings
        for variable in service.get("environment", {}):
            assert variable.startswith(ENV_PREFIX), f"{name}: {variable}"
            assert variable[len(ENV_PREFIX) :].lower() in fields, (
                f"{name}: {variable} is no setting"
            )


def test_redis_is_durable_and_consumers_wait_for_it() -> None:
    services = _compose()["services"]
    command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "healthcheck" in services["redis"]
    assert services["consumer"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "container_name" not in services["consumer"]  # --scale needs generated names
    assert int(services["consumer"]["stop_grace_period"].rstrip("s")) >= 30


def test_producer_and_ib_sources() -> None:
    services = _compose()["services"]
    producer = services["producer"]
    assert producer["depends_on"]["redis"]["condition"] == "service_healthy"
    assert producer["environment"]["POSLAKE_IB_HOST"].startswith("${POSLAKE_IB_HOST:-simulator")
    assert "/spool" in producer["environment"]["POSLAKE_PRODUCER_SPOOL_DIR"]
    assert services["simulator"]["profiles"] == ["demo"]
    assert "0.0.0.0" in services["simulator"]["command"]
    gateway = services["ib-gateway"]
    assert gateway["profiles"] == ["ib"]
    assert "gnzsnz/ib-gateway" in gateway["image"]
    assert gateway["environment"]["TRADING_MODE"] == "paper"
    assert "ports" not in gateway  # the API port stays inside the compose network


def test_healthchecks_use_the_metrics_endpoint() -> None:
    data = _compose()
    shared_env = data["x-poslake-env"]
    port = shared_env["POSLAKE_METRICS_PORT"]
    assert shared_env["POSLAKE_METRICS_HOST"] == "0.0.0.0"
    for name in ("producer", "consumer"):
        check = " ".join(data["services"][name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/healthz" in check, name
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "USER poslake" in dockerfile and "-slim" in dockerfile
    for folder in ("shared", "consumer", "producer", "poslake"):
        assert f"COPY {folder} ./{folder}" in dockerfile
