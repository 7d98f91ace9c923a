"""AWS SAM: every image function of the template, Globals included, read into the budget's terms."""

from __future__ import annotations

from typing import Any

from . import rule
from .errors import Unreadable
from .manifests import cloudformation_load, integer
from .poolers import PGBOUNCER_INI, pgbouncer_settings, rds_proxy
from .reading import Env, Input, Project, Reading, limits_inputs, pool_share, read_text

SAM_TEMPLATE = "deploy/lambda/template.yaml"


class SamReader:
    def __init__(self, project: Project, variant: str) -> None:
        self.project = project
        self.variant = variant
        self.inputs: list[Input] = []
        self.findings: list[str] = []
        # The service function with the shortest Timeout (seconds, where), if any sets one.
        self.shortest_timeout: tuple[int, str] | None = None

    def read(self) -> Reading:
        relative = self.variant
        template = cloudformation_load(self.project.root / relative, relative)
        globals_ = ((template.get("Globals") or {}).get("Function")) or {}
        workloads = []
        for name, resource in (template.get("Resources") or {}).items():
            if resource.get("Type") not in ("AWS::Serverless::Function", "AWS::Lambda::Function"):
                continue
            properties = {**globals_, **(resource.get("Properties") or {})}
            variables = {
                **((globals_.get("Environment") or {}).get("Variables") or {}),
                **(
                    ((resource.get("Properties") or {}).get("Environment") or {}).get("Variables")
                    or {}
                ),
            }
            if properties.get("PackageType") != "Image":
                continue
            where = f"{relative}: Resources.{name}.Properties"
            command = [
                str(part) for part in (properties.get("ImageConfig") or {}).get("Command", [])
            ]
            if any(part.endswith("migrations.handler") for part in command):
                reserved = properties.get("ReservedConcurrentExecutions")
                if reserved != rule.MIGRATION_CONNECTIONS:
                    self.findings.append(
                        f"{where}.ReservedConcurrentExecutions={reserved} -> the connection budget"
                        f" counts {rule.MIGRATION_CONNECTIONS} migration connection; reserve"
                        " exactly that"
                    )
                continue
            workloads.append(self._function(name, properties, variables, where))
            # Lambda's own default Timeout is 3 s.
            timeout = integer(properties.get("Timeout", 3), f"{where}.Timeout")
            if self.shortest_timeout is None or timeout < self.shortest_timeout[0]:
                self.shortest_timeout = (timeout, f"{where}.Timeout")
        if not workloads:
            raise Unreadable(
                f"{relative}: no image function runs the service -> the budget cannot find it;"
                " restore ServiceFunction"
            )
        declared = self.project.declared
        pooler = declared["service"]["pooler"]
        extra: dict[str, Any] = {}
        if pooler == "pgbouncer":
            extra = pgbouncer_settings(
                read_text(self.project, PGBOUNCER_INI),
                PGBOUNCER_INI,
                self.inputs,
                self.project,
                self.findings,
            )
        elif pooler == "rds-proxy":
            extra = rds_proxy(
                self.project, relative, self.inputs, self.findings, self.shortest_timeout
            )
        topology = rule.Topology(
            target=declared["service"]["target"],
            workloads=tuple(workloads),
            pooler=pooler,
            driver=declared["service"]["driver"],
            **extra,
        )
        limits = limits_inputs(self.project, self.inputs)
        return Reading(relative, topology, limits, self.inputs, self.findings)

    def _function(
        self, name: str, properties: dict[str, Any], variables: dict[str, Any], where: str
    ) -> rule.Workload:
        declared = self.project.declared
        field_where = f"{where}.ReservedConcurrentExecutions"
        if "ReservedConcurrentExecutions" not in properties:
            raise Unreadable(
                f"{field_where} is missing -> an unreserved function scales to the account's"
                " concurrency limit, and no connection budget holds; set it"
            )
        reserved = integer(properties["ReservedConcurrentExecutions"], field_where)
        rule.at_least_minimum("lambda_reserved_concurrency", max(reserved, 1), field_where)
        self.inputs.append(
            Input(
                "lambda_reserved_concurrency",
                reserved,
                field_where,
                declared["processes"].get("lambda_reserved_concurrency"),
            )
        )
        prefix = f"{where}.Environment.Variables"
        env = Env({key: (str(value), f"{prefix}.{key}") for key, value in variables.items()})
        numbers, pool_size, max_overflow = pool_share(self.project, self.findings, env)
        self.inputs += numbers
        return rule.Workload(
            kind="lambda",
            name=f"Function/{name}",
            replicas=reserved,
            null_pool=bool(declared["pool"]["null_pool"]),
            pool_size=pool_size,
            max_overflow=max_overflow,
        )
