"""The one exception type whose message is shown to users as a one-line error."""


class UserError(Exception):
    """Bad input or a state the user can fix: the CLI prints ``error: <message>`` and exits non-zero;
    the service answers 4xx with the message."""


class PoolCorrupt(UserError):
    """A pool file that is damaged, truncated or not a pool at all."""
