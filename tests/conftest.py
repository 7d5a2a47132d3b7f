import os

import pytest

# The serve commands authenticate their sockets by default (--auth-keys); the tests that start
# them against servers without keys run them --insecure through the environment, and
# test_security passes keys (a flag wins over this variable).
os.environ.setdefault("EMBXFER_INSECURE", "1")


@pytest.fixture
def receiver_without_quarantine(monkeypatch):
    """A deliberately broken receiver: it frees an aborted room's blocks at once instead of
    quarantining them, so a write still in flight can land in reused blocks.  The model and
    the checker must both catch it."""
    from embxfer.core import _receiver

    original = _receiver.Receiver._fail

    def free_at_once(self, record, trigger, reason, now, actions, **options):
        original(self, record, trigger, reason, now, actions, **options)
        self._release_quarantine(record.room)

    monkeypatch.setattr(_receiver.Receiver, "_fail", free_at_once)


def require_plane(plane: str) -> None:
    """Skip, saying why, where ``plane``'s optional engine is not installed (CI installs
    every one, so there each plane's tests run)."""
    if plane == "nixl":
        from embxfer.transports.nixl import NixlUnavailable, load_nixl

        try:
            load_nixl()
        except NixlUnavailable as error:
            pytest.skip(f"the nixl data plane is not installed here: {error}")
