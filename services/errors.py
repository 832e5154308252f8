"""Errors that are the user's to fix: shown as one sentence, never as a traceback."""


class UserError(Exception):
    """Bad input: unknown model or method, a parameter out of range, malformed JSON, ..."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field  # which form field or recipe key is wrong, for the UI to show it there


class StaleModelError(UserError):
    """The model's stored files are unusable: the job fails and the model goes back to 'new', so the
    Models page offers to prepare it again instead of pointing at a card that no longer works."""
