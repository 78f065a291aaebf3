"""A local HTTP Hugging Face Hub for tests (see ``server`` for what it implements and why)."""

from .server import DEFAULT_TOKENS, Fault, HubError, HubServer

__all__ = ["DEFAULT_TOKENS", "Fault", "HubError", "HubServer"]
