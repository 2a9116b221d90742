"""The one exception type for problems with the user's input.

Skipping an FC layer is data (a reason on its layer record); a model, file or
option the tool cannot work with is an :class:`Fc2ConvError`, which the CLI
turns into one line on stderr and exit code 2. Any other exception is a bug
and keeps its traceback.
"""


class Fc2ConvError(Exception):
    """Bad input or usage: the message is one sentence a user can act on."""

    exit_code = 2
