"""Errors normlab raises for bad input. The CLI turns them into one line and exit code 2."""


class NormlabError(ValueError):
    """Bad input to normlab: the message names what was given and what is allowed."""
