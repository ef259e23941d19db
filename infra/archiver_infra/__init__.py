"""AWS deployment of the archiver: one CDK stack and its parameters."""

from archiver_infra.config import ArchiverConfig, ConfigError
from archiver_infra.stack import ArchiverStack

__all__ = ["ArchiverConfig", "ArchiverStack", "ConfigError"]
