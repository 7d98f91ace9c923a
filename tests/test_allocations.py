"""Connection shares: the platform file gives each service its allocation, and the fleet, each
service's own budget, the guardrail SQL and PgBouncer all check the same numbers.

Services are rendered with the copier CLI from one platform file (its db_allocations names two
of them; the third, like a service from before allocations, counts other_consumers), and
`poolwise fleet` runs as a subprocess, so the exit codes are the ones a CI job sees.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from rendering import copier_copy, python, run, succeeded
from test_fleet import cluster_named, copy_of, fleet_json, guardrail_statements, poolwise, set_role

CLUSTER = {"db_cluster": "orders-db", "db_max_connections": 200, "db_reserved_connections": 3}
PLATFORM = {**CLUSTER, "db_allocations": {"orders-api": 60, "events-api": 30}}
# orders-api: (3 + 1 surge + 1 terminating) x (5 + 5) + 1 = 51 of 60; events-api: PgBouncer's
# 20 server connections + 1 = 21 of 30; nightly-report: 2 pods x NullPool + 1 = 3, no allocation.
SERVICES = {
    "orders-api": {"target": "k8s-sync"},
    "events-api": {"target": "k8s-async", "pooler": "pgbouncer"},
    "nightly-report": {"target": "batch", "other_consumers": 90},
}


@pytest.fixture(scope="module")
def platform_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("platform") / "orders-db.yml"
    path.write_text(yaml.safe_dump(PLATFORM))
    return path


@pytest.fixture(scope="module")
def shares(tmp_path_factory: pytest.TempPathFactory, platform_file: Path) -> Path:
    """Three services rendered from one platform file, as the platform team hands it out."""
    root = tmp_path_factory.mktemp("shares")
    for name, answers in SERVICES.items():
        succeeded(
            copier_copy(
                root / name,
                "--data-file",
                str(platform_file),
                answers={"project_name": name, **answers},
                timeout=180,
            )
        )
    return root


def limits_file(service: Path) -> Path:
    [path] = service.glob("src/*/db/database_limits.toml")
    return path


def test_each_service_renders_its_own_share_and_nothing_else(shares: Path) -> None:
    orders = limits_file(shares / "orders-api").read_text()
    assert "\nallocation = 60\n" in orders and "other_consumers =" not in orders
    # No service carries another's numbers: neither the mapping nor the other shares.
    for service in SERVICES:
        recorded = (shares / service / ".copier-answers.yml").read_text()
        assert "db_allocations" not in recorded
        others = set(PLATFORM["db_allocations"]) - {service}
        assert not [
            name for name in others if name in recorded + limits_file(shares / service).read_text()
        ]
    legacy = limits_file(shares / "nightly-report").read_text()
    assert "\nother_consumers = 90\n" in legacy and "\nallocation =" not in legacy
    # PgBouncer may open the share less the migration's direct connection.
    ini = (shares / "events-api" / "deploy" / "pgbouncer" / "pgbouncer.ini").read_text()
    assert "\nmax_user_connections = 29\n" in ini


def test_a_mixed_fleet_fits_its_shares_and_lists_the_services_without_one(shares: Path) -> None:
    result = poolwise("fleet", shares)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "  allocations: 90 allocated to 2 services + 3 worst case of 1 without one = 93"
        " <= 197 available: unallocated headroom 104"
    ) in result.stdout.splitlines()
    assert (
        "  without an allocation, their own test counts other_consumers: nightly-report"
        " (other_consumers 90); give them one (poolwise fleet --suggest-allocations)"
    ) in result.stdout.splitlines()
    orders = cluster_named(fleet_json(shares), "orders-db")
    assert {service["name"]: service["allocation"] for service in orders["services"]} == {
        "events-api": 30,
        "nightly-report": None,
        "orders-api": 60,
    }
    assert (orders["allocated"], orders["committed"], orders["unallocated_headroom"]) == (
        90,
        93,
        104,
    )
    assert orders["without_allocation"] == ["nightly-report"]
    assert orders["over_allocation"] == [] and orders["fits"] is True
    # nightly-report's other_consumers (90) covers the others' shares (90): no note.
    assert orders["notes"] == []
    orders_api = next(s for s in orders["services"] if s["name"] == "orders-api")
    assert orders_api["hops"][-1]["limit"] == 60


def test_allocations_that_overflow_the_cluster_exit_1_naming_the_services(
    shares: Path, tmp_path: Path
) -> None:
    # A dry run of the platform file's next version: the cluster shrinks to 100 connections
    # and events-api is promised 40; every service still fits its own share.
    smaller = tmp_path / "smaller.yml"
    smaller.write_text(
        yaml.safe_dump(
            {
                **CLUSTER,
                "db_max_connections": 100,
                "db_allocations": {"orders-api": 60, "events-api": 40},
            }
        )
    )
    result = poolwise("fleet", "--limits", smaller, shares)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert (
        "  allocations: 100 allocated to 2 services + 3 worst case of 1 without one = 103"
        " > 97 available: OVER by 6: the allocations overflow the cluster"
    ) in lines
    assert (
        "  over the cluster by 6: orders-api 60, events-api 40, nightly-report 3 (no allocation:"
        " worst case); lower the platform file's db_allocations by 6 (largest first: orders-api)"
    ) in lines
    # The worst cases alone (75) fit: only the shares do not.
    assert (
        "cluster orders-db: 75 of 97 available (100 max_connections - 3 reserved), headroom 22:"
        " OVER its allocations" in result.stdout
    )
    report = cluster_named(fleet_json("--limits", smaller, shares), "orders-db")
    assert (report["fits"], report["allocations_fit"]) == (False, False)
    assert report["over_the_cluster"] == ["orders-api"]
    # The services' own files were not touched by the dry run.
    assert "\nallocation = 60\n" in limits_file(shares / "orders-api").read_text()


def test_a_service_over_its_allocation_fails_while_the_cluster_fits(
    shares: Path, tmp_path: Path
) -> None:
    grown = copy_of(shares, tmp_path)
    hpa = grown / "orders-api" / "deploy" / "k8s" / "hpa.yaml"
    hpa.write_text(re.sub(r"(?m)^  maxReplicas: 3$", "  maxReplicas: 4", hpa.read_text()))
    # Its own budget: (4 + 1 + 1) x (5 + 5) + 1 = 61 > its 60, with the same formula and fix.
    own = run(python("-m", "poolwise", "budget"), grown / "orders-api" / "src")
    assert own.returncode == 1, own.stdout + own.stderr
    assert (
        "= 60 + 1 migration = 61 > allocation 60 (db/database_limits.toml). Fix: at 6 processes"
        " pool_size + max_overflow must be <= 9;"
    ) in own.stderr
    assert (
        "deploy/k8s/hpa.yaml (HorizontalPodAutoscaler/orders-api): spec.maxReplicas=4 ->"
        in own.stderr
    )

    result = poolwise("fleet", grown)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # 61 + 21 + 3 = 85 of 197: the cluster has room, the service has not.
    assert any(line.startswith("cluster orders-db: 85 of 197 available") for line in lines)
    assert (
        "  over its allocation: orders-api worst case 61 > allocation 60 (deploy/k8s); shrink the"
        " service or give it 61 in the platform file's db_allocations"
    ) in lines
    report = cluster_named(fleet_json(grown), "orders-db")
    assert (report["allocations_fit"], report["over_allocation"]) == (True, ["orders-api"])
    assert report["fits"] is False


def test_a_role_shared_by_two_services_is_capped_at_their_shares(
    shares: Path, tmp_path: Path
) -> None:
    shared = copy_of(shares, tmp_path)
    for name in ("orders-api", "nightly-report"):
        set_role(shared / name, "app")
    result = poolwise("fleet", "--sql", "--cluster", "orders-db", shared)
    assert result.returncode == 0, result.stderr
    # orders-api's share (60) and nightly-report's worst case (3, it has no share); events-api
    # its share (30), not its worst case (21).
    assert guardrail_statements(result.stdout) == [("app", 60 + 3), ("events_api", 30)]
    lines = result.stdout.splitlines()
    assert (
        "-- role app: nightly-report 3 (app -> database) + orders-api allocation 60 (worst case"
        " 51, app -> database) = 63, migrations included"
    ) in lines
    assert (
        "-- events-api deploy/pgbouncer/pgbouncer.ini [pgbouncer]: max_db_connections = 20,"
        " max_user_connections = 29"
    ) in lines


def test_suggested_allocations_fit_and_paste_into_the_platform_file(
    shares: Path, tmp_path: Path, platform_file: Path
) -> None:
    result = poolwise("fleet", "--suggest-allocations", shares)
    assert result.returncode == 0, result.stdout + result.stderr
    suggested = yaml.safe_load(result.stdout)["db_allocations"]
    worst = {"orders-api": 51, "events-api": 21, "nightly-report": 3}
    assert set(suggested) == set(worst)
    # Today's worst case each, plus a share of half the free room (197 - 75 = 122 -> 61).
    # orders-api 51 + 61 x 51 // 75, events-api 21 + 61 x 21 // 75, nightly-report 3 + 61 x 3 // 75.
    assert suggested == {"orders-api": 92, "events-api": 38, "nightly-report": 5}
    assert all(suggested[name] >= worst[name] for name in worst)
    assert (
        "# 135 allocated + 0 db_external_consumers of 197 available (200 max_connections"
        " - 3 reserved): 62 left unallocated."
    ) in result.stdout
    # Pasted into the platform file, the fleet's dry run of it fits.
    pasted = tmp_path / "pasted.yml"
    pasted.write_text(
        re.sub(r"(?ms)^db_allocations:.*?(?=^\S|\Z)", "", platform_file.read_text())
        + result.stdout
        + "\n"
    )
    dry_run = cluster_named(fleet_json("--limits", pasted, shares), "orders-db")
    assert dry_run["fits"] is True and dry_run["without_allocation"] == []
    assert {s["name"]: s["allocation"] for s in dry_run["services"]} == suggested


def test_suggestions_are_refused_when_todays_worst_cases_cannot_fit(
    shares: Path, tmp_path: Path
) -> None:
    tiny = tmp_path / "tiny.yml"
    tiny.write_text(yaml.safe_dump({**CLUSTER, "db_max_connections": 60}))
    result = poolwise("fleet", "--suggest-allocations", "--limits", tiny, shares)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "poolwise fleet: cluster orders-db: today's worst cases (75) and other consumers (0)"
        " need 75 of 57 available, so no allocations from them fit; shrink first: orders-api"
        " (51)\n"
    )
