"""What the readers raise instead of a number they did not read: the message is the report."""


class Unreadable(Exception):
    """Something the budget cannot interpret; the message names file, field, rule and fix."""


class ToolMissing(Exception):
    """Building the Kubernetes files needs kustomize (``kubectl kustomize``), which is missing."""
