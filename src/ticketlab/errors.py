"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""


class TicketlabError(Exception):
    """Bad input: unknown name, out-of-range value, malformed or foreign file."""
