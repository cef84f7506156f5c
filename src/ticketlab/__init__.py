"""ticketlab: find, verify, compare and ship lottery tickets."""

__version__ = "0.1.0"

from .api import TicketSearch, find_ticket, run_search, transfer_ticket  # noqa: E402
from .core.finders import find_mask  # noqa: E402
from .core.mask import Mask  # noqa: E402
from .errors import TicketlabError  # noqa: E402
from .io.config import Config, resolve  # noqa: E402

__all__ = [
    "Config",
    "Mask",
    "TicketSearch",
    "TicketlabError",
    "find_mask",
    "find_ticket",
    "resolve",
    "run_search",
    "transfer_ticket",
]
