"""The Swarm stack made from `docker compose config` (secumail/stack.py), without Docker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from secumail.stack import FILTERS, STATE, stack_from_config, to_yaml


def compose_config(tmp_path: Path) -> dict[str, Any]:
    """What `docker compose --profile redis config --format json` prints, cut down."""
    env = tmp_path / "secumail.env"
    env.write_text("SECUMAIL_HOSTNAME=mx.example.org\n")
    volume = {"type": "volume", "volume": {}}
    return {
        "name": "main",
        "services": {
            "postfix": {
                "build": {"context": "/src", "target": "postfix"}, "image": "secumail/postfix",
                "hostname": "postfix", "init": False, "restart": "unless-stopped",
                "command": None, "stop_grace_period": "30s",
                "depends_on": {"policy": {"condition": "service_healthy"}},
                "environment": {"SECUMAIL_HOSTNAME": "mx.example.org"},
                "networks": {"edge": {"priority": 100}, "mail": None, "filters": {}},
                "ports": [{"mode": "ingress", "host_ip": "0.0.0.0", "target": 25,
                           "published": "25", "protocol": "tcp"}],
                "volumes": [{**volume, "source": "queue", "target": "/var/spool/postfix"},
                            {"type": "bind", "source": str(env),
                             "target": "/etc/secumail/secumail.env", "read_only": True}],
            },
            "policy": {
                "image": "secumail/policy", "init": True, "restart": "unless-stopped",
                "environment": {"SECUMAIL_GREYLIST_STORE": "sqlite:///var/lib/x.sqlite"},
                "networks": {"mail": None},
                "volumes": [{**volume, "source": "redis-auth", "target": "/run/secumail/redis",
                             "read_only": True}],
            },
            "clamav": {
                "image": "secumail/clamav", "mem_limit": "536870912",
                "deploy": {"replicas": 3, "resources": {}, "placement": {}},
                "environment": {}, "networks": {"filters": None},
            },
            "clamd": {"image": "secumail/clamd", "environment": {"FRESHCLAM": None},
                      "networks": {"scanners": None}},
            "gateway": {
                "image": "secumail/gateway",
                "environment": {"SECUMAIL_ADMIN_TOKEN": "a-token-from-dot-env-0123456789",
                                "SECUMAIL_METRICS_TOKEN": ""},
                "ports": [{"mode": "ingress", "host_ip": "127.0.0.1", "target": 8080,
                           "published": "8080", "protocol": "tcp"}],
                "networks": {"mail": None, "filters": None},
            },
            "redis": {"image": "secumail/redis", "profiles": ["redis"], "networks": {"mail": None},
                      "volumes": [{**volume, "source": "redis-auth",
                                   "target": "/run/secumail/redis"}]},
        },
        "networks": {"edge": {"name": "main_edge",
                              "ipam": {"config": [{"subnet": "172.29.124.0/24"}]}},
                     "mail": {"name": "main_mail"}, "filters": {"name": "main_filters"},
                     "scanners": {"name": "main_scanners"}},
        "volumes": {"queue": {"name": "main_queue"}, "redis-auth": {"name": "main_redis-auth"}},
    }


def test_what_swarm_ignores_is_gone_or_translated(tmp_path: Path) -> None:
    stack = stack_from_config(compose_config(tmp_path))
    postfix = stack["services"]["postfix"]
    for key in ("build", "restart", "depends_on", "profiles", "mem_limit", "command"):
        assert all(key not in service for service in stack["services"].values()), key
    assert postfix["init"] is False and postfix["hostname"] == "postfix"
    assert postfix["networks"] == ["edge", "filters", "mail"]  # priority is compose's own
    assert stack["services"]["clamav"]["deploy"]["resources"] == {"limits": {"memory": "512M"}}
    assert stack["services"]["clamav"]["deploy"]["replicas"] == 3
    assert postfix["deploy"]["restart_policy"]["condition"] == "any"
    assert stack["networks"]["edge"] == {
        "driver": "overlay", "driver_opts": {"encrypted": "true"},
        "ipam": {"config": [{"subnet": "172.29.124.0/24"}]}}
    assert stack["volumes"] == {"queue": {}}  # Swarm names them after the stack


def test_port_25_keeps_the_clients_address_and_names_resolve_to_tasks(tmp_path: Path) -> None:
    warnings: list[str] = []
    stack = stack_from_config(compose_config(tmp_path), warn=warnings)
    assert stack["services"]["postfix"]["ports"] == [
        {"target": 25, "published": 25, "protocol": "tcp", "mode": "host"}]
    assert all(s["deploy"]["endpoint_mode"] == "dnsrr" for s in stack["services"].values())
    # The gateway's loopback-only port cannot stay loopback-only on Swarm: said, not hidden.
    assert stack["services"]["gateway"]["ports"][0]["mode"] == "host"
    assert any("127.0.0.1" in warning and "8080" in warning for warning in warnings)


def test_tokens_and_redis_password_are_secrets_not_environment(tmp_path: Path) -> None:
    stack = stack_from_config(compose_config(tmp_path))
    gateway, policy = stack["services"]["gateway"], stack["services"]["policy"]
    assert "SECUMAIL_ADMIN_TOKEN" not in gateway["environment"]
    assert "a-token-from-dot-env" not in json.dumps(stack)
    assert set(gateway["secrets"]) == {"secumail_admin_token", "secumail_metrics_token",
                                       "secumail_redis_password"}
    assert policy["secrets"] == ["secumail_redis_password"]
    assert policy["environment"]["SECUMAIL_REDIS_PASSWORD_FILE"] == \
        "/run/secrets/secumail_redis_password"
    assert stack["services"]["redis"]["environment"]["REDIS_PASSWORD_FILE"] == \
        "/run/secrets/secumail_redis_password"
    # One greylist for every policy replica: Redis, whatever secumail.env said.
    assert policy["environment"]["SECUMAIL_GREYLIST_STORE"] == "redis://redis:6379/0"
    assert "volumes" not in policy  # the redis-auth volume was compose's way to share it
    assert all(v["external"] for v in stack["secrets"].values())


def test_files_from_the_host_become_configs_named_by_content(tmp_path: Path) -> None:
    config = compose_config(tmp_path)
    first = stack_from_config(config)
    [(name, entry)] = first["configs"].items()
    assert entry == {"file": str(tmp_path / "secumail.env")}
    assert first["services"]["postfix"]["configs"] == [
        {"source": name, "target": "/etc/secumail/secumail.env"}]
    (tmp_path / "secumail.env").write_text("SECUMAIL_HOSTNAME=mx2.example.org\n")
    assert list(stack_from_config(config)["configs"]) != [name]  # a config cannot change


def test_placement_and_update_order(tmp_path: Path) -> None:
    services = stack_from_config(compose_config(tmp_path))["services"]
    assert services["postfix"]["deploy"]["placement"]["constraints"] == [STATE]
    assert services["clamav"]["deploy"]["placement"]["constraints"] == [FILTERS]
    assert "placement" not in services["policy"]["deploy"]  # stateless, with Redis
    assert services["clamd"]["deploy"]["mode"] == "global"  # one per filter node
    assert services["clamav"]["deploy"]["update_config"]["order"] == "start-first"
    # Two Postfix masters on one queue, or two clamd on one socket path: never.
    assert services["postfix"]["deploy"]["update_config"]["order"] == "stop-first"
    assert services["clamd"]["deploy"]["update_config"]["order"] == "stop-first"


def test_registry_prefixes_every_image(tmp_path: Path) -> None:
    services = stack_from_config(compose_config(tmp_path), registry="registry.lan:5000/")
    assert {s["image"] for s in services["services"].values()} >= {
        "registry.lan:5000/secumail/postfix", "registry.lan:5000/secumail/clamd"}


def test_yaml_reads_back_as_the_same_stack(tmp_path: Path) -> None:
    stack = stack_from_config(compose_config(tmp_path))
    stack["services"]["postfix"]["environment"]["SECUMAIL_X"] = 'yes: "quoted" # not a comment'
    assert yaml.safe_load(to_yaml(stack)) == stack
