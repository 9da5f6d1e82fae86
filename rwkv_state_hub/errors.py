"""The one error type for everything a user can cause.

Its message is the single line the CLI prints (no traceback, non-zero exit).
Bugs in our own code still raise ordinary exceptions.
"""


class StateHubError(Exception):
    """A problem with the user's input: a bad file, a state that does not fit, bad data."""
