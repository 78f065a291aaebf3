"""Fault injection for crash-safety tests: kill this process at a named point.

Set ``QCONVERT_KILL_AT`` to a point name (``after-plan``, ``tensor-<n>`` — before the n-th
tensor of the run is written, ``fetch-<n>`` — before the n-th range request of a streamed
source, ``upload-<n>`` — before the n-th shard is uploaded while converting,
``before-stage-commit``, ``before-promote-commit``, ``after-promote-commit``, ``before-rename``) and the process SIGKILLs itself there, as a
power cut or OOM kill would; with ``QCONVERT_KILL_SIGNAL=INT`` it sends itself SIGINT there
instead (a Ctrl-C at a known moment), and with ``QCONVERT_KILL_SIGNAL=RAISE`` it raises
:class:`InjectedFault` (a bug at a known moment: what must not take other work down with it).
Unset (always, outside tests), :func:`point` is a dict lookup.
"""

from __future__ import annotations

import os
import signal

_ENV = "QCONVERT_KILL_AT"
_SIGNAL_ENV = "QCONVERT_KILL_SIGNAL"
_counter: dict[str, int] = {"tensor": 0}


class InjectedFault(RuntimeError):
    """Raised at a fault point with ``QCONVERT_KILL_SIGNAL=RAISE``: stands for a bug."""


def point(name: str) -> None:
    target = os.environ.get(_ENV)
    if target and target == name:
        if os.environ.get(_SIGNAL_ENV) == "RAISE":
            raise InjectedFault(f"fault injected at {name}")
        sig = signal.SIGINT if os.environ.get(_SIGNAL_ENV) == "INT" else signal.SIGKILL
        os.kill(os.getpid(), sig)


def tensor_written() -> None:
    """Count tensors across the run; fires ``tensor-<n>`` before the n-th (1-based)."""
    if os.environ.get(_ENV, "").startswith("tensor-"):
        _counter["tensor"] += 1
        point(f"tensor-{_counter['tensor']}")


def counted(kind: str) -> None:
    """Count events of ``kind`` (``fetch``: a range request of a streamed source, ``upload``: a
    shard handed to the Hub); fires ``<kind>-<n>`` before the n-th (1-based)."""
    if os.environ.get(_ENV, "").startswith(f"{kind}-"):
        _counter[kind] = _counter.get(kind, 0) + 1
        point(f"{kind}-{_counter[kind]}")


def reset() -> None:
    """Start counting again (a test that re-runs in the same process)."""
    _counter.clear()
    _counter["tensor"] = 0
