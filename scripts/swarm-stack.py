#!/usr/bin/env python3
"""Turn `docker compose config --format json` into a file `docker stack deploy` accepts.

    docker compose -f compose.yaml config --format json \
        | python3 scripts/swarm-stack.py [--endpoint-mode dnsrr] | docker stack deploy -c - fedland

`docker stack deploy` reads the older v3 schema: no top-level `name`, only a
list for `depends_on`, no `host_ip` on ports, and it ignores `restart`. This
keeps the rendered stack (secrets already interpolated from .env) and changes
only what Swarm needs:

- `depends_on` becomes a plain list (Swarm never waited on it anyway: the
  server and clients retry until MongoDB and the server answer);
- a port bound to a host address (mongo-express on 127.0.0.1) is dropped,
  since the routing mesh would publish it on every node;
- a one-shot service (`restart: "no"`, data-init) runs once on every node
  (`global-job`), because named volumes are per node and every node's clients
  need the data;
- `mongo` is pinned to a manager node, so it stays beside its volume.

`--endpoint-mode dnsrr` is for nodes whose kernel has no IPVS, which service
virtual IPs and the routing mesh need: every service is then found by DNS
round-robin, and the server's port is published in `host` mode, on the node
that runs the server only (clients elsewhere use that node's address).

Standard library only: it runs on any host with python3.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

PINNED_TO_MANAGER = ("mongo",)


def to_swarm(config: dict[str, Any], endpoint_mode: str = "vip") -> tuple[dict[str, Any], list[str]]:
    """Return the stack file for `config` (a rendered compose file) and warnings for a person."""
    if endpoint_mode not in ("vip", "dnsrr"):
        raise ValueError(f"endpoint_mode must be 'vip' or 'dnsrr', got {endpoint_mode!r}")
    stack = {key: value for key, value in config.items() if key != "name"}
    warnings: list[str] = []
    services: dict[str, Any] = {}
    for name, definition in config["services"].items():
        # compose renders unset fields as null (`entrypoint: null`); the v3 schema rejects that
        service = {key: value for key, value in definition.items() if value is not None}
        if isinstance(service.get("depends_on"), dict):
            service["depends_on"] = sorted(service["depends_on"])
        if "ports" in service:
            service["ports"], dropped = _swarm_ports(service["ports"], "ingress" if endpoint_mode == "vip" else "host")
            for port in dropped:
                warnings.append(
                    f"{name}: port {port['host_ip']}:{port['published']} dropped (Swarm publishes on every node); "
                    f"reach it with: docker service update --publish-add {port['published']}:{port['target']} "
                    f"<stack>_{name}, and --publish-rm afterwards"
                )
            if not service["ports"]:
                del service["ports"]
        deploy = dict(service.get("deploy") or {})
        if service.pop("restart", None) == "no":
            deploy.pop("replicas", None)
            deploy["mode"] = "global-job"
            deploy.setdefault("restart_policy", {"condition": "on-failure", "max_attempts": 3})
        if endpoint_mode == "dnsrr":
            deploy["endpoint_mode"] = "dnsrr"
        if name in PINNED_TO_MANAGER:
            placement = dict(deploy.get("placement") or {})
            placement.setdefault("constraints", ["node.role == manager"])
            deploy["placement"] = placement
        if deploy:
            service["deploy"] = deploy
        if "build" in service and "/" not in str(service.get("image", "")).split(":")[0]:
            warnings.append(
                f"{name}: image {service.get('image')!r} is local to this machine; push it to a registry "
                "and set FEDLAND_IMAGE so that every node can pull it"
            )
        service.pop("build", None)  # Swarm ignores it; the image must already be pushed
        services[name] = service
    stack["services"] = services
    return stack, warnings


def _swarm_ports(ports: list[Any], mode: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for port in ports:
        host_ip = port.get("host_ip", "")
        if host_ip not in ("", "0.0.0.0", "::"):
            dropped.append(port)
            continue
        kept.append(
            {
                "mode": mode,
                "target": int(port["target"]),
                "published": int(port["published"]),
                "protocol": port.get("protocol", "tcp"),
            }
        )
    return kept, dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--endpoint-mode", choices=("vip", "dnsrr"), default="vip",
        help="dnsrr: no service VIPs and host-mode ports, for kernels without IPVS (default vip)",
    )
    args = parser.parse_args(argv)
    try:
        config = json.load(sys.stdin)
    except json.JSONDecodeError as error:
        print(f"swarm-stack: stdin is not `docker compose config --format json` output: {error}", file=sys.stderr)
        return 2
    stack, warnings = to_swarm(config, args.endpoint_mode)
    for warning in warnings:
        print(f"swarm-stack: {warning}", file=sys.stderr)
    json.dump(stack, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
