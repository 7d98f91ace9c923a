"""Connection shares: each service's allocation of its cluster, as the platform file sets them.

A service with an allocation (db/database_limits.toml `allocation`, from the platform file's
`db_allocations`) may hold that many connections at its worst case, migration included. The
cluster fits when its allocations, the worst cases of the services without one and the external
consumers fit max_connections - reserved, and every service's worst case fits its allocation.
Services without one (generated before allocations) still count other_consumers in their own
test; they are listed so the platform team can give them one (`--suggest-allocations`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from .services import InputError, Service


class ClusterLimits(Protocol):
    """What a cluster gives its services (fleet.Limits)."""

    @property
    def max_connections(self) -> int: ...
    @property
    def reserved_connections(self) -> int: ...
    @property
    def available(self) -> int: ...


class Cluster(Protocol):
    """The cluster as the fleet reads it (fleet.Cluster): this module only reads it, and fleet
    imports this module, so it names what it reads instead of importing fleet."""

    @property
    def name(self) -> str: ...
    @property
    def limits(self) -> ClusterLimits: ...
    @property
    def services(self) -> list[Service]: ...
    @property
    def external_total(self) -> int: ...
    def shrink_first(self) -> list[Service]: ...


# A role or a service at this share of its allocation or more is reported by doctor as near it.
NEAR = 0.9
# How many of the shares that overflow a cluster its text names, largest first.
NAMED = 10


def allocation(service: Service) -> int:
    """The service's allocation (0: none)."""
    return service.limits.allocation


def committed(service: Service) -> int:
    """What the cluster must keep for the service: its allocation, else its worst case."""
    return allocation(service) or service.total


@dataclass(frozen=True)
class Shares:
    """One cluster's allocations against what it has, and each service against its own."""

    allocated: int  # sum of the allocations
    unallocated_worst: int  # summed worst cases of the services without one
    external: int
    available: int  # max_connections - reserved

    @property
    def committed(self) -> int:
        return self.allocated + self.unallocated_worst + self.external

    @property
    def headroom(self) -> int:
        """Connections no allocation, unallocated service or external consumer can take."""
        return self.available - self.committed

    @property
    def fits(self) -> bool:
        return self.headroom >= 0


def shares(cluster: Cluster) -> Shares:
    members = cluster.services
    return Shares(
        allocated=sum(allocation(service) for service in members),
        unallocated_worst=sum(service.total for service in members if not allocation(service)),
        external=cluster.external_total,
        available=cluster.limits.available,
    )


def over_allocation(cluster: Cluster) -> list[Service]:
    """Services whose worst case does not fit their allocation."""
    return [
        service
        for service in cluster.services
        if allocation(service) and service.total > allocation(service)
    ]


def without_allocation(cluster: Cluster) -> list[Service]:
    return [service for service in cluster.services if not allocation(service)]


def fits(cluster: Cluster) -> bool:
    """Allocations fit the cluster and every service fits its own (no allocation: always)."""
    return shares(cluster).fits and not over_allocation(cluster)


def largest_commitments(cluster: Cluster) -> list[Service]:
    """The largest commitments, largest first, until taking them away covers the overflow."""
    chosen: list[Service] = []
    covered, overflow = 0, -shares(cluster).headroom
    for service in sorted(cluster.services, key=lambda item: (-committed(item), item.name)):
        if covered >= overflow:
            break
        chosen.append(service)
        covered += committed(service)
    return chosen


def text_lines(cluster: Cluster) -> list[str]:
    """The cluster's shares for `poolwise fleet`'s text, each line indented under it."""
    if not any(allocation(service) for service in cluster.services):
        return []  # a fleet from before allocations: its report stays as it was
    share = shares(cluster)
    allocated = [service for service in cluster.services if allocation(service)]
    unallocated = without_allocation(cluster)
    parts = [f"{share.allocated} allocated to {len(allocated)} services"]
    if unallocated:
        parts.append(f"{share.unallocated_worst} worst case of {len(unallocated)} without one")
    if share.external:
        parts.append(f"{share.external} other consumers")
    verdict = (
        f"unallocated headroom {share.headroom}"
        if share.fits
        else f"OVER by {-share.headroom}: the allocations overflow the cluster"
    )
    lines = [
        f"  allocations: {' + '.join(parts)} = {share.committed}"
        f" {'<=' if share.fits else '>'} {share.available} available: {verdict}"
    ]
    if not share.fits:
        # The shares that together overflow the cluster, largest first (the ten largest of a
        # big fleet: --json lists every service's allocation).
        ordered = sorted(cluster.services, key=lambda item: (-committed(item), item.name))
        named = ", ".join(
            f"{service.name} {committed(service)}"
            f"{'' if allocation(service) else ' (no allocation: worst case)'}"
            for service in ordered[:NAMED]
        ) + (f" and {len(ordered) - NAMED} smaller" if len(ordered) > NAMED else "")
        first = ", ".join(service.name for service in largest_commitments(cluster))
        lines.append(
            f"  over the cluster by {-share.headroom}: {named}; lower the platform file's"
            f" db_allocations by {-share.headroom} (largest first: {first})"
        )
    for service in over_allocation(cluster):
        lines.append(
            f"  over its allocation: {service.name} worst case {service.total}"
            f" > allocation {allocation(service)} ({service.worst.variant}); shrink the service"
            f" or give it {service.total} in the platform file's db_allocations"
        )
    if unallocated:
        listed = ", ".join(
            f"{service.name} (other_consumers {service.limits.other_consumers})"
            for service in unallocated
        )
        lines.append(
            f"  without an allocation, their own test counts other_consumers: {listed};"
            " give them one (poolwise fleet --suggest-allocations)"
        )
    return lines


def as_json(cluster: Cluster) -> dict[str, object]:
    share = shares(cluster)
    return {
        "allocated": share.allocated,
        "committed": share.committed,
        "unallocated_headroom": share.headroom,
        "allocations_fit": share.fits,
        "over_the_cluster": (
            [] if share.fits else [service.name for service in largest_commitments(cluster)]
        ),
        "over_allocation": [service.name for service in over_allocation(cluster)],
        "without_allocation": [service.name for service in without_allocation(cluster)],
    }


def suggest(cluster: Cluster) -> dict[str, int]:
    """Allocations from today's worst cases that fit the cluster.

    Each service gets its worst case plus a share of half the free room, in proportion to its
    worst case (rounded down); the other half stays unallocated, for new services and growth.
    """
    names = Counter(service.name for service in cluster.services)
    twice = sorted(name for name, count in names.items() if count > 1)
    if twice:
        raise InputError(
            f"cluster {cluster.name}: {', '.join(twice)} names more than one service, and"
            " db_allocations is keyed by project_name; give each service its own name"
        )
    worst = sum(service.total for service in cluster.services)
    free = cluster.limits.available - cluster.external_total - worst
    if free < 0:
        first = ", ".join(f"{s.name} ({s.total})" for s in cluster.shrink_first())
        raise InputError(
            f"cluster {cluster.name}: today's worst cases ({worst}) and other consumers"
            f" ({cluster.external_total}) need {worst + cluster.external_total} of"
            f" {cluster.limits.available} available, so no allocations from them fit;"
            f" shrink first: {first}"
        )
    extra = free // 2
    return {
        service.name: service.total + extra * service.total // max(worst, 1)
        for service in sorted(cluster.services, key=lambda item: item.name)
    }


def suggestion_yaml(result: list[Cluster]) -> str:
    """The `db_allocations:` block of one cluster's platform file, to paste into it."""
    if len(result) != 1:
        names = ", ".join(cluster.name for cluster in result)
        raise InputError(
            f"the paths hold the clusters {names}; --suggest-allocations prints one platform"
            " file's block: pass --cluster NAME"
        )
    [cluster] = result
    suggested = suggest(cluster)
    total = sum(suggested.values())
    limits = cluster.limits
    lines = [
        f"# poolwise fleet --suggest-allocations: cluster {cluster.name}. Paste into its platform",
        "# file; each service gets its worst case today plus a share of half the free room.",
        f"# {total} allocated + {cluster.external_total} db_external_consumers of"
        f" {limits.available} available ({limits.max_connections} max_connections"
        f" - {limits.reserved_connections} reserved):"
        f" {limits.available - total - cluster.external_total} left unallocated.",
        "db_allocations:",
    ]
    by_name = {service.name: service for service in cluster.services}
    for name, connections in suggested.items():
        service = by_name[name]
        today = f", allocation today {allocation(service)}" if allocation(service) else ""
        lines.append(f"  {_yaml_key(name)}: {connections}  # worst case {service.total}{today}")
    return "\n".join(lines)


def _yaml_key(name: str) -> str:
    """A project_name as a YAML key: plain when it is (names are letters, digits, ' ._-')."""
    plain = name[:1].isalpha() and all(ch.isalnum() or ch in "._-" for ch in name)
    return name if plain else json.dumps(name)
