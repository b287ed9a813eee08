"""The one base class of the mistakes a user can make, so the command line can tell them from bugs.

Every pvjax error that describes bad input (a config, a checkpoint, a vector file, an intervention,
a generation request, token ids, command-line arguments) derives from `UserError`. `pvjax.cli`
prints such an error as one line and exits with status 2; anything else is a bug and keeps its
traceback. The concrete classes also stay `ValueError`s (or whatever they were), so code that
caught them before still does.
"""

from __future__ import annotations


class UserError(Exception):
    """Input that pvjax refuses; the message alone says what is wrong and where."""


class InputError(UserError, ValueError):
    """Malformed arguments to a library entry point: token ids, masks, positions, prompts, or an
    intervention whose batch does not fit the input. Raised on the host, before anything runs."""


class UsageError(UserError, ValueError):
    """Command-line arguments that contradict each other or name nothing usable."""
