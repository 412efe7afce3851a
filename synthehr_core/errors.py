"""Typed errors. Every message names the input, shows the value and says the fix."""


class SynthEHRError(ValueError):
    """Base class of all user-facing input errors."""


class ConfigError(SynthEHRError):
    """A dataset, KDE, model or pipeline configuration is invalid."""


class SchemaError(SynthEHRError):
    """A raw or canonical table lacks columns, has wrong types or breaks a key constraint."""


class DataError(SynthEHRError):
    """Raw data is present and well-formed but unusable (empty, inconsistent, undecodable)."""


def bullet_list(problems: list[str]) -> str:
    """Join collected problems into one message, one bullet per problem."""
    return "\n".join(f"  - {p}" for p in problems)
