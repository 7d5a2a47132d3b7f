"""``embxfer bench``: speed as ratios against baselines measured in the same run.

Cases (``--cases``, all by default; one machine, 127.0.0.1):

* ``data-plane``    one room of N MB of embedding rows with R resume rounds through embxfer
                    (ZeroMQ + Mooncake TCP, and the ZeroMQ data plane when available) vs raw
                    ``transfer_sync_write``, memcpy and pickled tensors over ZeroMQ REQ/REP;
* ``loopback``      the loopback transport vs memcpy of the same bytes (16–64 MB);
* ``core``          µs per room through the sans-I/O core alone vs its wire codec;
* ``control-plane`` small rooms/s across two processes at 1, 64, 1,024 in flight vs bare ZeroMQ;
* ``scale``         core state per room and time per event at 10,000 rooms in flight vs 100;
* ``allocator``     alloc+free pairs/s on a fragmented pool vs a fresh one;
* ``prealloc``      resumes and pool use of ``prealloc="fixed"`` vs ``"adaptive"``.

It prints a table per case and the targets met or missed; ``--json FILE`` writes every
figure, baseline, ratio and target; ``--plot FILE`` writes a PNG chart.
"""

from .report import CaseResult
from .runner import CASES, FULL, QUICK, Plan, add_parser, main, plan_from, run

__all__ = ["CASES", "FULL", "QUICK", "CaseResult", "Plan", "add_parser", "main", "plan_from", "run"]
