"""The package's one class of input errors.

Every check of what a user passes in (options, configs, files, structures, checkpoints, a box too
small, a species out of range) raises :class:`InputError` or a subclass of it, with a message that
names the problem. ``a2ijax`` (the command) turns exactly these into a one-line message and exit
status 2; anything else is a bug or a failure of the run and keeps its traceback. It is a
``ValueError``, so ``except ValueError`` still catches it.
"""


class InputError(ValueError):
    """Bad input, named: the command prints it and exits with status 2."""
