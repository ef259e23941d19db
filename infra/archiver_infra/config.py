"""The stack's parameters, read once from CDK context (`-c key=value` or cdk.json)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from constructs import Node

CpuArchitecture = Literal["x86_64", "arm64"]
Encryption = Literal["s3", "kms"]

# What a Fargate task may be given: CPU units -> allowed memory in MiB.
_FARGATE_MEMORY_MIB: dict[int, range] = {
    256: range(512, 2048 + 1, 512),
    512: range(1024, 4096 + 1, 1024),
    1024: range(2048, 8192 + 1, 1024),
    2048: range(4096, 16384 + 1, 1024),
    4096: range(8192, 30720 + 1, 1024),
    8192: range(16384, 61440 + 1, 4096),
    16384: range(32768, 122880 + 1, 8192),
}
_ORIGIN = re.compile(r"^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
# The performance benchmark's capacity (README, "Performance"): at 60% CPU one vCPU holds
# 5.3 bots of 16 webcams at 30 fps, 640x360 (the lowest of three runs: 5.3 to 8.0).
BOTS_PER_VCPU = 5.3
STREAMS_PER_BOT = 16
_ARCHIVE_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class ConfigError(ValueError):
    """Raised at synth time for a parameter the deployment could not run with."""


@dataclass(frozen=True, kw_only=True)
class ArchiverConfig:
    """Every parameter of the deployment, with the context key it is read from."""

    certificate_arn: str = field(metadata={"key": "certificateArn"})
    """ACM certificate for the HTTPS listener, in the stack's region (required)."""
    stack_name: str = field(default="RecallArchiver", metadata={"key": "stackName"})
    region: str | None = field(default=None, metadata={"key": "region"})
    """Deploy region; falls back to the CLI's (CDK_DEFAULT_REGION)."""
    account: str | None = field(default=None, metadata={"key": "account"})
    """Deploy account; falls back to the CLI's credentials (CDK_DEFAULT_ACCOUNT)."""
    vpc_id: str | None = field(default=None, metadata={"key": "vpcId"})
    """Import this VPC (needs public and private subnets); a new one when unset."""
    max_azs: int = field(default=2, metadata={"key": "maxAzs"})
    """Availability zones of a newly created VPC."""

    image_uri: str | None = field(default=None, metadata={"key": "imageUri"})
    """Run this image (e.g. an ECR URI); when unset the repository's Dockerfile is built."""
    image_directory: str = field(
        default=str(Path(__file__).resolve().parents[2]), metadata={"key": "imageDirectory"}
    )
    """Build context of the image when no `imageUri` is given: the repository root."""
    cpu_architecture: CpuArchitecture = field(default="x86_64", metadata={"key": "cpuArchitecture"})
    cpu: int = field(default=1024, metadata={"key": "cpu"})
    """Fargate CPU units per task (1024 = 1 vCPU)."""
    memory_mib: int = field(default=2048, metadata={"key": "memoryMiB"})
    ephemeral_storage_gib: int = field(default=100, metadata={"key": "ephemeralStorageGiB"})
    """Task disk (21-200 GiB) for the spool: what S3 has not acknowledged yet waits there,
    so size it for the S3 outage the service should ride out at its ingest rate."""

    desired_count: int = field(default=2, metadata={"key": "desiredCount"})
    min_count: int = field(default=2, metadata={"key": "minCount"})
    max_count: int = field(default=10, metadata={"key": "maxCount"})
    target_cpu_percent: int = field(default=60, metadata={"key": "targetCpuPercent"})
    target_memory_percent: int = field(default=70, metadata={"key": "targetMemoryPercent"})
    """Memory to aim for: streams, queues and open segments are what fill a task's memory."""
    target_streams_per_task: int | None = field(
        default=None, metadata={"key": "targetStreamsPerTask"}
    )
    """Active streams per task to aim for; by default the benchmark's capacity at 60% CPU
    for the task's vCPUs (`streams_per_task`)."""

    alarm_topic_arn: str | None = field(default=None, metadata={"key": "alarmTopicArn"})
    """An existing SNS topic that the alarms notify (alarm and back to OK); none when unset."""
    spool_alarm_bytes: int = field(default=1024**3, metadata={"key": "spoolAlarmBytes"})
    """Bytes waiting in a task's spool (the highest task) above which the spool alarm fires,
    once they have stayed there for `spoolAlarmMinutes`."""
    spool_alarm_minutes: int = field(default=5, metadata={"key": "spoolAlarmMinutes"})
    dropped_frames_alarm: int = field(default=1, metadata={"key": "droppedFramesAlarm"})
    """Frames dropped (every task, every reason) within 5 minutes that fire the alarm."""

    bucket_name: str | None = field(default=None, metadata={"key": "bucketName"})
    """Name of the archive bucket created by the stack; generated when unset."""
    archive_prefix: str = field(default="archive", metadata={"key": "archivePrefix"})
    """Key prefix of everything the service writes; its permissions stop there."""
    encryption: Encryption = field(default="s3", metadata={"key": "encryption"})
    """`s3` (SSE-S3) or `kms` (SSE-KMS with a customer managed key made by the stack)."""
    versioned: bool = field(default=False, metadata={"key": "versioned"})
    infrequent_access_after_days: int = field(
        default=30, metadata={"key": "infrequentAccessAfterDays"}
    )
    glacier_ir_after_days: int = field(default=90, metadata={"key": "glacierIrAfterDays"})
    """Glacier Instant Retrieval: reads stay immediate, so resumed streams still find
    their manifests."""
    expire_after_days: int | None = field(default=None, metadata={"key": "expireAfterDays"})
    """Delete archived objects this many days after upload; kept forever when unset."""

    fallback_bucket_name: str | None = field(default=None, metadata={"key": "fallbackBucketName"})
    """An existing bucket, best in another region, that takes what the spool holds once the
    archive bucket has been unreachable for a minute, and on a drain; the service moves it
    back. None: no fallback."""
    fallback_prefix: str = field(default="fallback", metadata={"key": "fallbackPrefix"})
    """Key prefix in the fallback bucket; the service's permissions there stop at it."""

    static_tokens: bool = field(default=False, metadata={"key": "staticTokens"})
    """Accept static tokens (the `authSecretArn` secret) beside signed ones. Off by default:
    a static token writes for any bot and opens every recording; signed tokens are scoped
    to one bot, or to one recording's viewer."""
    auth_secret_arn: str | None = field(default=None, metadata={"key": "authSecretArn"})
    """Existing Secrets Manager secret holding the bot tokens; the stack makes one when unset."""
    token_keys_secret_arn: str | None = field(default=None, metadata={"key": "tokenKeysSecretArn"})
    """Existing secret holding the keys that sign short-lived bot tokens; the stack makes
    one when unset."""
    log_retention_days: int = field(default=30, metadata={"key": "logRetentionDays"})
    viewer_origins: str | None = field(default=None, metadata={"key": "viewerOrigins"})
    """Origins the viewer's pages are served from (`https://archiver.example.com`,
    comma-separated): the bucket's CORS rule lets them GET and HEAD media by presigned URL.
    No rule when unset."""

    @property
    def viewer_origin_list(self) -> list[str]:
        return [o.strip() for o in (self.viewer_origins or "").split(",") if o.strip()]

    @classmethod
    def from_context(cls, node: Node, **overrides: Any) -> ArchiverConfig:
        """Read every key from the CDK context; `overrides` win (tests, other apps)."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = overrides.get(spec.name, node.try_get_context(spec.metadata["key"]))
            if raw is None or raw == "":
                continue
            values[spec.name] = _coerce(spec.metadata["key"], raw, str(spec.type))
        if "certificate_arn" not in values:
            raise ConfigError("certificateArn is required: -c certificateArn=arn:aws:acm:...")
        values.setdefault("region", os.environ.get("CDK_DEFAULT_REGION"))
        values.setdefault("account", os.environ.get("CDK_DEFAULT_ACCOUNT"))
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Refuse combinations that would only fail later, during the deployment."""
        if self.cpu_architecture not in ("x86_64", "arm64"):
            raise ConfigError("cpuArchitecture must be x86_64 or arm64")
        if self.encryption not in ("s3", "kms"):
            raise ConfigError("encryption must be s3 or kms")
        allowed_memory = _FARGATE_MEMORY_MIB.get(self.cpu)
        if allowed_memory is None or self.memory_mib not in allowed_memory:
            raise ConfigError(f"Fargate has no task size of cpu={self.cpu}, {self.memory_mib} MiB")
        if not 21 <= self.ephemeral_storage_gib <= 200:
            raise ConfigError("ephemeralStorageGiB must be 21..200")
        if not 1 <= self.min_count <= self.desired_count <= self.max_count:
            raise ConfigError("need 1 <= minCount <= desiredCount <= maxCount")
        if not _ARCHIVE_PREFIX.match(self.archive_prefix):
            raise ConfigError("archivePrefix must look like `archive` or `team/archive`")
        if not _ARCHIVE_PREFIX.match(self.fallback_prefix):
            raise ConfigError("fallbackPrefix must look like `fallback` or `team/fallback`")
        if self.fallback_bucket_name is not None and self.fallback_bucket_name == self.bucket_name:
            raise ConfigError("the fallback bucket must not be the archive bucket")
        for origin in self.viewer_origin_list:
            if not _ORIGIN.match(origin):
                raise ConfigError(f"viewerOrigins: {origin!r} is not an origin like https://host")
        if not 0 < self.infrequent_access_after_days < self.glacier_ir_after_days:
            raise ConfigError("need 0 < infrequentAccessAfterDays < glacierIrAfterDays")
        if self.infrequent_access_after_days < 30:
            raise ConfigError("S3 moves objects to Standard-IA no earlier than 30 days")
        if self.target_streams_per_task is not None and self.target_streams_per_task < 1:
            raise ConfigError("targetStreamsPerTask must be at least 1")
        if self.spool_alarm_bytes < 1 or self.spool_alarm_minutes < 1:
            raise ConfigError("spoolAlarmBytes and spoolAlarmMinutes must be at least 1")
        if self.dropped_frames_alarm < 1:
            raise ConfigError("droppedFramesAlarm must be at least 1")
        if self.expire_after_days is not None and self.expire_after_days <= (
            self.glacier_ir_after_days
        ):
            raise ConfigError("expireAfterDays must come after glacierIrAfterDays")

    @property
    def streams_per_task(self) -> int:
        """The scaling target: `targetStreamsPerTask`, else the benchmark's streams per vCPU
        at 60% CPU times the task's vCPUs (85 for 1 vCPU)."""
        if self.target_streams_per_task is not None:
            return self.target_streams_per_task
        return max(1, round(BOTS_PER_VCPU * STREAMS_PER_BOT * self.cpu / 1024))


def _coerce(key: str, raw: Any, annotation: str) -> Any:
    """Context from `-c` is always a string; cdk.json may hold real JSON types."""
    if annotation == "bool":
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "1", "yes"):
            return True
        if str(raw).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} must be true or false, not {raw!r}")
    if annotation.startswith("int"):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key} must be a whole number, not {raw!r}") from None
    return str(raw)
