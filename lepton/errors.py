"""The exceptions lepton raises at its boundaries.

Library code raises these; the CLI turns them into one clean line and an
exit code at a single place (``lepton.cli.main``).
"""


class LeptonError(Exception):
    """Base class: a problem with a clear, user-facing message."""

    exit_code = 1


class ConfigError(LeptonError):
    """A configuration file or option is invalid. Never retried."""

    exit_code = 2


class ModelError(LeptonError):
    """A model file, manifest, signature or spec is unusable."""


class ProtocolError(LeptonError):
    """A message failed validation: wrong schema, malformed, oversized."""
