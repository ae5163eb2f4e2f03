"""User-facing errors: the CLI prints them as one line and exits non-zero, never with a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (recipe, paths, models, data). The message is the whole story: one line
    that names the field or file, what was found and what would be valid."""


class RecipeError(UserError):
    """One or more problems in a recipe; `problems` holds one line each, already formatted."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))
