"""Incidents: open, alerts in, ack, resolve, the timeline, the card, SLA downtime and credits.

An incident has a severity with the manuals' response targets (P0 immediate, P1 1 h, P2 4 h,
P3 24 h), a status (open -> acknowledged -> mitigated -> resolved), an owner (who acked), the
server and customers it touches, and a timeline that *is* its events in the event log (subject
``inc-<id>``).

Alerts (core.alerts) carry a dedupe key; one not-resolved incident exists per key (a partial
unique index makes that hold even for two raisers racing). A repeat firing is added to the
timeline; a resolved alert marks the incident (or one of its customers) *recovered* and leaves
resolving, with a cause, to a human.

A server down is one incident listing every customer it takes with it: a customer's
database-down alert while its server's incident is open joins that incident (the customer is
added to its list and timeline); customers' incidents already open when the server's opens are
merged into it (``parent_id``; their paging stops, they resolve with it).

SLA: a customer is down from when an outage incident starts touching it (open, joined, a new
firing) to when it recovers (its alert or the incident's resolves, mitigated, resolved). Above
one hour of downtime, resolving proposes a credit of the plan's monthly price pro-rated to the
downtime (price * downtime / 30 days, in cents, rounded to the nearest cent). Outages are
server-down and database-down incidents, and any P0 opened by hand.

Where things are: ``model`` (the record, statuses, ids), ``desk`` (reading and opening),
``intake`` (alerts in), ``lifecycle`` (``Incidents``: ack, mitigate, resolve, the card, customer
emails), ``sla`` (downtime and credits). Restarting an incident's server is core.restarts'.
"""

from core.incidents.desk import (
    IncidentDesk,
)
from core.incidents.intake import (
    AlertIntake,
)
from core.incidents.lifecycle import (
    Incidents,
    Precondition,
    RestartView,
)
from core.incidents.model import (
    ACTIVE,
    OUTAGE_KINDS,
    RESPONSE_TARGETS,
    STATUSES,
    AlertOutcome,
    CreditProposal,
    Incident,
    Resolution,
    Status,
    parse_incident_id,
    parse_severity,
    ref,
    utcnow,
)
from core.incidents.sla import (
    SLA_MONTH,
    SLA_THRESHOLD,
    credit_cents,
    downtime_from_timeline,
)

__all__ = [
    "ACTIVE",
    "OUTAGE_KINDS",
    "RESPONSE_TARGETS",
    "SLA_MONTH",
    "SLA_THRESHOLD",
    "STATUSES",
    "AlertIntake",
    "AlertOutcome",
    "CreditProposal",
    "Incident",
    "IncidentDesk",
    "Incidents",
    "Precondition",
    "Resolution",
    "RestartView",
    "Status",
    "credit_cents",
    "downtime_from_timeline",
    "parse_incident_id",
    "parse_severity",
    "ref",
    "utcnow",
]
