"""Keep native libraries' log lines (Mooncake's glog, written straight to fd 2) off a server's
stderr unless ``--verbose``: fd 2 becomes a pipe that a thread reads, dropping glog lines and
passing everything else on; Python's own ``sys.stderr`` writes to the real stderr directly,
so nothing of ours waits on that thread (or is lost when the process exits at once)."""

from __future__ import annotations

import os
import re
import sys
import threading

# glog: "I1202 05:33:53.412815 28546 file.cpp:123] ...", and its notice before InitGoogleLogging
# (FATAL lines pass: they say why the process is about to abort)
GLOG_LINE = re.compile(rb"^([IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]|WARNING: Logging before InitGoogleLogging)")


def hide_native_log_lines() -> None:
    sys.stderr.flush()
    real = os.dup(2)
    sys.stderr = open(real, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace", closefd=False)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    threading.Thread(target=_pass_on, args=(read_end, real), name="embxfer-native-stderr", daemon=True).start()


def _pass_on(read_end: int, real: int) -> None:
    # never stop reading: a full pipe would block every native writer
    with os.fdopen(read_end, "rb") as native:
        for line in native:
            if not GLOG_LINE.match(line):
                try:
                    os.write(real, line)
                except OSError:
                    pass
