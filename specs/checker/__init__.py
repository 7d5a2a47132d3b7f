"""The exhaustive checker: every interleaving of the real core, breadth first.

It runs the real ``Sender`` and ``Receiver`` endpoints (not a re-model) over a symbolic
network: control messages and data writes are items that may be delivered in any order,
dropped, duplicated; peers may crash, either side may abort, and time may jump to the next
deadline.  The data plane is symbolic too: a pool slot holds ``(room, token)``, so exact
reassembly is checked token by token without torch.  The link starts registered (each
receiver's ``Register`` reached the sender, whose ``Registered`` reached the receiver).

In every state it checks the ``specs`` invariants (no slot shared, no write into a slot the
room does not own, rows collected in order from the right slots, terminal states final).
In every *quiescent* state -- nothing in flight, nothing left to init or send, and no
deadline left below the time horizon, so only an optional fault could still happen -- it
checks that nothing is stuck: every room of every live endpoint is terminal, every block
was freed exactly once and every source row released.  That is "no deadlock" and "every
room terminal once time has passed every deadline" in one.  Breadth first, so the first
violation found has a shortest trace.

Time.  ``tick`` jumps the clock to the next deadline of any live endpoint, or to the last
moment the oldest item in flight may arrive (see below), whichever comes first; inits,
sends and aborts happen at the instants the clock stops at.  Deadlines at or beyond ``Config.horizon`` (by default the settings' ``heartbeat_interval``) are never
reached; the default settings put heartbeats and peer-silence limits at 1000 s, far past
every room timeout, so liveness stays outside the explored horizon.  Bring it inside with
a smaller ``heartbeat_interval`` and a larger horizon: ``Heartbeat`` (and ``Register`` /
``Registered``) are then ordinary control messages that may be delayed, dropped,
duplicated or reordered like any other.

Timing assumption, made explicit (bounded delay): nothing -- control message or data
write -- stays in flight longer than ``Config.max_delay``; the clock may not jump past the
moment an item in flight must have arrived.  Within that bound deliveries race freely with
each other and with every timer (by default the bound is a whole room timeout, so a
message may arrive before or after any timer due within 10 s of its sending).  The
protocol needs ``quarantine_timeout > bootstrap_timeout + waiting_timeout + 2 x max_delay``
(an init may arrive ``max_delay`` late, the sender's room may then live for
``bootstrap_timeout + waiting_timeout`` before its last write, which lands up to
``max_delay`` later): a receiver that failed a room must hold its blocks until no write
for them can still land.  With a quarantine well short of that the checker finds the
write-into-reused-blocks trace (``tests/test_checker.py``, 15 s against 40 s); since the
clock stops only at deadlines and latest arrivals, it does not pin the bound exactly.

Speed.  Successor states are made with :func:`clone_state`, a copier specialised to this
object graph (immutable values and frozen attrs instances are shared, mutable containers
and objects copied field by field, shared references kept shared) rather than
``copy.deepcopy``; it follows whatever fields the endpoints have, so new fields need no
change here; and a successor shares its parent's endpoints until the event it applies
calls into one (copy on write, per endpoint).  States are identified by a canonical,
structural form of the whole state (``make_canonical``): plain dicts and sets compare as
unordered (as ``==`` does), the in-flight items as a multiset (any of them may be delivered
next), allocations by their extents and owner rather than their serial numbers, and fields
that only record history (``OBSERVATIONS``: counters, histograms, failure reasons) left
out; within the default horizon the heartbeat clocks are inert and left out too.  Only a
64-bit hash of it is kept per state (a collision, probability ~n^2/2^65, would prune one
state).
"""

from .canonical import IDENTITY_IGNORES, LIVENESS_CLOCKS, Canonical, make_canonical
from .clone import OBSERVATIONS, clone_state
from .config import Config, checker_settings, resume_rounds
from .search import Result, explore
from .world import PROGRESS, SENDER, World

__all__ = [
    "IDENTITY_IGNORES", "LIVENESS_CLOCKS", "OBSERVATIONS", "PROGRESS", "SENDER", "Canonical", "Config", "Result",
    "World", "checker_settings", "clone_state", "explore", "make_canonical", "resume_rounds",
]
