"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a single line on stderr and its exit code (2; 1 for a write the file system
refused mid-run); anything else is a bug and keeps its traceback.
"""


class TicketlabError(Exception):
    """Bad input: unknown name, out-of-range value, malformed or foreign file."""

    exit_code = 2


class RunWriteError(TicketlabError):
    """The file system refused a write in the middle of a run (disk full, permissions changed).

    Exit code 1, not 2: the input was fine. Every file is written atomically, so what finished is
    kept whole and rerunning the same command resumes from it."""

    exit_code = 1
