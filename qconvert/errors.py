"""Typed exceptions and the one table that turns them into CLI messages.

Every *expected* failure raises a subclass of :class:`QConvertError`. The CLI catches these,
prints ``error: <message>`` (one line: what is wrong and how to fix it) and exits with the
class's exit code. Anything else is a bug and exits 1 (with a traceback under ``--debug``).

A message names an option by its Python name, through :func:`opt` (``opt("overwrite", True)``);
the edge that shows the error words it (:func:`worded`): a Python caller reads
```overwrite=True``` (the default wording, :func:`api_wording`), ``qconvert``'s ``main()`` words
it as a flag (``--overwrite``, ``qconvert.cli.cli_wording``). The reference travels in the text,
so a message built from another error's text keeps it.

Exit codes (documented in the README):

====  ==========================================
0     success
1     unexpected error (a bug: please report it)
2     usage: bad option, unknown backend/scheme
3     input: missing/corrupt source, not a Flux model, missing dependency, no disk, a path the OS refuses
4     validation failed
5     publishing failed
130   interrupted (Ctrl-C)
====  ==========================================
"""

from __future__ import annotations

import ast
import errno
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_VALIDATION = 4
EXIT_PUBLISH = 5
EXIT_INTERRUPTED = 130


class QConvertError(Exception):
    """Base class: an expected failure with a one-line, actionable message."""

    exit_code = EXIT_UNEXPECTED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self, wording: Wording | None = None) -> str:
        """Message and hint on one line, options worded by ``wording`` (default: the edge's,
        see :func:`worded`; outside any: :func:`api_wording`)."""
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return redact(" ".join(word(text, wording).split()))


class UsageError(QConvertError):
    """Bad option combination, unknown backend or scheme."""

    exit_code = EXIT_USAGE


class InputError(QConvertError):
    """The source or another input cannot be used as given."""

    exit_code = EXIT_INPUT


class SourceNotFound(InputError):
    """A path or Hub repo that does not exist."""


class NotAFluxModel(InputError):
    """The source is a model, but not a Flux text-to-image pipeline or BFL transformer."""


class CorruptCheckpoint(InputError):
    """A safetensors file that cannot be parsed, is truncated, or holds bad values."""


class GatedRepo(InputError):
    """A Hub repo that needs an accepted license and a token."""


class MissingDependency(InputError):
    """An optional backend library is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"{package} is not installed",
            hint=f"pip install 'qconvert[{extra}]'",
        )


class DeviceError(InputError):
    """The scheme or check needs a device this machine does not have (e.g. CUDA)."""


class DiskSpaceError(InputError):
    """Not enough free disk for the planned output."""


class FileSystemError(InputError):
    """A path the command must read or write is refused by the system: permissions, a read-only
    filesystem, a file where a folder must be, a name too long."""


class OutputExists(UsageError):
    """``--out`` exists and ``--overwrite`` was not given."""


class ValidationFailed(QConvertError):
    """A validation check failed; the output is not fit to publish."""

    exit_code = EXIT_VALIDATION


class PublishError(QConvertError):
    """Pushing to the Hub failed (auth, network, server)."""

    exit_code = EXIT_PUBLISH


class AuthError(PublishError):
    """Missing, invalid or read-only token."""


# --- options named in messages ------------------------------------------------------------


@dataclass(frozen=True)
class OptionRef:
    """An option a message names: ``name`` (its Python name: a :class:`qconvert.job.Job` field,
    a backend option, a keyword of the function raising), with ``value`` (``True``/``False``
    for a switch, a literal) or ``metavar`` (a placeholder such as ``FILE``), or neither."""

    name: str
    value: Any = None
    metavar: str | None = None


Wording = Callable[[OptionRef], str]
_OPT = re.compile(r"\{opt:([^{}=:]+)(?:=([^{}]*)|:([^{}]*))?\}")


def opt(name: str, value: Any = None, *, metavar: str | None = None) -> str:
    """A reference to an option, to put in a message or hint; worded when the error is shown."""
    if value is not None:
        return f"{{opt:{name}={value!r}}}"
    return f"{{opt:{name}:{metavar}}}" if metavar else f"{{opt:{name}}}"


def api_wording(ref: OptionRef) -> str:
    """How a Python caller reads an option: ```overwrite=True```, ```layout='diffusers'```."""
    if ref.value is not None:
        return f"`{ref.name}={ref.value!r}`"
    return f"`{ref.name}={ref.metavar}`" if ref.metavar else f"`{ref.name}`"


_WORDING: ContextVar[Wording] = ContextVar("qconvert_wording", default=api_wording)


@contextmanager
def worded(wording: Wording) -> Iterator[None]:
    """Word the errors shown inside the block (``str(e)``, ``one_line()``) with ``wording``."""
    token = _WORDING.set(wording)
    try:
        yield
    finally:
        _WORDING.reset(token)


def word(text: str, wording: Wording | None = None) -> str:
    """``text`` with its option references worded (default: the current edge's wording)."""
    wording = wording or _WORDING.get()

    def one(m: re.Match[str]) -> str:
        value = ast.literal_eval(m.group(2)) if m.group(2) is not None else None
        return wording(OptionRef(m.group(1), value, m.group(3)))

    return _OPT.sub(one, text)


# --- operating-system errors ---------------------------------------------------------------

# What each errno a user can cause means, in words (the fix is the caller's: it knows the path's
# role, e.g. "choose another --out"). Any other errno is left alone: it is a bug to report.
_OS_CAUSES = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the filesystem is read-only",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder, not a file",
    errno.EEXIST: "a file is in the way",
    errno.ENAMETOOLONG: "a file or folder name is too long (most filesystems allow 255 bytes per name)",
    errno.ELOOP: "the path has a symbolic link loop",
    errno.EIO: "the disk reported an input/output error",
}
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _paths_of(e: OSError) -> str:
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return " -> ".join(names)


def os_error(e: BaseException, what: str, *, fix: str) -> QConvertError | None:
    """The one-line typed error for an OSError a user can fix, or None when it is not one.

    ``what`` says what was being done ("writing the output out/x"); ``fix`` is the remedy for
    that path ("choose another --out"). HTTP errors of huggingface_hub are OSErrors without an
    errno: they are not mapped here (their callers know what the request was for).
    """
    if not isinstance(e, OSError) or e.errno is None:
        return None
    paths = _paths_of(e)
    where = f": {paths}" if paths else ""
    if e.errno in _NO_SPACE:
        return DiskSpaceError(f"no space left on the device while {what}{where}", hint=f"free space or {fix}")
    cause = _OS_CAUSES.get(e.errno)
    if cause is None:
        return None
    if e.errno in (errno.EACCES, errno.EPERM):
        fix = f"{fix}, or fix the permissions of {e.filename or 'that path'}"
    return FileSystemError(f"{cause} while {what}{where}", hint=fix)


@contextmanager
def mapped_os_errors(what: str, *, fix: str) -> Iterator[None]:
    """Turn the OSErrors a user can fix, raised inside the block, into :func:`os_error`'s errors."""
    try:
        yield
    except OSError as e:
        mapped = os_error(e, what, fix=fix)
        if mapped is None:
            raise
        raise mapped from None


# --- secrets -----------------------------------------------------------------------------

# Hugging Face tokens: "hf_" + 30+ alphanumerics. Any string registered with
# ``register_secret`` (e.g. the token actually in use) is redacted too.
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{10,}")
_SECRETS: set[str] = set()


def register_secret(secret: str | None) -> None:
    """Remember a secret so that :func:`redact` removes it from any text we print or store."""
    if secret and len(secret) >= 4:
        _SECRETS.add(secret)


def redact(text: str) -> str:
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _TOKEN_RE.sub("hf_***", text)


def transport_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the Hub could not be reached" (whichever HTTP client is in use)."""
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod in ("httpx2", "httpx"):
        try:
            errs.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    try:
        import requests

        errs += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    return tuple(errs)
