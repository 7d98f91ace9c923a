"""AWS SAM and CloudFormation: every function of this service in every template under deploy/,
Globals included, read into the budget's terms.

A function is the service's when it runs this package: an image function (PackageType: Image,
built from the project's Dockerfile) or a Zip function whose Handler is in the package. Its
concurrency is ReservedConcurrentExecutions, lowered to the sum of its SQS event sources'
ScalingConfig.MaximumConcurrency when SQS is all that invokes it. A function without reserved
concurrency is refused: it scales to the account's limit, and no budget holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import rule
from .errors import Unreadable
from .manifests import cloudformation_load, integer
from .poolers import PGBOUNCER_INI, pgbouncer_settings, rds_proxy
from .reading import Env, Input, Project, Reading, limits_inputs, pool_share, read_text

SAM_TEMPLATE = "deploy/lambda/template.yaml"
FUNCTION_TYPES = ("AWS::Serverless::Function", "AWS::Lambda::Function")
# SAM's Globals apply to AWS::Serverless::Function only, never to AWS::Lambda::Function.
SERVERLESS_FUNCTION = "AWS::Serverless::Function"
TEMPLATE_SUFFIXES = (".yaml", ".yml", ".json", ".template")
# Lambda's own default Timeout, in seconds.
DEFAULT_TIMEOUT = 3


def templates(root: Path) -> list[str]:
    """SAM_TEMPLATE and every other CloudFormation template under deploy/ that holds a function.

    The other templates deploy next to it (a second stack, a nested application), and their
    functions reach the same database: they belong to the same budget.
    """
    found = [SAM_TEMPLATE]
    deploy = (root / "deploy").resolve()
    for path in sorted((root / "deploy").rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative == SAM_TEMPLATE or path.suffix not in TEMPLATE_SUFFIXES:
            continue
        # A link out of deploy/ is never followed: its text could be anything on the machine.
        if not path.is_file() or not path.resolve().is_relative_to(deploy):
            continue
        text = path.read_text(errors="replace")
        # Only a CloudFormation template names a function type; a Kubernetes file does not.
        if any(kind in text for kind in FUNCTION_TYPES):
            found.append(relative)
    return found


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class SamReader:
    def __init__(self, project: Project, variant: str) -> None:
        self.project = project
        self.variant = variant
        self.inputs: list[Input] = []
        self.findings: list[str] = []
        # The service function with the shortest Timeout (seconds, where), if any sets one.
        self.shortest_timeout: tuple[int, str] | None = None

    def read(self) -> Reading:
        workloads = []
        for relative in templates(self.project.root):
            workloads += self._template(relative)
        if not workloads:
            raise Unreadable(
                f"{self.variant}: no function runs the service (an image function, or a Zip"
                f" function whose Handler is in {self.project.package}) -> the budget cannot"
                " find it; restore ServiceFunction"
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
                self.project, self.variant, self.inputs, self.findings, self.shortest_timeout
            )
        topology = rule.Topology(
            target=declared["service"]["target"],
            workloads=tuple(workloads),
            pooler=pooler,
            driver=declared["service"]["driver"],
            **extra,
        )
        limits = limits_inputs(self.project, self.inputs)
        return Reading(self.variant, topology, limits, self.inputs, self.findings)

    def _template(self, relative: str) -> list[rule.Workload]:
        template = cloudformation_load(self.project.root / relative, relative)
        globals_ = _mapping(_mapping(template.get("Globals")).get("Function"))
        resources = _mapping(template.get("Resources"))
        workloads = []
        for name, resource in resources.items():
            resource = _mapping(resource)
            kind = resource.get("Type")
            if kind not in FUNCTION_TYPES:
                continue
            own = _mapping(resource.get("Properties"))
            inherited = globals_ if kind == SERVERLESS_FUNCTION else {}
            properties = {**inherited, **own}
            variables = {
                **_mapping(_mapping(inherited.get("Environment")).get("Variables")),
                **_mapping(_mapping(own.get("Environment")).get("Variables")),
            }
            where = f"{relative}: Resources.{name}.Properties"
            entry = self._entry_point(properties, where)
            if entry is None:
                continue
            if entry.endswith("migrations.handler"):
                reserved = properties.get("ReservedConcurrentExecutions")
                if reserved != rule.MIGRATION_CONNECTIONS:
                    self.findings.append(
                        f"{where}.ReservedConcurrentExecutions={reserved} -> the connection budget"
                        f" counts {rule.MIGRATION_CONNECTIONS} migration connection; reserve"
                        " exactly that"
                    )
                continue
            workloads.append(self._function(name, properties, variables, where, resources))
            timeout = integer(properties.get("Timeout", DEFAULT_TIMEOUT), f"{where}.Timeout")
            if self.shortest_timeout is None or timeout < self.shortest_timeout[0]:
                self.shortest_timeout = (timeout, f"{where}.Timeout")
        return workloads

    def _entry_point(self, properties: dict[str, Any], where: str) -> str | None:
        """What the function runs when it is this service's: its handler or image command."""
        if properties.get("PackageType") == "Image":
            command = [
                str(part) for part in _mapping(properties.get("ImageConfig")).get("Command") or []
            ]
            return command[-1] if command else "ServiceFunction"
        handler = str(properties.get("Handler", ""))
        # A Zip function runs this service when its handler is a module of the package.
        if handler.startswith(f"{self.project.package}."):
            return handler
        return None

    def _function(
        self,
        name: str,
        properties: dict[str, Any],
        variables: dict[str, Any],
        where: str,
        resources: dict[str, Any],
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
        concurrency = Input(
            "lambda_reserved_concurrency",
            reserved,
            field_where,
            declared["processes"].get("lambda_reserved_concurrency"),
        )
        provisioned_where = f"{where}.ProvisionedConcurrencyConfig.ProvisionedConcurrentExecutions"
        provisioned = _mapping(properties.get("ProvisionedConcurrencyConfig")).get(
            "ProvisionedConcurrentExecutions"
        )
        if provisioned is not None and integer(provisioned, provisioned_where) > reserved:
            self.findings.append(
                f"{provisioned_where}={provisioned} -> above {field_where}={reserved}: Lambda"
                " refuses provisioned concurrency past the reserved, and the budget counts the"
                " reserved; lower it to at most"
                f" {reserved}"
            )
        capped = self._sqs_cap(name, properties, where, resources)
        if capped is not None and capped.value < reserved:
            concurrency = Input(
                "lambda_reserved_concurrency",
                capped.value,
                capped.source,
                declared["processes"].get("lambda_reserved_concurrency"),
            )
        self.inputs.append(concurrency)
        prefix = f"{where}.Environment.Variables"
        env = Env({key: (str(value), f"{prefix}.{key}") for key, value in variables.items()})
        numbers, pool_size, max_overflow = pool_share(self.project, self.findings, env)
        self.inputs += numbers
        return rule.Workload(
            kind="lambda",
            name=f"Function/{name}",
            replicas=concurrency.value,
            null_pool=bool(declared["pool"]["null_pool"]),
            pool_size=pool_size,
            max_overflow=max_overflow,
        )

    def _sqs_cap(
        self, name: str, properties: dict[str, Any], where: str, resources: dict[str, Any]
    ) -> Input | None:
        """The most invocations its event sources can drive at once, when all are capped SQS.

        An SQS event source's ScalingConfig.MaximumConcurrency bounds the invocations it
        drives (https://docs.aws.amazon.com/lambda/latest/dg/services-sqs-scaling.html). Any
        other event source (an API, a schedule, an uncapped queue) is bounded only by the
        reserved concurrency, so then there is no lower cap.
        """
        sources: list[tuple[Any, str]] = []
        for event, spec in _mapping(properties.get("Events")).items():
            spec = _mapping(spec)
            event_where = f"{where}.Events.{event}"
            if spec.get("Type") != "SQS":
                return None
            cap = _mapping(_mapping(spec.get("Properties")).get("ScalingConfig")).get(
                "MaximumConcurrency"
            )
            sources.append((cap, f"{event_where}.Properties.ScalingConfig.MaximumConcurrency"))
        for mapping_name, resource in resources.items():
            resource = _mapping(resource)
            if resource.get("Type") != "AWS::Lambda::EventSourceMapping":
                continue
            mapping = _mapping(resource.get("Properties"))
            # !Ref Name and !GetAtt Name.Arn read as "Name" and "Name.Arn"; JSON as {"Ref": ...}.
            target = mapping.get("FunctionName")
            if isinstance(target, dict):
                target = target.get("Ref") or str(target.get("Fn::GetAtt", [""])[0])
            if str(target).split(".")[0] != name:
                continue
            cap = _mapping(mapping.get("ScalingConfig")).get("MaximumConcurrency")
            template = where.split(": ", 1)[0]
            sources.append(
                (
                    cap,
                    f"{template}: Resources.{mapping_name}.Properties.ScalingConfig"
                    ".MaximumConcurrency",
                )
            )
        if not sources or any(cap is None for cap, _ in sources):
            return None
        total = sum(integer(cap, source) for cap, source in sources)
        return Input("lambda_reserved_concurrency", total, " + ".join(s for _, s in sources))
