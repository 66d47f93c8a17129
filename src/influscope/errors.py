"""Exceptions raised by influscope.

Every error says what was expected, what was received and how to fix it. Each class also
derives from the built-in exception a user would catch for that kind of problem
(``ValueError`` for bad input, ``RuntimeError`` for a failed computation or stale state).
"""

from __future__ import annotations


class InfluscopeError(Exception):
    """Base class of every error raised by influscope."""


class ConfigError(InfluscopeError, ValueError):
    """A configuration value is out of range or of the wrong kind."""


class DataError(InfluscopeError, ValueError):
    """Input data is empty, malformed, or does not fit the model."""


class ModuleMatchError(InfluscopeError, ValueError):
    """No module (or an unsupported one) matched the requested tracking patterns."""


class NumericalError(InfluscopeError, RuntimeError):
    """A NaN/Inf appeared in a loss, a gradient or a curvature factor."""


class StaleArtifactError(InfluscopeError, RuntimeError):
    """A stored stage was produced by a different model, data set or configuration."""


class StorageError(InfluscopeError, OSError):
    """A run directory or output file cannot be created or written."""


class MemoryBudgetError(InfluscopeError, MemoryError):
    """A stage cannot run within the memory budget it was given (``memory_gb``)."""


class CollectionError(InfluscopeError, RuntimeError):
    """Gradients captured during training do not match the gradient the training step took."""


class RegistryError(InfluscopeError, KeyError):
    """An unknown key was looked up in one of influscope's registries."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


def lookup(registry: dict, key: str, what: str):
    """Return ``registry[key]`` or raise :class:`RegistryError` listing the known keys.

    Args:
        registry: The registry dictionary.
        key: The requested key.
        what: What the registry holds, for the message (e.g. ``"curvature"``).
    """
    try:
        return registry[key]
    except KeyError:
        known = ", ".join(repr(k) for k in sorted(registry))
        raise RegistryError(f"Unknown {what} {key!r}. Supported: ({known}).") from None
