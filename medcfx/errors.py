"""User-facing errors.

Anything a user can cause (bad input, unknown name, tampered file) raises a ``MedcfxError``. The CLI prints
its message as one line and exits non-zero; a traceback is shown only with ``--debug``.
"""


class MedcfxError(Exception):
    """An error the user can act on. The message is one line and names the file or option at fault."""

    exit_code = 1


class UsageError(MedcfxError):
    """A request the command line cannot satisfy (unknown option, missing capability, bad value)."""

    exit_code = 2


class IntegrityError(MedcfxError):
    """A stored artifact does not match its recorded sha256 (tampered or corrupt)."""

    exit_code = 3
