"""`poolwise fleet`: every service on a cluster summed, as a platform team runs it over its repos.

Services are rendered with the CLI as teams render them (one of them from the 0.1.0 release, to
show that services of different template versions are read alike) and the command is run as a
subprocess, so the exit codes are the ones a CI job sees.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import pglast
import pytest
from psycopg import sql as psycopg_sql
from rendering import TEMPLATE_ROOT, clean_env, copier_copy, succeeded

from poolwise import deployed, fleet, rule, services

# main at the 0.1.0 release (tests/test_update.py builds its tag the same way).
RELEASE_0_1_0 = "639afbe"
CLUSTER = {"db_cluster": "orders-db", "db_max_connections": 200, "db_reserved_connections": 3}
# Three services of different targets, one behind PgBouncer, on one cluster.
SERVICES = {
    "orders-api": {"target": "k8s-sync", "other_consumers": 60},
    "events-api": {"target": "k8s-async", "pooler": "pgbouncer", "other_consumers": 60},
    "nightly-report": {"target": "batch", "other_consumers": 60},
}


def service_repo(destination: Path, ref: str, answers: dict) -> None:
    """A service repository rendered with the CLI from `ref`, as its team rendered it."""
    succeeded(copier_copy(destination, answers=answers, vcs_ref=ref, timeout=180))


def poolwise(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The installed command's entry point, run from the checkout's src/."""
    return subprocess.run(
        [sys.executable, "-m", "poolwise", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(PYTHONPATH=str(TEMPLATE_ROOT / "src")),
        check=False,
    )


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of service repositories: three from this checkout, one from 0.1.0."""
    root = tmp_path_factory.mktemp("repos")
    for name, answers in SERVICES.items():
        service_repo(root / name, "HEAD", {"project_name": name, **CLUSTER, **answers})
    # Generated before db_cluster existed: the fleet puts it on the cluster its answers name
    # (the default, main) and reads its deploy/ with today's loader.
    service_repo(root / "legacy-api", RELEASE_0_1_0, {"project_name": "legacy-api"})
    return root


def copy_of(repos: Path, tmp_path: Path) -> Path:
    target = tmp_path / "repos"
    shutil.copytree(repos, target)
    return target


def fleet_json(*args: str | Path) -> dict:
    result = poolwise("fleet", "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def cluster_named(report: dict, name: str) -> dict:
    return next(cluster for cluster in report["clusters"] if cluster["name"] == name)


def test_the_services_of_one_cluster_are_summed_and_fit(repos: Path) -> None:
    result = poolwise("fleet", repos)
    assert result.returncode == 0, result.stdout + result.stderr
    report = fleet_json(repos)
    orders = cluster_named(report, "orders-db")
    totals = {service["name"]: service["total"] for service in orders["services"]}
    # (3 + 1 surge + 1 terminating) x (5 + 5) + 1; PgBouncer's 20 server connections + 1;
    # 1 run x 2 pods x NullPool + 1.
    assert totals == {"orders-api": 51, "events-api": 21, "nightly-report": 3}
    assert (orders["total"], orders["available"], orders["headroom"]) == (75, 197, 122)
    assert orders["fits"] is True
    assert "cluster orders-db: 75 of 197 available" in result.stdout
    events = next(service for service in orders["services"] if service["name"] == "events-api")
    assert [hop["hop"] for hop in events["hops"]] == ["app -> pgbouncer", "pgbouncer -> database"]


def test_a_service_from_0_1_0_is_read_with_todays_loader(repos: Path) -> None:
    legacy = cluster_named(fleet_json(repos), "main")
    (service,) = legacy["services"]
    assert service["template_version"] == RELEASE_0_1_0
    # 0.1.0's Deployment has no minReadySeconds: every old pod may still be terminating.
    assert service["total"] == (3 + 1 + 3) * 10 + 1
    assert "(3 replicas_max + 1 max_surge + 3 terminating)" in service["hops"][0]["formula"]


def test_services_that_each_fit_alone_but_not_together_exit_1(repos: Path, tmp_path: Path) -> None:
    crowded = copy_of(repos, tmp_path)
    # search-api alone: (11 + 1 + 1) x 10 + 1 = 131 <= 197 - 60 other_consumers, so its own
    # budget test passes; with the three others (75) the cluster needs 206 of 197.
    service_repo(
        crowded / "search-api",
        "HEAD",
        {"project_name": "search-api", **CLUSTER, "replicas_max": 11, "other_consumers": 60},
    )
    result = poolwise("fleet", crowded)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cluster orders-db: 206 of 197 available" in result.stdout
    assert "OVER by 9" in result.stdout
    assert "shrink first: search-api (131)" in result.stdout
    assert "cluster main: 71 of 97 available" in result.stdout  # the other cluster still fits
    orders = cluster_named(fleet_json(crowded), "orders-db")
    assert (orders["fits"], orders["shrink_first"]) == (False, ["search-api"])

    # The clients that are not services count too: with them it is over by 24.
    limits = tmp_path / "orders-db.yml"
    limits.write_text(
        "db_cluster: orders-db\ndb_max_connections: 200\ndb_reserved_connections: 3\n"
        "db_external_consumers: {datadog-agent: 5, metabase: 10}\n"
    )
    over = poolwise("fleet", "--limits", limits, crowded)
    assert over.returncode == 1
    assert "cluster orders-db: 221 of 197 available" in over.stdout
    assert "OVER by 24" in over.stdout
    assert "other consumers" in over.stdout and "datadog-agent 5, metabase 10" in over.stdout
    assert f"[limits: {limits}]" in over.stdout


def test_a_dry_run_of_new_limits_touches_no_service(repos: Path, tmp_path: Path) -> None:
    before = {path: path.read_bytes() for path in repos.rglob("*") if path.is_file()}
    smaller = tmp_path / "smaller.yml"
    smaller.write_text(
        "db_cluster: orders-db\ndb_max_connections: 60\ndb_reserved_connections: 3\n"
    )
    refused = poolwise("fleet", "--limits", smaller, repos)
    assert refused.returncode == 1
    assert "cluster orders-db: 75 of 57 available" in refused.stdout
    assert "shrink first: orders-api (51)" in refused.stdout
    bigger = tmp_path / "bigger.yml"
    bigger.write_text("db_cluster: orders-db\ndb_max_connections: 800\n")
    assert poolwise("fleet", "--limits", bigger, repos).returncode == 0
    after = {path: path.read_bytes() for path in repos.rglob("*") if path.is_file()}
    assert after == before


def test_other_consumers_that_cover_the_cluster_leave_no_note(repos: Path) -> None:
    notes = cluster_named(fleet_json(repos), "orders-db")["notes"]
    # Each declares 60 others; the rest of orders-db holds at most 51 + 21 = 72 for
    # nightly-report, so only it is told to raise its number.
    assert [note.split(" declares")[0] for note in notes] == ["nightly-report"]


def write_limits(folder: Path, external: int) -> Path:
    path = folder / f"external-{external}.yml"
    path.write_text(
        "db_cluster: orders-db\ndb_max_connections: 400\ndb_reserved_connections: 3\n"
        f"db_external_consumers: {{bi: {external}}}\n"
    )
    return path


def test_a_cluster_whose_clients_outgrow_a_services_other_consumers_is_noted(
    repos: Path,
) -> None:
    result = poolwise("fleet", "--limits", write_limits(repos.parent, 100), repos)
    assert result.returncode == 0
    # The rest of orders-db for orders-api: 21 + 3 + 100 others = 124 > its declared 60.
    assert (
        "note: orders-api declares other_consumers 60, but the rest of orders-db can hold 124"
    ) in result.stdout


def test_the_sql_guardrail_caps_each_role_at_its_declared_worst_case(repos: Path) -> None:
    result = poolwise("fleet", "--sql", "--cluster", "orders-db", repos)
    assert result.returncode == 0, result.stderr
    assert guardrail_statements(result.stdout) == [
        ("events_api", 21),
        ("nightly_report", 3),
        ("orders_api", 51),
    ]
    lines = result.stdout.splitlines()
    assert "-- role orders_api: orders-api 51 (app -> database), migration included" in lines
    assert (
        "-- events-api deploy/pgbouncer/pgbouncer.ini [pgbouncer]: max_db_connections = 20,"
        " max_user_connections = 20"
    ) in lines


def test_the_sql_of_several_clusters_is_refused_without_cluster(repos: Path) -> None:
    # Piped into one psql, the roles of main would be created and capped on orders-db.
    result = poolwise("fleet", "--sql", repos)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "poolwise fleet: the paths hold the clusters main, orders-db; --sql prints the SQL of"
        " one, to run on its primary: pass --cluster NAME\n"
    )
    unknown = poolwise("fleet", "--sql", "--cluster", "nowhere", repos)
    assert unknown.returncode == 2
    assert "--cluster nowhere: the paths hold only main, orders-db" in unknown.stderr


def set_role(service_root: Path, role: str) -> Path:
    """Declare `role` in a service's database_limits.toml (a TOML basic string)."""
    [limits] = service_root.glob("src/*/db/database_limits.toml")
    text = re.sub(r"(?m)^role = .*$", lambda _: f"role = {json.dumps(role)}", limits.read_text())
    limits.write_text(text)
    return limits


def test_services_sharing_a_role_get_one_statement_capped_at_their_sum(
    repos: Path, tmp_path: Path
) -> None:
    shared = copy_of(repos, tmp_path)
    for name in ("orders-api", "nightly-report"):
        set_role(shared / name, "app")
    result = poolwise("fleet", "--sql", "--cluster", "orders-db", shared)
    assert result.returncode == 0, result.stderr
    # Two statements for one role would leave the last one's limit (3): orders-api's 4th
    # connection would be refused.
    assert guardrail_statements(result.stdout) == [("app", 51 + 3), ("events_api", 21)]
    assert (
        "-- role app: nightly-report 3 (app -> database) + orders-api 51 (app -> database) = 54,"
        " migrations included"
    ) in result.stdout.splitlines()


@pytest.mark.parametrize(
    ("role", "says"),
    [
        ("app\x00; ALTER ROLE app SUPERUSER", "contains a NUL character"),
        ("r" * 64, "is 64 bytes long: PostgreSQL truncates a name to 63 bytes"),
    ],
    ids=["nul", "64-bytes"],
)
def test_a_role_postgresql_cannot_hold_is_refused_with_its_file(
    repos: Path, tmp_path: Path, role: str, says: str
) -> None:
    broken = copy_of(repos, tmp_path)
    limits = set_role(broken / "orders-api", role)
    result = poolwise("fleet", "--sql", "--cluster", "orders-db", broken)
    assert (result.returncode, result.stdout) == (2, ""), result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"poolwise fleet: {limits}: [database] role {role!r} (of 'orders-api')")
    assert says in line and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- the SQL itself

# Names a service's files could hold, each trying to end the comment, identifier, literal or
# dollar quote it is written into and run a statement of its own as the superuser.
HOSTILE_CLUSTER = "orders-db\nALTER ROLE app SUPERUSER; --"
HOSTILE_NAMES = [
    "newline\nALTER ROLE app SUPERUSER; --",
    "carriage-return\rALTER ROLE app SUPERUSER; --",
    "comment */ ALTER ROLE app SUPERUSER; /*",
    "quotes ' \" ; ALTER ROLE app SUPERUSER; --",
    "backslash \\ \\! touch /tmp/pwned",
    "line-separator\u2028ALTER ROLE app SUPERUSER; --",
    "next-line\u0085ALTER ROLE app SUPERUSER; --",
    "nul\x00ALTER ROLE app SUPERUSER; --",
]
HOSTILE_ROLES = [
    "r-newline\n; ALTER ROLE app SUPERUSER; --",
    'r-quote"; ALTER ROLE app SUPERUSER; --',
    "r-literal'); ALTER ROLE app SUPERUSER; --",
    "r-backslash\\'; \\gexec \\! touch /tmp/pwned",
    "r-dollar $poolwise$; ALTER ROLE app SUPERUSER; $poolwise$",
    "r-separators\u2028\u0085*/;",
    "found",  # PL/pgSQL's own variable in every DO block
    "r-format %I %L %s :app",  # format() placeholders and a psql variable
]


def declared(name: str, role: str, cluster: str, pool: tuple[int, int]) -> services.Service:
    """A k8s service of one replica and one terminating pod: 2 x sum(pool) + 1 migration."""
    limits = rule.DatabaseLimits(max_connections=500, reserved_connections=3, other_consumers=0)
    workload = rule.Workload(
        kind="k8s", replicas=1, terminating=1, pool_size=pool[0], max_overflow=pool[1]
    )
    topology = rule.Topology(target="k8s-sync", workloads=(workload,))
    return services.Service(
        root=Path("/services") / f"service-{len(name)}",
        name=name,
        package="service",
        target="k8s-sync",
        pooler="none",
        driver="psycopg",
        pool_mode="",
        cluster=cluster,
        role=role,
        limits=limits,
        external_consumers={},
        template_version="test",
        readings=[deployed.Reading("deploy/k8s", topology, limits, inputs=[])],
    )


def _option(statement: Any, name: str) -> Any:
    [option] = [option for option in statement.options if option.defname == name]
    return option.arg


def guardrail_statements(text: str) -> list[tuple[str, int]]:
    """(role, limit) of each statement, read by PostgreSQL's own parser (pglast).

    Every top-level statement must be a DO block whose body is exactly: if the role exists,
    ALTER ROLE it CONNECTION LIMIT n, else CREATE ROLE it LOGIN CONNECTION LIMIT n, with the same
    role and n in the condition and both branches. Anything else fails.
    """
    found = []
    for raw in pglast.parse_sql(text):
        statement = raw.stmt
        assert isinstance(statement, pglast.ast.DoStmt), statement
        [body] = [option.arg.sval for option in statement.args if option.defname == "as"]
        function = psycopg_sql.SQL("CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS {}")
        [tree] = pglast.parse_plpgsql(function.format(psycopg_sql.Literal(body)).as_string())
        block = tree["PLpgSQL_function"]["action"]["PLpgSQL_stmt_block"]["body"]
        assert [next(iter(step)) for step in block] == ["PLpgSQL_stmt_if", "PLpgSQL_stmt_return"]
        branch = block[0]["PLpgSQL_stmt_if"]
        assert set(branch) == {"lineno", "cond", "then_body", "else_body"}, branch
        [condition] = pglast.parse_sql("SELECT " + branch["cond"]["PLpgSQL_expr"]["query"])
        exists = condition.stmt.targetList[0].val
        assert exists.subLinkType == pglast.enums.SubLinkType.EXISTS_SUBLINK
        where = exists.subselect.whereClause
        assert [field.sval for field in where.lexpr.fields] == ["rolname"]
        [relation] = exists.subselect.fromClause
        assert (relation.schemaname, relation.relname) == ("pg_catalog", "pg_roles")
        role = where.rexpr.val.sval
        branches = []
        for key in ("then_body", "else_body"):
            [step] = branch[key]
            [parsed] = pglast.parse_sql(
                step["PLpgSQL_stmt_execsql"]["sqlstmt"]["PLpgSQL_expr"]["query"]
            )
            branches.append(parsed.stmt)
        alter, create = branches
        assert isinstance(alter, pglast.ast.AlterRoleStmt) and alter.role.rolename == role
        assert [option.defname for option in alter.options] == ["connectionlimit"]
        assert isinstance(create, pglast.ast.CreateRoleStmt) and create.role == role
        assert [option.defname for option in create.options] == ["canlogin", "connectionlimit"]
        assert _option(create, "canlogin").boolval is True
        limit = _option(alter, "connectionlimit").ival
        assert _option(create, "connectionlimit").ival == limit
        found.append((role, limit))
    # What is not a statement is a comment, and no comment holds a control character or
    # anything beyond printable ASCII (a terminal or editor would start a line there).
    for comment in pglast.parser.comments(text):
        assert all(" " <= character <= "~" for character in comment.str), comment
    return found


def test_hostile_names_reach_the_sql_only_quoted_or_escaped() -> None:
    members = [
        declared(name, role, HOSTILE_CLUSTER, (index + 1, 0))
        for index, (name, role) in enumerate(zip(HOSTILE_NAMES, HOSTILE_ROLES, strict=True))
    ]
    members.append(declared("shares found", "found", HOSTILE_CLUSTER, (10, 0)))
    text = fleet.sql(fleet.clusters(members))
    expected = sorted(
        (role, sum(service.total for service in members if service.role == role))
        for role in set(HOSTILE_ROLES)
    )
    assert guardrail_statements(text) == expected
    assert ("found", 2 * 7 + 1 + 2 * 10 + 1) in expected
    # Each name is in its comment, escaped: a reader still sees which service it was.
    assert "newline\\nALTER ROLE app SUPERUSER; --" in text
    assert "line-separator\\u2028ALTER" in text and "nul\\x00ALTER" in text


def test_a_role_postgresql_cannot_hold_never_reaches_the_sql() -> None:
    refused = declared("orders-api", "app\x00x", "orders-db", (5, 5))
    with pytest.raises(services.InputError, match=r"contains a NUL character") as error:
        fleet.sql(fleet.clusters([refused]))
    assert "/services/service-10/src/service/db/database_limits.toml: [database] role" in str(
        error.value
    )


def test_the_svg_draws_one_bar_per_cluster(repos: Path, tmp_path: Path) -> None:
    drawing = tmp_path / "fleet.svg"
    assert poolwise("fleet", "--svg", drawing, repos).returncode == 0
    root = ElementTree.parse(drawing).getroot()
    namespace = "{http://www.w3.org/2000/svg}"
    titles = [title.text for title in root.iter(f"{namespace}title")]
    assert "orders-api: 51" in titles and "legacy-api: 71" in titles
    assert titles.count("reserved: 3") == 2  # one bar each for orders-db and main
    assert "free: 122" in titles


def test_unreadable_inputs_exit_2_with_the_path_and_the_reason(repos: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = poolwise("fleet", empty)
    assert nothing.returncode == 2
    assert f"poolwise fleet: {empty}: no generated service found" in nothing.stderr

    broken = copy_of(repos, tmp_path)
    hpa = broken / "orders-api" / "deploy" / "k8s" / "hpa.yaml"
    hpa.write_text(hpa.read_text().replace("maxReplicas: 3", "maxReplicas: three"))
    unreadable = poolwise("fleet", broken)
    assert unreadable.returncode == 2
    assert str(broken / "orders-api") in unreadable.stderr
    assert "spec.maxReplicas: 'three' is not a whole number of at least 1" in unreadable.stderr

    missing = poolwise("fleet", "--limits", tmp_path / "nope.yml", repos)
    assert missing.returncode == 2 and "nope.yml: cannot be read" in missing.stderr


def test_the_dashboard_shows_each_cluster_and_each_service_against_its_share(
    repos: Path, tmp_path: Path
) -> None:
    """`--dashboard FILE`: a Grafana dashboard, one row per cluster, with the cluster's available
    connections and each service's live connections against its declared share."""
    board = tmp_path / "fleet-dashboard.json"
    report = poolwise("fleet", "--json", "--dashboard", board, repos)
    assert report.returncode == 0, report.stderr
    declared = json.loads(report.stdout)
    dashboard = json.loads(board.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == [f"Cluster {cluster['name']}" for cluster in declared["clusters"]]
    panels = {panel["title"]: panel for panel in dashboard["panels"] if panel["type"] != "row"}
    for cluster in declared["clusters"]:
        overview = panels[f"{cluster['name']}: live connections per service"]
        exprs = [target["expr"] for target in overview["targets"]]
        assert f"vector({cluster['available']})" in exprs
        assert f"vector({cluster['total']})" in exprs
        # The live series of every service: the selector's regex (a PromQL string) matches each.
        [quoted] = re.findall(r'=~"((?:[^"\\]|\\.)*)"', exprs[0])
        selected = re.compile(quoted.replace("\\\\", "\\"))
        for service in cluster["services"]:
            assert selected.fullmatch(service["name"]), (quoted, service["name"])
            [panel] = [p for t, p in panels.items() if t.startswith(f"{service['name']} (")]
            exprs = [target["expr"] for target in panel["targets"]]
            assert f"vector({service['total']})" in exprs
            assert f'db_client_connection_pool_name="{service["name"]}"' in exprs[0]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_an_unwritable_dashboard_file_is_one_line_and_exit_2(repos: Path, tmp_path: Path) -> None:
    result = poolwise("fleet", "--dashboard", tmp_path / "missing" / "fleet.json", repos)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"poolwise fleet: --dashboard {tmp_path / 'missing' / 'fleet.json'}: No such file or"
        " directory"
    ]
