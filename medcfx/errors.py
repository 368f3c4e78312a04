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


class CaseErrors(MedcfxError):
    """Some cases of a command over several inputs (explain, grade) failed; the others were written.

    ``failures``: one MedcfxError per failed case, each naming its file or case (the CLI prints one line
    per failure, after the summary). ``summary``: what the command returns for the cases that were
    written. ``exit_code``: the failures' own status when they share one (1 unreadable input, 2 a usage
    error such as ``--slice`` out of range, 3 integrity), else 1.
    """

    def __init__(self, failures: list[MedcfxError], summary=None):
        self.failures = list(failures)
        self.summary = summary
        codes = {getattr(f, "exit_code", 1) for f in self.failures}
        self.exit_code = codes.pop() if len(codes) == 1 else 1
        super().__init__("; ".join(str(f) for f in self.failures))
