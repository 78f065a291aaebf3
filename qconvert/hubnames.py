"""Names the Hub accepts, checked before any work: a collection title refused by the Hub after
an hour of converting and validating costs that hour (and leaves an output behind).

huggingface_hub checks nothing about a collection title client-side and the Hub documents no
rule (only the description's 150-character limit), so this rule is conservative: what the Hub
shows as a title, a non-blank single line of printable characters, at most
``COLLECTION_TITLE_MAX`` characters long.
"""

from __future__ import annotations

import unicodedata

from .errors import UsageError

COLLECTION_TITLE_MAX = 60
_EXAMPLE = 'e.g. --collection "FLUX.1-dev quantized"'


def check_collection_title(title: object, label: str = "--collection") -> None:
    """Raise a UsageError naming ``label`` unless ``title`` is a usable collection title."""
    if not isinstance(title, str):
        raise UsageError(f"{label} must be a text title, not {type(title).__name__}", hint=_EXAMPLE)
    if not title.strip():
        raise UsageError(f"{label} needs a title, not a blank one", hint=_EXAMPLE)
    if len(title) > COLLECTION_TITLE_MAX:
        raise UsageError(
            f"{label} is {len(title)} characters long; the Hub's collection titles are at most {COLLECTION_TITLE_MAX}",
            hint="shorten the title",
        )
    bad = next((c for c in title if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise UsageError(f"{label} holds a control character ({bad!r})", hint="use a single line of printable text")
