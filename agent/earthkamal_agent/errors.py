"""Errors a user can cause: one plain sentence, no traceback."""


class UserError(Exception):
    """A problem the user can fix. ``str(e)`` is the sentence shown to them."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
