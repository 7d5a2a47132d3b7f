"""embxfer.adapters — bind the core to transports and buffers; the public facade.

```python
from embxfer.adapters import connect_loopback, EmbeddingData, Poll
link = connect_loopback(Settings(hidden_size=64), receivers=1)
rx, tx = link.receivers[0], link.sender
rx.init(room); tx.send(room, data); link.run_until_idle()
assert rx.poll(room) == Poll.Success; rows = rx.take(room)
```
"""

from embxfer.core import Poll, Settings
from embxfer.transports.buffers import EmbeddingData

from ._local import LocalLink, connect_local
from ._loopback import LoopbackLink, ReceiverHandle, SenderHandle, connect_loopback
from ._encode import EncodeServer
from ._language import LanguageClient

__all__ = [
    "EmbeddingData",
    "EncodeServer",
    "LanguageClient",
    "LocalLink",
    "connect_local",
    "LoopbackLink",
    "Poll",
    "ReceiverHandle",
    "SenderHandle",
    "Settings",
    "connect_loopback",
]
