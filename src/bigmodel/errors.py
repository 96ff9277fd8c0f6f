"""User errors: one line that names what was wrong and what would be right, then exit status 2.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad recipe, missing file, not a run directory). Printed as one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
