"""The daemon's two kinds of failure: what the loop retries and what stops it.

A :class:`Recoverable` error is a condition of the outside world that passes (a broker restarting,
a leader election, a network cut): the loop keeps its state, backs off and tries again, and says
it is blind while it lasts. A :class:`Fatal` error will not pass by waiting (credentials refused,
a setting librdkafka does not know): the daemon checkpoints what it can and stops cleanly with
the message. Control flow (end of input, a stop signal) is not an error and is not signalled
with these.
"""

from __future__ import annotations

__all__ = ["Recoverable", "Fatal"]


class Recoverable(Exception):
    """Retry later: the same call can succeed once the outside world recovers."""


class Fatal(Exception):
    """Stop cleanly: retrying cannot help until someone changes the configuration."""
