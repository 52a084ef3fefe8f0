"""compose.yaml checked against the package (Docker cannot run on these machines)."""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import yaml

from infra.redis_conn import RedisTarget
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


# --- passwords and TLS ------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::(?P<op>[-?])(?P<arg>[^}]*))?\}")


def _env_example() -> dict[str, str]:
    values = {}
    for line in (REPO_ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        assert op != "?", f"{name} must be set: {arg}"
        return arg if op == "-" else ""

    return _VARIABLE.sub(one, text)


def _poslake_services(data: dict[str, Any]) -> dict[str, Any]:
    """The services of this image that talk to Redis (all but the gateway simulator)."""
    return {
        name: service
        for name, service in data["services"].items()
        if service.get("build") is not None and service["command"][2] != "gateway_sim"
    }


def test_redis_password_comes_from_the_env_file() -> None:
    env = _env_example()
    password = env["REDIS_PASSWORD"]
    assert password, "REDIS_PASSWORD is set in .env.example"
    text = (REPO_ROOT / "compose.yaml").read_text()
    assert password not in text, "the password belongs in .env, not in compose.yaml"
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().split()
    data = _compose()
    redis_service = data["services"]["redis"]
    command = redis_service["command"]
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert redis_service["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD")
    assert redis_service["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    for name, service in _poslake_services(data).items():
        url = service["environment"]["POSLAKE_REDIS_URL"]
        assert "${REDIS_PASSWORD" in url, name
        target = RedisTarget.parse(_interpolate(url, env))
        assert target.password == password and target.host == "redis", name
        assert password not in target.redacted


def test_tls_override_verifies_the_server_with_the_mounted_ca() -> None:
    env = _env_example()
    base = _compose()
    tls: dict[str, Any] = yaml.safe_load((REPO_ROOT / "compose.tls.yaml").read_text())
    redis_command = tls["services"]["redis"]["command"]
    port = redis_command[redis_command.index("--tls-port") + 1]
    assert redis_command[redis_command.index("--port") + 1] == "0"  # no plain TCP
    for option in ("--appendonly", "--requirepass", "--tls-cert-file", "--tls-ca-cert-file"):
        assert option in redis_command, option
    assert "./tls:/tls:ro" in tls["services"]["redis"]["volumes"]
    assert "--tls" in tls["services"]["redis"]["healthcheck"]["test"]
    for name in _poslake_services(base):
        service = tls["services"][name]
        assert "./tls:/tls:ro" in service["volumes"], name
        target = RedisTarget.parse(_interpolate(service["environment"]["POSLAKE_REDIS_URL"], env))
        assert target.tls is not None and target.port == int(port), name
        assert target.tls.ca_certs == "/tls/ca.pem" and target.tls.cert_reqs == "required"
        assert target.password == env["REDIS_PASSWORD"]


def _uncommented(section: str) -> dict[str, str]:
    """.env.example's values with the commented lines after ``section`` switched on."""
    values = _env_example()
    lines = (REPO_ROOT / ".env.example").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if section in line)
    for line in lines[start + 1 :]:
        if not line.strip():
            break  # the end of the section
        name, _, value = line.removeprefix("#").partition("=")
        if value and " " not in name:  # "#NAME=value", not a comment's sentence
            values[name] = value
    return values


def test_the_s3_profile_puts_the_lake_on_seaweedfs() -> None:
    data = _compose()
    store = data["services"]["lake-store"]
    assert store["profiles"] == ["s3"]
    assert "seaweedfs" in store["image"] and "latest" not in store["image"]
    script = store["command"][0]
    port = re.search(r"-s3\.port=(\d+)", script)
    assert port is not None and "-bucket=lake" in script and "exec weed mini" in script
    assert "$$LAKE_S3_SECRET_KEY" in script  # from the container's environment, not the file
    # Required by the container's script, not by compose (which reads every profile's).
    assert store["environment"]["LAKE_S3_SECRET_KEY"] == "${LAKE_S3_SECRET_KEY:-}"
    assert '[ -n "$$LAKE_S3_SECRET_KEY" ] ||' in script
    for service in data["services"].values():
        if "s3" not in service.get("profiles", []):
            assert "LAKE_S3" not in str(service), "another profile would need the S3 keys"
    assert f"127.0.0.1:{port[1]}/healthz" in " ".join(store["healthcheck"]["test"])
    consumer = data["services"]["consumer"]
    assert consumer["depends_on"]["lake-store"] == {
        "condition": "service_healthy",
        "required": False,
    }
    # Without .env's S3 lines the lake is the volume; with them, the store.
    shared_env = data["x-poslake-env"]
    local = {k: _interpolate(str(v), _env_example()) for k, v in shared_env.items()}
    assert local["POSLAKE_LAKE_URI"] == "/lake" and local["POSLAKE_STORAGE_OPTIONS"] == ""
    env = _uncommented("--profile s3")
    on_s3 = {k: _interpolate(str(v), env) for k, v in shared_env.items()}
    on_s3["POSLAKE_REDIS_URL"] = "redis://redis:6379/0"
    settings = Settings.model_validate({k[len(ENV_PREFIX) :].lower(): v for k, v in on_s3.items()})
    assert settings.lake_uri.startswith("s3://lake/")
    options = settings.storage_options
    assert options["AWS_ENDPOINT_URL"] == f"http://lake-store:{port[1]}"
    assert options["AWS_ACCESS_KEY_ID"] == env["LAKE_S3_ACCESS_KEY"]
    assert options["AWS_SECRET_ACCESS_KEY"] == env["LAKE_S3_SECRET_KEY"]
    assert env["LAKE_S3_SECRET_KEY"] not in (REPO_ROOT / "compose.yaml").read_text()


def test_reconcile_runs_periodically_beside_the_producer() -> None:
    services = _compose()["services"]
    reconcile = services["reconcile"]
    assert reconcile["command"][2:5] == ["poslake", "reconcile", "--every"]
    assert float(reconcile["command"][5]) >= 60
    env, producer = reconcile["environment"], services["producer"]["environment"]
    assert env["POSLAKE_IB_HOST"] == producer["POSLAKE_IB_HOST"]
    assert env["POSLAKE_IB_CLIENT_ID"] == producer["POSLAKE_IB_CLIENT_ID"]
    assert env["POSLAKE_RECONCILE_CLIENT_ID"] != env["POSLAKE_IB_CLIENT_ID"]
    assert "lake:/lake:ro" in reconcile["volumes"]  # it only reads the lake
    assert "healthcheck" in reconcile


def test_the_book_runs_as_a_service_on_the_lake() -> None:
    services = _compose()["services"]
    book = services["book"]
    assert book["command"][2:4] == ["poslake", "book"] and "--once" not in book["command"]
    assert "lake:/lake" in book["volumes"]  # it writes the book's tables beside the others
    assert (
        book["environment"]["POSLAKE_LAKE_URI"]
        == services["consumer"]["environment"]["POSLAKE_LAKE_URI"]
    )
    assert "healthcheck" in book and book["restart"] == "unless-stopped"
    assert book["depends_on"]["redis"]["condition"] == "service_healthy"
