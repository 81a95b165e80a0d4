"""The `bench` command: performance figures (issue 6)."""


def add_commands(sub, pool_sub) -> None:
    """Register this module's sub-commands on the top-level ``sub`` (and ``pool_sub`` for ``pool ...``)."""
