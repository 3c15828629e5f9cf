"""The fault-injection harness: network namespaces, links, processes, accounting, figures.

Row tests of the fault plan (../../shared RELIABILITY table, docs/reliability.md)
import from here; see ``Fleet`` for the short form.
"""

from .accounting import Arrival, DbReport, DeliveryReport, analyse, check_db, ranges
from .counter import ResultCounter, StatusEvent
from .fleet import Fleet
from .netns import Host, Network, NetnsError, cleanup_stale, unavailable_reason
from .procs import Proc, ProcessGroup, lepton_cmd
from .proxy import DelayProxy

__all__ = [
    "Arrival", "DbReport", "DelayProxy", "DeliveryReport", "Fleet", "Host", "NetnsError", "Network", "Proc",
    "ProcessGroup", "ResultCounter", "StatusEvent", "analyse", "check_db", "cleanup_stale", "lepton_cmd",
    "ranges", "unavailable_reason",
]
