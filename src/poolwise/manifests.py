"""Reading deploy/'s files: YAML documents, CloudFormation templates and their integers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import Unreadable


def load_all(path: Path, relative: str) -> list[dict[str, Any]]:
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise Unreadable(f"{relative}:{where} is not valid YAML ({error}); fix the file") from None
    for doc in documents:
        if not isinstance(doc, dict):
            raise Unreadable(f"{relative}: a document is not a mapping; fix the file")
    return documents


def integer(value: Any, where: str) -> int:
    """An integer field, or Unreadable naming it."""
    if isinstance(value, bool):
        raise Unreadable(f"{where}={value!r} -> not an integer; write a whole number")
    try:
        return int(str(value).strip())
    except ValueError:
        raise Unreadable(f"{where}={value!r} -> not an integer; write a whole number") from None


def cloudformation_load(path: Path, relative: str) -> dict[str, Any]:

    class Loader(yaml.SafeLoader):
        """Reads CloudFormation's short tags (!Ref, !Sub, !GetAtt) as plain values."""

    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return loader.construct_scalar(node)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node)
        return loader.construct_mapping(node)  # type: ignore[arg-type]

    Loader.add_multi_constructor("!", construct)
    if not path.exists():
        raise Unreadable(f"{relative} is missing -> the connection budget needs it; restore it")
    try:
        document = yaml.load(path.read_text(), Loader=Loader)
    except yaml.YAMLError as error:
        raise Unreadable(f"{relative}: not valid YAML ({error}); fix the file") from None
    if not isinstance(document, dict):
        raise Unreadable(f"{relative}: not a CloudFormation template; fix the file")
    return document
