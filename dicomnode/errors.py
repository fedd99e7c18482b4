"""The one exception type a command turns into a single clear line on stderr."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad option, missing model): no traceback."""
