"""Every service that shares a PostgreSQL cluster, summed against what the cluster can give.

Each service's worst case is what its own budget computes for the deployed variant that can open
the most connections (poolwise.rule's database hop: the app side, or PgBouncer's or RDS Proxy's
server side, plus its migration). The cluster's limits come from the services' own
database_limits.toml, or from a proposed limits file (the dry run of a limits change).
"""

from __future__ import annotations

import dataclasses
import html
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import allocations, guardrail, rule
from .services import InputError, Service


@dataclass
class Limits:
    """What one cluster gives all of its services, and where that was read."""

    max_connections: int
    reserved_connections: int
    external_consumers: dict[str, int]
    source: str
    # A proposed platform file's db_allocations (service name to connections, 0 for none); the
    # services it does not name keep the allocation of their own database_limits.toml.
    allocations: dict[str, int] = field(default_factory=dict)

    @property
    def available(self) -> int:
        return self.max_connections - self.reserved_connections


@dataclass
class Cluster:
    name: str
    limits: Limits
    services: list[Service]
    notes: list[str] = field(default_factory=list)

    @property
    def external_total(self) -> int:
        return sum(self.limits.external_consumers.values())

    @property
    def total(self) -> int:
        return sum(service.total for service in self.services) + self.external_total

    @property
    def headroom(self) -> int:
        return self.limits.available - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0 and allocations.fits(self)

    @property
    def verdict(self) -> str:
        if self.headroom < 0:
            return f"OVER by {-self.headroom}"
        return "fits" if self.fits else "OVER its allocations"

    def share(self, connections: int) -> float:
        return connections / self.limits.available if self.limits.available > 0 else float("inf")

    def shrink_first(self) -> list[Service]:
        """The biggest services, largest first, until shrinking them away covers the overage."""
        chosen: list[Service] = []
        covered = 0
        for service in sorted(self.services, key=lambda item: (-item.total, item.name)):
            if covered >= -self.headroom:
                break
            chosen.append(service)
            covered += service.total
        return chosen


def _declared_limits(services: list[Service]) -> tuple[Limits, list[str]]:
    """One cluster's limits from its services' files; disagreements become notes."""
    counts = Counter(
        (service.limits.max_connections, service.limits.reserved_connections)
        for service in services
    )
    # The smallest max_connections any service was told about is the one that can be true.
    max_connections, reserved = min(counts, key=lambda pair: (pair[0], -pair[1]))
    notes = []
    if len(counts) > 1:
        told = "; ".join(
            f"{service.name} {limits.max_connections} - {limits.reserved_connections}"
            for service in services
            for limits in (service.limits,)
        )
        notes.append(
            f"the services disagree on max_connections - reserved ({told}); the smallest,"
            f" {max_connections} - {reserved}, is used: give them one platform data file"
        )
    external: dict[str, int] = {}
    for service in services:
        for name, connections in service.external_consumers.items():
            external[name] = max(external.get(name, 0), int(connections))
    return Limits(max_connections, reserved, external, "the services' database_limits.toml"), notes


def load_proposed(path: Path) -> dict[str, Limits]:
    """Proposed limits per cluster, from a platform data file (one cluster, or `clusters:`)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{path}: cannot be read ({error})") from None
    entries = data.get("clusters", [data]) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a mapping of platform answers (db_cluster, ...)")
    proposed = {}
    for entry in entries:
        try:
            name = str(entry.get("db_cluster", "main"))
            proposed[name] = Limits(
                max_connections=int(entry["db_max_connections"]),
                reserved_connections=int(entry.get("db_reserved_connections", 0)),
                external_consumers={
                    str(key): int(value)
                    for key, value in (entry.get("db_external_consumers") or {}).items()
                },
                source=str(path),
                allocations=_proposed_allocations(entry, path),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise InputError(
                f"{path}: a cluster needs db_max_connections as a whole number ({error!r})"
            ) from None
    return proposed


def _proposed_allocations(entry: dict[str, Any], path: Path) -> dict[str, int]:
    shares = entry.get("db_allocations") or {}
    if not isinstance(shares, dict):
        raise InputError(f"{path}: db_allocations must map service names to connections")
    for name, connections in shares.items():
        if not isinstance(connections, int) or isinstance(connections, bool) or connections < 0:
            raise InputError(
                f"{path}: db_allocations[{name!r}]={connections!r} -> it must be a whole number of"
                " connections (0 for none); fix it"
            )
    return {str(name): connections for name, connections in shares.items()}


def _with_allocation(service: Service, shares: dict[str, int]) -> Service:
    """The service with the proposed file's allocation for it, when the file names it."""
    if service.name not in shares:
        return service
    limits = service.limits._replace(allocation=shares[service.name])
    return dataclasses.replace(service, limits=limits)


def clusters(services: list[Service], proposed: dict[str, Limits] | None = None) -> list[Cluster]:
    grouped: dict[str, list[Service]] = {}
    for service in services:
        grouped.setdefault(service.cluster, []).append(service)
    result = []
    for name in sorted(grouped):
        members = sorted(grouped[name], key=lambda service: service.name)
        limits, notes = _declared_limits(members)
        if proposed and name in proposed:
            limits, notes = proposed[name], []
            members = [_with_allocation(service, limits.allocations) for service in members]
        cluster = Cluster(name, limits, members, notes)
        named = Counter(service.name for service in members)
        for service_name, count in sorted(named.items()):
            if count > 1:
                cluster.notes.append(
                    f"{count} services are named {service_name}, and their processes share the"
                    " application_name: poolwise doctor cannot tell their connections apart;"
                    " give each its own project_name"
                )
        committed = allocations.shares(cluster).committed
        for service in allocations.without_allocation(cluster):
            others = committed - service.total
            if service.limits.other_consumers < others:
                cluster.notes.append(
                    f"{service.name} declares other_consumers {service.limits.other_consumers},"
                    f" but the rest of {name} can hold {others}: its own budget test checks"
                    f" against too much room; set other_consumers to {others}"
                )
        result.append(cluster)
    return result


# ----------------------------------------------------------------------------- output


def _hops(service: Service, cluster: Cluster) -> list[rule.Check]:
    reading = service.worst
    # Each hop against the service's allocation, or (without one) the rest of the cluster.
    limits = rule.DatabaseLimits(
        cluster.limits.max_connections,
        cluster.limits.reserved_connections,
        allocations.shares(cluster).committed - service.total,
        allocations.allocation(service),
    )
    return rule.checks(reading.topology, limits)


def text(result: list[Cluster]) -> str:
    lines = []
    for cluster in result:
        limits = cluster.limits
        lines.append(
            f"cluster {cluster.name}: {cluster.total} of {limits.available} available"
            f" ({limits.max_connections} max_connections - {limits.reserved_connections}"
            f" reserved), headroom {cluster.headroom}: {cluster.verdict}"
            f"  [limits: {limits.source}]"
        )
        width = max(len(service.name) for service in cluster.services)
        shared = any(allocations.allocation(service) for service in cluster.services)
        for service in cluster.services:
            # With allocations, each row shows the service's own: "of 60", or "of -" for none.
            share = f" of {allocations.allocation(service) or '-':<4}" if shared else ""
            lines.append(
                f"  {service.name:<{width}}  {service.target:<9}  {service.pooler:<9}"
                f"  {service.total:>5}{share}  {cluster.share(service.total):>4.0%}"
                f"  {service.worst.variant} ({service.root})"
            )
            for check in _hops(service, cluster):
                lines.append(f"      {check.hop}: {check.formula}")
        if limits.external_consumers:
            listed = ", ".join(f"{name} {n}" for name, n in limits.external_consumers.items())
            lines.append(
                f"  {'other consumers':<{width}}  {'':<9}  {'':<9}  {cluster.external_total:>5}"
                f"  {cluster.share(cluster.external_total):>4.0%}  {listed}"
            )
        lines.append(
            f"  {'total':<{width}}  {'':<9}  {'':<9}  {cluster.total:>5}"
            f"  {cluster.share(cluster.total):>4.0%}  {'<=' if cluster.headroom >= 0 else '>'}"
            f" {limits.available} available"
        )
        if cluster.headroom < 0:
            first = ", ".join(
                f"{service.name} ({service.total})" for service in cluster.shrink_first()
            )
            lines.append(f"  shrink first: {first}")
        lines += allocations.text_lines(cluster)
        lines += [f"  note: {note}" for note in cluster.notes]
    return "\n".join(lines)


def as_json(result: list[Cluster]) -> dict[str, Any]:
    return {
        "fits": all(cluster.fits for cluster in result),
        "clusters": [
            {
                "name": cluster.name,
                "max_connections": cluster.limits.max_connections,
                "reserved_connections": cluster.limits.reserved_connections,
                "available": cluster.limits.available,
                "limits_source": cluster.limits.source,
                "external_consumers": cluster.limits.external_consumers,
                "total": cluster.total,
                "headroom": cluster.headroom,
                "fits": cluster.fits,
                "shrink_first": [service.name for service in cluster.shrink_first()],
                **allocations.as_json(cluster),
                "notes": cluster.notes,
                "services": [
                    {
                        "name": service.name,
                        "path": str(service.root),
                        "target": service.target,
                        "pooler": service.pooler,
                        "role": service.role,
                        "template_version": service.template_version,
                        "variant": service.worst.variant,
                        "total": service.total,
                        "allocation": allocations.allocation(service) or None,
                        "share": round(cluster.share(service.total), 4),
                        "hops": [
                            {
                                "hop": check.hop,
                                "formula": check.formula,
                                "total": check.total,
                                "limit": check.limit,
                                "fits": check.fits,
                            }
                            for check in _hops(service, cluster)
                        ],
                    }
                    for service in cluster.services
                ],
            }
            for cluster in result
        ],
    }


def choose(result: list[Cluster], name: str | None) -> list[Cluster]:
    """The clusters to report: all of them, or the one --cluster names."""
    if name is None:
        return result
    chosen = [cluster for cluster in result if cluster.name == name]
    if not chosen:
        names = ", ".join(cluster.name for cluster in result)
        raise InputError(f"--cluster {name}: the paths hold only {names}")
    return chosen


def sql(result: list[Cluster]) -> str:
    """The guardrail of one cluster: each role capped at its services' summed worst case.

    One cluster only, because its output is piped into one server: roles of another cluster
    would be created and capped on the wrong one.
    """
    if len(result) != 1:
        names = ", ".join(cluster.name for cluster in result)
        raise InputError(
            f"the paths hold the clusters {names}; --sql prints the SQL of one, to run on its"
            " primary: pass --cluster NAME"
        )
    [cluster] = result
    return guardrail.cluster_sql(cluster.name, cluster.services)


SVG_COLORS = ("#4c78a8", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d")


def svg(result: list[Cluster]) -> str:
    """One stacked bar per cluster: services, other consumers, reserved, free (or over)."""
    width, bar, gap, left = 760, 28, 46, 10
    height = gap * len(result) + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 2 * left}" height="{height}"'
        ' font-family="sans-serif" font-size="11">'
    ]
    for row, cluster in enumerate(result):
        limits = cluster.limits
        used = cluster.total + limits.reserved_connections
        scale = width / max(limits.max_connections, used, 1)
        top = 18 + row * gap
        parts.append(
            f'<text x="{left}" y="{top - 4}">{html.escape(cluster.name)}: {cluster.total} of'
            f" {limits.available} available, {cluster.verdict}</text>"
        )
        segments = [
            (service.name, service.total, SVG_COLORS[index % len(SVG_COLORS)])
            for index, service in enumerate(cluster.services)
        ]
        if cluster.external_total:
            segments.append(("other consumers", cluster.external_total, "#bab0ac"))
        segments.append(("reserved", limits.reserved_connections, "#555555"))
        if cluster.headroom > 0:
            segments.append(("free", cluster.headroom, "#ffffff"))
        x = float(left)
        for label, connections, color in segments:
            w = connections * scale
            parts.append(
                f'<rect x="{x:.1f}" y="{top}" width="{w:.1f}" height="{bar}" fill="{color}"'
                f' stroke="#333" stroke-width="0.5"><title>{html.escape(label)}: {connections}'
                "</title></rect>"
            )
            if w > 40:
                parts.append(
                    f'<text x="{x + 3:.1f}" y="{top + bar / 2 + 4}"'
                    f' fill="{"#000" if color in ("#ffffff", "#eeca3b") else "#fff"}">'
                    f"{html.escape(label)} {connections}</text>"
                )
            x += w
        limit_x = left + limits.max_connections * scale
        parts.append(
            f'<line x1="{limit_x:.1f}" y1="{top - 2}" x2="{limit_x:.1f}" y2="{top + bar + 2}"'
            f' stroke="{"#000" if cluster.fits else "#d62728"}" stroke-width="2"/>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
