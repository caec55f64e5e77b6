"""The Docker Swarm stack, made from compose.yaml: one source of truth for both engines.

`docker compose config` reads compose.yaml as users run it (.env, secumail.env, anchors,
profiles, overlays); `stack_from_config` turns the result into what `docker stack deploy`
takes, handling what Swarm ignores or does differently:

- build: Swarm pulls images. `--registry` names where `docker compose build` + push put
  them; without it the images must already be on each node (`docker image load`).
- depends_on: ignored by Swarm. Every SecuMail service copes with a next hop not there yet
  (a 4xx to its client meanwhile), so nothing replaces it.
- restart, mem_limit, replicas: become deploy's restart_policy, resources and replicas;
  update and rollback policies are added (start-first where two copies may run at once).
- ports: published in host mode, which keeps the client's own address (Swarm's routing mesh
  would show every client as the same internal address to greylisting, SPF, DNSBL and
  mynetworks). Swarm cannot bind one host address: the gateway's 127.0.0.1:8080 becomes
  8080 on every address of its node, which is why its metrics token is required here.
- endpoint_mode dnsrr: a service's name resolves to its tasks' own addresses, as in compose,
  which the filters' allowed clients and the gateway's replica list rely on (a virtual IP
  would hide them).
- secrets: the tokens and Redis's password are Docker secrets (made beforehand with
  `docker secret create`), read as files by the services; greylisting is in Redis.
- files bound from the host (secumail.env): Docker configs, named by their content's hash
  (a config cannot change; a new one is made when the file does).
- networks: overlays encrypted (IPsec between nodes). `cap_drop`/`cap_add` are kept;
  `security_opt` (no-new-privileges) is not, Swarm services have no such option.
- placement: services holding state run on the node labelled secumail.state=true, the
  filters and their scanners on nodes labelled secumail.filters=true (one clamd and one
  spamd per such node: the filters reach them over that node's socket volumes).

    python3 -m secumail.stack [-f compose.yaml ...] [--profile prometheus] > secumail-stack.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

STATE = "node.labels.secumail.state == true"
FILTERS = "node.labels.secumail.filters == true"
PLACEMENT = {"postfix": STATE, "gateway": STATE, "redis": STATE, "prometheus": STATE,
             "dkim": STATE, "clamav": FILTERS, "spamd": FILTERS, "clamd": FILTERS,
             "spamassassin": FILTERS}
# One per filter node: the filters on that node reach it through the node's socket volume.
GLOBAL = {"clamd", "spamassassin"}
# Safe to run old and new side by side during an update (start-first keeps capacity). The
# others hold a host port, a queue, a database or a socket path that two copies would fight
# over: they stop first.
START_FIRST = {"policy", "dkim", "clamav", "spamd"}

# Secrets: (secret, the service that reads it, the variable naming its file or None when the
# settings read it from /run/secrets by its variable's name).
REDIS_SECRET = "secumail_redis_password"
SECRETS = {
    "gateway": ("secumail_admin_token", "secumail_metrics_token", REDIS_SECRET),
    "prometheus": ("secumail_metrics_token",),
    "policy": (REDIS_SECRET,),
    "redis": (REDIS_SECRET,),
}
SECRET_FILE_VARIABLES = {"gateway": "SECUMAIL_REDIS_PASSWORD_FILE",
                         "policy": "SECUMAIL_REDIS_PASSWORD_FILE",
                         "redis": "REDIS_PASSWORD_FILE"}
TOKEN_VARIABLES = ("SECUMAIL_ADMIN_TOKEN", "SECUMAIL_METRICS_TOKEN")  # secrets instead
REDIS_STORE = "redis://redis:6379/0"
REDIS_AUTH_VOLUME = "redis-auth"  # compose's way of sharing the password: a secret here
# Keys a service keeps as they are (the rest of `docker compose config` is compose's own).
KEPT = ("image", "command", "entrypoint", "hostname", "init", "stop_grace_period", "user",
        "healthcheck", "dns", "sysctls", "working_dir", "labels", "cap_add", "cap_drop")


def stack_from_config(config: dict[str, Any], registry: str = "",
                      warn: list[str] | None = None) -> dict[str, Any]:
    """The stack for `docker stack deploy`, from `docker compose config --format json`."""
    warnings = [] if warn is None else warn
    configs: dict[str, Any] = {}
    services = {name: swarm_service(name, service, registry, configs, warnings)
                for name, service in sorted(config["services"].items())}
    secrets = sorted({s for name in services for s in SECRETS.get(name, ())})
    stack: dict[str, Any] = {
        "version": "3.9",
        "services": services,
        "networks": {name: swarm_network(network)
                     for name, network in sorted(config.get("networks", {}).items())},
        "volumes": {name: {k: v for k, v in volume.items() if k != "name"}
                    for name, volume in sorted(config.get("volumes", {}).items())
                    if name != REDIS_AUTH_VOLUME},
    }
    if secrets:
        stack["secrets"] = {name: {"external": True} for name in secrets}
    if configs:
        stack["configs"] = configs
    return stack


def swarm_service(name: str, service: dict[str, Any], registry: str,
                  configs: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    out = {key: service[key] for key in KEPT if service.get(key) not in (None, [], {})}
    if registry and "image" in out:
        out["image"] = f"{registry.rstrip('/')}/{out['image']}"
    out["environment"] = swarm_environment(name, service.get("environment") or {})
    if service.get("ports"):
        out["ports"] = [host_port(name, port, warnings) for port in service["ports"]]
    volumes = [swarm_volume(volume, configs, warnings) for volume in service.get("volumes", [])
               if volume.get("source") != REDIS_AUTH_VOLUME]
    out["volumes"] = [v for v in volumes if v.get("type") != "config"]
    mounted = [v for v in volumes if v.get("type") == "config"]
    if mounted:
        out["configs"] = [{"source": v["source"], "target": v["target"]}
                          for v in mounted]
    if not out["volumes"]:
        del out["volumes"]
    out["networks"] = sorted(service.get("networks") or {})
    if name in SECRETS:
        out["secrets"] = list(SECRETS[name])
    out["deploy"] = swarm_deploy(name, service)
    return out


def swarm_environment(name: str, environment: dict[str, str | None]) -> dict[str, str]:
    env = {k: v for k, v in environment.items() if v is not None and k not in TOKEN_VARIABLES}
    if name in SECRET_FILE_VARIABLES:
        env[SECRET_FILE_VARIABLES[name]] = f"/run/secrets/{REDIS_SECRET}"
    if name in ("policy", "gateway") and not env.get("SECUMAIL_GREYLIST_STORE", "").startswith(
            ("redis://", "rediss://")):
        env["SECUMAIL_GREYLIST_STORE"] = REDIS_STORE  # one greylist for every replica
    return dict(sorted(env.items()))


def host_port(service: str, port: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    if port.get("host_ip") not in (None, "", "0.0.0.0", "::"):
        warnings.append(f"{service}: Swarm cannot publish on {port['host_ip']} alone: port "
                        f"{port['published']} is open on every address of its node")
    return {"target": int(port["target"]), "published": int(port["published"]),
            "protocol": port.get("protocol", "tcp"), "mode": "host"}


def swarm_volume(volume: dict[str, Any], configs: dict[str, Any],
                 warnings: list[str]) -> dict[str, Any]:
    if volume["type"] == "volume":
        return {k: volume[k] for k in ("type", "source", "target", "read_only") if k in volume}
    source = Path(volume["source"])
    if volume["type"] == "bind" and source.is_file():
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
        config = re.sub(r"[^a-z0-9]+", "_", source.name.lower()).strip("_") + f"_{digest}"
        configs[config] = {"file": str(source)}
        return {"type": "config", "source": config, "target": volume["target"]}
    warnings.append(f"{source} is bound from the host: it must exist on every node the "
                    "service may run on")
    return {k: volume[k] for k in ("type", "source", "target", "read_only") if k in volume}


def swarm_deploy(name: str, service: dict[str, Any]) -> dict[str, Any]:
    compose_deploy = service.get("deploy") or {}
    order = "start-first" if name in START_FIRST else "stop-first"
    update = {"parallelism": 1, "order": order, "failure_action": "rollback",
              "monitor": "30s", "delay": "5s"}
    deploy: dict[str, Any] = {"endpoint_mode": "dnsrr"}
    if name in GLOBAL:
        deploy["mode"] = "global"
    else:
        deploy["replicas"] = int(compose_deploy.get("replicas") or 1)
    limits = dict((compose_deploy.get("resources") or {}).get("limits") or {})
    if service.get("mem_limit"):
        limits["memory"] = f"{int(service['mem_limit']) // 2**20}M"
    if limits:
        deploy["resources"] = {"limits": limits}
    deploy["restart_policy"] = {"condition": "any", "delay": "5s"}
    deploy["update_config"] = update
    deploy["rollback_config"] = {k: v for k, v in update.items() if k != "failure_action"}
    if name in PLACEMENT:
        deploy["placement"] = {"constraints": [PLACEMENT[name]]}
    return deploy


def swarm_network(network: dict[str, Any]) -> dict[str, Any]:
    # Encrypted (IPsec between nodes): SMTP between the hops, Redis's AUTH and the tracking
    # events cross the network between nodes in clear otherwise.
    out: dict[str, Any] = {"driver": "overlay", "driver_opts": {"encrypted": "true"}}
    if network.get("ipam"):
        out["ipam"] = network["ipam"]
    return out


PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def yaml_key(key: object) -> str:
    text = str(key)
    plain = PLAIN_KEY.fullmatch(text) and text.lower() not in YAML_WORDS
    return text if plain else json.dumps(text)


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML for what JSON holds; scalars in JSON's syntax, which YAML reads."""
    pad = " " * indent
    if isinstance(value, dict) and value:
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{yaml_key(key)}:\n{to_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{yaml_key(key)}: {json.dumps(item)}")
        return "\n".join(lines)
    if isinstance(value, list) and value:
        lines = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                nested = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {nested.lstrip()}")
            else:
                lines.append(f"{pad}- {json.dumps(item)}")
        return "\n".join(lines)
    return pad + json.dumps(value)


def compose_config(files: list[str], profiles: list[str]) -> dict[str, Any]:
    command = ["docker", "compose", *(a for f in files for a in ("-f", f)),
               *(a for p in profiles for a in ("--profile", p)), "config", "--format", "json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"secumail.stack: {' '.join(command)} failed:\n{result.stderr}")
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m secumail.stack", description=(
        "Print the Docker Swarm stack made from compose.yaml (docker stack deploy -c)."))
    parser.add_argument("-f", "--file", action="append", default=[],
                        help="compose files, as for docker compose (default: compose.yaml)")
    parser.add_argument("--profile", action="append", default=[],
                        help="optional services to include besides redis (prometheus)")
    parser.add_argument("--registry", default="",
                        help="registry the images were pushed to (host:port/path)")
    args = parser.parse_args(argv)
    config = compose_config(args.file or ["compose.yaml"], ["redis", *args.profile])
    warnings: list[str] = []
    stack = stack_from_config(config, args.registry, warnings)
    for warning in warnings:
        print(f"secumail.stack: {warning}", file=sys.stderr)
    print("# Made by `python3 -m secumail.stack` from compose.yaml: edit that (or .env,")
    print("# secumail.env) and make this again.")
    print(to_yaml(stack))


if __name__ == "__main__":
    main()
