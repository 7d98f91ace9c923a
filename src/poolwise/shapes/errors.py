"""The one error the shape readers raise: what the budget cannot read, and how to fix it."""

from __future__ import annotations


class Refused(Exception):
    """A shape the budget cannot count. ``str()`` is one line: file, field, why, fix.

    Messages name fields and kinds, never values read from a Secret (none is ever read) or
    from a file outside ``deploy/``.
    """

    def __init__(self, file: str, field: str, why: str, fix: str) -> None:
        self.file = file
        self.field = field
        self.why = why
        self.fix = fix
        super().__init__(f"{file}: {field}: {why}; fix: {fix}")
