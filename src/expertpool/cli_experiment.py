"""The `experiment` command: baselines and the paper's experiments (issue 4)."""


def add_commands(sub, pool_sub) -> None:
    """Register this module's sub-commands on the top-level ``sub`` (and ``pool_sub`` for ``pool ...``)."""
