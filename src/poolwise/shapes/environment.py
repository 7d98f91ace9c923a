"""A container's environment as Kubernetes builds it, for the variables the budget reads.

Kubernetes' rules (https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#environment-variables
and https://kubernetes.io/docs/tasks/inject-data-application/define-interdependent-environment-variables/):

- ``envFrom`` sources apply in order, a later source winning a key both set; every ``env``
  entry wins over all of ``envFrom``; ``envFrom[].prefix`` is put before each key.
- ``$(NAME)`` in a value, ``command`` or ``args`` is replaced by a variable defined before it;
  ``$$(NAME)`` is a literal ``$(NAME)``; a reference to an undefined name stays as written.

A budget input (a pool size, a worker count) must never come from a Secret: the budget does not
read Secrets, and a number that decides how many connections a service opens is configuration a
reviewer must see. ``secretKeyRef`` and ``envFrom: secretRef`` are refused alike, and so is any
value the files under ``deploy/`` do not determine (a ConfigMap that is not among them, a
``fieldRef``): see :meth:`Environment.require`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from poolwise.shapes.errors import Refused

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


@dataclass(frozen=True)
class Value:
    """A variable's value, or why it is not known, and the file and field that set it."""

    text: str | None
    source: str
    secret: bool = False
    why: str = ""


@dataclass(frozen=True)
class _Opaque:
    """An envFrom source whose keys the budget cannot see (a Secret, an absent ConfigMap)."""

    prefix: str
    source: str
    secret: bool


@dataclass
class Environment:
    """The variables a container starts with, as far as the manifests determine them."""

    file: str
    values: dict[str, Value] = field(default_factory=dict)
    # Per variable name not fixed by env: the opaque envFrom source that may set it last.
    _opaque: list[tuple[int, _Opaque]] = field(default_factory=list)
    _known_at: dict[str, int] = field(default_factory=dict)

    def _may_be_set_by(self, name: str) -> _Opaque | None:
        """The last opaque envFrom source that could set ``name`` after any known one did."""
        known = self._known_at.get(name, -1)
        for position, source in reversed(self._opaque):
            if position > known and name.startswith(source.prefix):
                return source
        return None

    def get(self, name: str) -> Value | None:
        """``name``'s value; ``None`` when nothing sets it. Unknown values come back with
        ``text=None``; :meth:`require` turns them into refusals."""
        value = self.values.get(name)
        if value is not None and not value.source.startswith("envFrom"):
            return value  # env wins over every envFrom source
        opaque = self._may_be_set_by(name)
        if opaque is not None:
            return Value(
                None,
                opaque.source,
                opaque.secret,
                f"the ConfigMap is not under deploy/, and it may set {name}",
            )
        return value

    def require(self, name: str, *, fix: str) -> str | None:
        """``name``'s text for a budget input, ``None`` when unset; refused when it comes from
        a Secret or cannot be resolved. The message names the variable and where it comes
        from, never a value."""
        value = self.get(name)
        if value is None or value.text is not None:
            return None if value is None else value.text
        if value.secret:
            raise Refused(
                self.file,
                value.source,
                f"{name} comes from a Secret; a budget input must be plain configuration the"
                " budget can read, and the budget never reads Secrets",
                f"set {name} as a plain env value (env: wins over envFrom) or in a ConfigMap"
                " under deploy/",
            )
        raise Refused(self.file, value.source, f"{value.why}", fix)

    def plain(self) -> dict[str, str]:
        """Every variable whose value is known, for expanding command lines."""
        return {
            name: value.text
            for name in self.values
            if (value := self.get(name)) is not None and value.text is not None
        }


def expand(text: str, env: Mapping[str, Value]) -> tuple[str, Value | None]:
    """``text`` with ``$(NAME)`` replaced as Kubernetes does; the second item is the first
    referenced variable whose value is unknown (the result is then not to be trusted)."""
    unknown: Value | None = None

    def replace(match: re.Match[str]) -> str:
        nonlocal unknown
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        value = env.get(name)
        if value is None:
            return match.group(0)
        if value.text is None:
            unknown = unknown or value
            return match.group(0)
        return value.text

    return _REFERENCE.sub(replace, text), unknown


def container_environment(
    container: Mapping[str, Any],
    *,
    file: str,
    field: str,
    config_maps: Mapping[str, Mapping[str, str]] | None = None,
) -> Environment:
    """The environment of ``container`` (at ``field`` in ``file``); ``config_maps`` are the
    ConfigMaps of the same variant by name (``data``), as kustomize built them."""
    config_maps = config_maps or {}
    env = Environment(file)
    for index, source in enumerate(container.get("envFrom") or []):
        where = f"envFrom[{index}] of {field}"
        prefix = str(source.get("prefix") or "")
        if "secretRef" in source:
            name = (source.get("secretRef") or {}).get("name")
            env._opaque.append((index, _Opaque(prefix, f"{where} (secretRef {name})", True)))
        elif "configMapRef" in source:
            name = (source.get("configMapRef") or {}).get("name")
            data = config_maps.get(name)
            label = f"{where} (configMapRef {name})"
            if data is None:
                if (source.get("configMapRef") or {}).get("optional"):
                    continue
                env._opaque.append((index, _Opaque(prefix, label, False)))
                continue
            for key, text in data.items():
                env.values[prefix + key] = Value(str(text), label)
                env._known_at[prefix + key] = index
        else:
            raise Refused(file, where, "is neither configMapRef nor secretRef", "write one")
    for index, item in enumerate(container.get("env") or []):
        where = f"{field}.env[{index}]"
        name = item.get("name")
        if not isinstance(name, str):
            raise Refused(file, where, "has no name", "name the variable")
        if "valueFrom" not in item:
            text, unknown = expand(str(item.get("value", "")), _visible(env))
            if unknown is None:
                env.values[name] = Value(text, where)
            else:
                why = f"refers to a variable the files do not determine ({unknown.source})"
                env.values[name] = Value(None, where, unknown.secret, why)
            continue
        env.values[name] = _value_from(item["valueFrom"] or {}, where, config_maps)
    return env


def _visible(env: Environment) -> dict[str, Value]:
    """Variables as a later one sees them, opaque envFrom sources applied."""
    return {name: value for name in env.values if (value := env.get(name)) is not None}


def _value_from(
    value_from: Mapping[str, Any], where: str, config_maps: Mapping[str, Mapping[str, str]]
) -> Value:
    if "secretKeyRef" in value_from:
        ref = value_from["secretKeyRef"] or {}
        return Value(None, f"{where} (secretKeyRef {ref.get('name')})", True)
    if "configMapKeyRef" in value_from:
        ref = value_from["configMapKeyRef"] or {}
        data = config_maps.get(ref.get("name"))
        label = f"{where} (configMapKeyRef {ref.get('name')}/{ref.get('key')})"
        if data is not None and ref.get("key") in data:
            return Value(str(data[ref["key"]]), label)
        return Value(None, label, False, "names a ConfigMap key that is not under deploy/")
    kind = next(iter(value_from), "valueFrom")
    return Value(
        None,
        f"{where} ({kind})",
        False,
        "is set at run time, so the files do not say what it is",
    )
