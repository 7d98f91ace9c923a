"""What the readers raise instead of a number they did not read: the message is the report."""


class Unreadable(Exception):
    """Something the budget cannot interpret; the message names file, field, rule and fix.

    The message is one line whatever it quotes (a YAML parser's excerpt, a tool's stderr): CI
    logs, the generated test and `poolwise budget` show each refusal as one line.
    """

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))


class ToolMissing(Exception):
    """Building the Kubernetes files needs kustomize (``kubectl kustomize``), which is missing."""
