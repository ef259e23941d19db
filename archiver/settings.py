"""The service's one settings object: built once at start-up and passed down."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from archiver.host.workers import available_cpus


class Settings(BaseSettings):
    """Every knob of the service, read from `ARCHIVER_*` variables or a `.env` file."""

    model_config = SettingsConfigDict(
        env_prefix="ARCHIVER_", env_file=".env", extra="ignore", frozen=True
    )

    # Required for `serve`, one kind or both: who may connect.
    auth_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(),
        description="Accepted `token` query values (at least 32 characters each; `serve` "
        "refuses shorter ones), comma-separated; several allow rotation.",
    )
    token_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(),
        description="Keys (at least 32 characters each) of short-lived signed tokens, "
        "comma-separated: the first signs (`archiver token create`), every one verifies, so "
        "a new key goes first and the old one stays second until its tokens have expired.",
    )
    token_max_ttl_s: float = Field(
        default=86400.0,
        gt=0,
        description="Longest lifetime `archiver token create --ttl` may give a signed token, "
        "seconds: a leaked token stays valid until it expires.",
    )

    # Listening.
    host: str = Field(default="0.0.0.0", description="Address to listen on.")  # noqa: S104
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port to listen on.")
    workers: int = Field(
        default_factory=available_cpus,
        ge=1,
        description="Worker processes sharing the port under `archiver serve`, each holding "
        "its own bots and its own slot of the spool; by default the CPUs the container may "
        "use (its cgroup quota, else its CPU affinity).",
    )
    header_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Seconds a new connection has to send the headers of its first request "
        "in full; one that has not (idle, slow or half-open) is closed. Bots, browsers and "
        "load balancers send them at once.",
    )
    idle_http_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a connection may sit idle between HTTP requests (keep-alive), or "
        "take over the headers of its next one, before it is closed. Websockets are not "
        "touched (their pings keep them).",
    )
    max_pending_connections: int = Field(
        default=256,
        ge=1,
        description="Connections a worker holds that are not a bot's websocket (waiting for "
        "their headers, being answered, or idle between requests). Beyond it each new one "
        "closes the oldest still waiting for its headers, else the oldest idle one, or is "
        "closed at once when every one is being answered; counted and logged "
        "(`pending_connections_shed`). Keeps descriptors for bots and `/healthz` "
        "(`ulimit -n` is 1024 on Fargate).",
    )

    # Where the archive goes.
    store: str = Field(
        default="file://./archive",
        description="`s3://bucket/prefix` or `file:///path`; a local folder needs no cloud.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO); AWS when unset."
    )
    fallback_store: str | None = Field(
        default=None,
        description="Second store (`s3://bucket/prefix`, best in another region, or "
        "`file:///path`): what waits in the spool goes there once the primary store has been "
        "unreachable for `fallback_after_s`, and on a drain; moved back when it is reachable.",
    )
    fallback_s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint of the fallback store; AWS when unset."
    )
    fallback_after_s: float = Field(
        default=60.0,
        gt=0,
        description="Seconds the primary store must have been unreachable before the spool "
        "empties into the fallback store.",
    )
    reconcile_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="How often a running service looks into the fallback store and moves what "
        "it holds into the primary (when the primary is reachable).",
    )
    spool_dir: str = Field(
        default="./spool",
        description="Local folder where objects wait (fsynced) until the store confirms them, "
        "and where open segments are journaled; keep it on a disk that outlives the process.",
    )
    spool_cap_bytes: int = Field(
        default=10 * 1024**3,
        ge=1024 * 1024,
        description="Spool size at which reading from bots pauses (backpressure, no drops); "
        "divided evenly among the workers.",
    )
    spool_high_water_ratio: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Share of the spool cap above which /readyz reports not ready.",
    )
    upload_attempts: int = Field(
        default=6, ge=1, description="Tries per object before an upload counts as failed."
    )
    upload_backoff_s: float = Field(
        default=0.2, gt=0, description="First retry delay; doubles per try, with jitter."
    )
    upload_concurrency: int = Field(
        default=8, ge=1, description="Objects uploaded at once by this process."
    )

    # Segmenting.
    segment_target_s: float = Field(
        default=10.0, gt=0, description="Cut at the first key frame after this; force at 2x."
    )
    continuation_wait_s: float = Field(
        default=15.0,
        ge=0,
        description="How long an H.264 stream whose first frames continue a GOP this process "
        "has no configuration for (a reconnect that outran the previous task's last upload) "
        "holds them while it polls the archive for that configuration; then they are dropped "
        "and the stream waits for a key frame.",
    )
    manifest_overhead_ratio: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="A stream's manifest and playlist requests stay within this share of "
        "all its requests (live writes within 80% of it, the rest kept for its final write, "
        "its read and its recording's session.json), and their bytes within this share of "
        "its media bytes.",
    )
    segment_max_frames: int = Field(
        default=3600,
        ge=1,
        description="An H.264 segment is cut (flagged) once it holds this many frames, "
        "whatever its timestamps: two minutes at 30 fps.",
    )
    segment_max_bytes: int = Field(
        default=32 * 1024**2,
        ge=1024,
        description="An H.264 segment is cut (flagged) once its frames reach this many bytes; "
        "an open segment is held in memory.",
    )
    png_batch_bytes: int = Field(
        default=16 * 1024**2,
        ge=1024,
        description="A PNG tar batch closes once its frames reach this many bytes (an open "
        "batch is held in memory; 360p PNGs are a few hundred KB).",
    )
    png_batch_frames: int = Field(
        default=60, ge=1, description="A PNG tar batch closes once it holds this many frames."
    )
    png_batch_s: float = Field(
        default=30.0,
        gt=0,
        description="A PNG tar batch closes before a frame this many seconds (relative "
        "timestamp) after its first.",
    )
    audio_codec: Literal["flac", "opus"] = Field(
        default="flac",
        description="How each participant's audio is stored: flac (lossless, about half the "
        "bytes of the PCM received) or opus (lossy, about a tenth); both in fragmented MP4.",
    )
    audio_segment_s: float = Field(
        default=60.0,
        gt=0,
        description="An audio segment closes at the first chunk this many seconds after its "
        "start: at 60 s a participant-hour costs 60 PUTs (10 s would cost 360).",
    )
    audio_jitter_s: float = Field(
        default=0.06,
        gt=0,
        description="A chunk whose timestamp is within this of the running sample clock is "
        "joined to the chunk before it sample for sample; further off is a gap or an overlap.",
    )
    audio_drift_s: float = Field(
        default=0.01,
        gt=0,
        description="When the smoothed difference between chunks' timestamps and the sample "
        "clock passes this (a sender clock that runs fast or slow), the clock is adjusted by "
        "it, and the adjustment listed.",
    )
    audio_gap_fill_s: float = Field(
        default=10.0,
        ge=0,
        description="A gap in a participant's audio up to this long is stored as silence "
        "inside its segment; a longer one closes the segment (nothing stored for the gap).",
    )
    audio_chunk_max_s: float = Field(
        default=2.0,
        gt=0,
        description="Longest audio chunk accepted; Recall sends chunks of tens of milliseconds.",
    )
    events_batch_count: int = Field(
        default=1000, ge=1, description="An events batch closes once it holds this many events."
    )
    events_batch_s: float = Field(
        default=30.0,
        gt=0,
        description="An events batch closes before an event this many seconds (relative "
        "timestamp) after its first, and at the latest this long after it opened.",
    )
    events_batch_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        description="An events batch closes once its lines reach this many bytes: a full "
        "batch of 1000 ordinary events (participant events and transcripts, about 1 KiB "
        "each) fits; a single larger event makes a batch of its own.",
    )
    events_queued_bytes_per_recording: int = Field(
        default=8 * 1024 * 1024,
        ge=1,
        description="Bytes of a recording's closed events batches not yet in the spool above "
        "which the connections sending its events are slowed (not read) until they are.",
    )
    events_queued_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="The same, over every recording of the process: above it, a connection "
        "whose recording has batches waiting is slowed.",
    )
    max_event_recordings_per_connection: int = Field(
        default=4,
        ge=1,
        description="Recordings whose events one connection may hold open at once (a quiet "
        "one with nothing open stops counting); a bot sends one. Events of one more are "
        "refused and counted, the connection goes on.",
    )

    # session.json.
    session_presence_entries: int = Field(
        default=20,
        ge=2,
        description="Joins, and leaves, kept per participant in session.json: the first and "
        "the latest; those between are counted (`joins_dropped`, `leaves_dropped`).",
    )
    session_participant_details_bytes: int = Field(
        default=4096,
        ge=256,
        description="A participant's details (as JSON) larger than this are kept in "
        "session.json without their nested or long fields (`details_truncated`); the events "
        "archive has them whole.",
    )
    session_max_bytes: int = Field(
        default=1024 * 1024,
        ge=64 * 1024,
        description="Size session.json's participants may reach; participants first seen "
        "beyond it are counted (`participants_omitted`), not listed.",
    )

    # "The recording is ready": completion and its webhook notice.
    recording_ready_grace_s: float = Field(
        default=120.0,
        ge=0,
        description="Seconds a recording whose streams and events have all ended waits for a "
        "connection to come back before session.json says `complete` (and the notice goes "
        "out): longer than the bot's reconnect window (30 tries, 3 s apart, about 90 s).",
    )
    webhook_url: str | None = Field(
        default=None,
        description="URL that gets a signed JSON POST once per completed recording; none "
        "when unset (session.json and the ready marker still say so).",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Key of the notice's HMAC-SHA256 signature (X-Archiver-Signature); "
        "required with `webhook_url`.",
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, description="Seconds one delivery attempt may take."
    )
    webhook_backoff_s: float = Field(
        default=1.0,
        gt=0,
        description="First retry delay of a failed delivery; doubles per try (at most "
        "`webhook_backoff_max_s`), with full jitter.",
    )
    webhook_backoff_max_s: float = Field(
        default=60.0, gt=0, description="Longest delay between two delivery attempts."
    )
    webhook_deadline_s: float = Field(
        default=900.0,
        gt=0,
        description="Seconds a notice is retried before it is given up (logged, counted, "
        "and recorded beside session.json); also the claim's lease, after which another "
        "task may take over a notice whose sender died.",
    )

    # Streams and limits.
    idle_timeout_s: float = Field(
        default=30.0, gt=0, description="A stream with no frames for this long ends."
    )
    leave_grace_s: float = Field(
        default=5.0,
        ge=0,
        description="After a participant's leave, how long its stream waits for more frames "
        "before it ends: frames within it continue the stream (no final manifest and reopen).",
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest websocket message accepted: Recall's key frames and 360p PNGs "
        "are a few hundred KB, base64 in JSON adds a third.",
    )
    max_streams_per_connection: int = Field(
        default=64,
        ge=1,
        description="Streams one connection may hold open at once (ended ones do not count): "
        "a bot sends at most 16 participants' webcams plus screenshares, so 64 leaves a "
        "margin of two.",
    )
    stream_queue_messages: int = Field(
        default=256, ge=1, description="Messages buffered per stream before reading pauses."
    )
    stream_queue_bytes: int = Field(
        default=8 * 1024**2,
        ge=1024,
        description="Payload bytes (base64) buffered per stream before reading pauses: "
        "seconds of 720p video, a dozen key frames or 360p PNGs.",
    )
    connection_queued_bytes: int = Field(
        default=64 * 1024**2,
        ge=1024**2,
        description="Payload bytes one connection may have waiting in stream queues before "
        "its socket stops being read: seconds of a 16-participant 720p bot; no connection "
        "can take the whole process's budget.",
    )
    queued_bytes_total: int = Field(
        default=256 * 1024**2,
        ge=1024**2,
        description="Payload bytes buffered in all stream queues of a process before reading "
        "pauses: bounds memory whatever the connections send.",
    )
    stream_stall_s: float = Field(
        default=5.0,
        gt=0,
        description="A stream whose worker takes nothing from its full queue for this long "
        "sheds new frames (counted) instead of stalling the connection's other streams.",
    )
    malloc_arenas: int = Field(
        default=2,
        ge=0,
        description="Most glibc heaps (arenas) a worker's threads share: with glibc's own "
        "default (8 per CPU), memory grows a few MB with each burst of streams until every "
        "arena is warm. 0 leaves glibc's default (and `MALLOC_ARENA_MAX`).",
    )
    batch_window_s: float = Field(
        default=0.5,
        ge=0,
        le=5,
        description="How long a stream's worker lets frames gather before it takes the next "
        "batch: a wake-up, a thread hop and a journal write per batch instead of per frame. "
        "Frames are journaled when taken, so a killed process can lose up to this much more "
        "of each stream; 0 takes each frame as it comes (more CPU).",
    )
    timestamp_tolerance_s: float = Field(
        default=2.0,
        gt=0,
        description="How far a frame's relative and absolute timestamps may disagree with "
        "the stream's start before the frame counts as an outlier.",
    )
    timestamp_max_relative_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="Largest relative timestamp (seconds into the recording) accepted.",
    )
    heartbeat_s: float = Field(
        default=30.0, gt=0, description="Websocket ping interval, keeps proxies from idling out."
    )

    close_reply_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="On a drain, how long a bot's frames are still read and archived after "
        "the 1012 close frame was sent, waiting for the bot's close reply.",
    )
    drain_deadline_s: float = Field(
        default=90.0,
        gt=0,
        description="On SIGTERM, time to flush streams and uploads before exiting; keep it "
        "under the platform's stop timeout (ECS: 120 s).",
    )

    ecs_agent_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ARCHIVER_ECS_AGENT_URI", "ECS_AGENT_URI"),
        description="Set by ECS: lets the service protect its task from scale-in while bots "
        "are connected.",
    )

    # The recording viewer (read side, off by default).
    viewer: bool = Field(
        default=False,
        description="Serve the synchronized viewer at /recordings/{bot_id}/{recording_id}, "
        "behind the same tokens as bots (`?token=`).",
    )
    viewer_hls_js_path: str | None = Field(
        default=None,
        description="hls.js file the viewer serves; when unset, "
        "viewer/node_modules/hls.js/dist/hls.min.js of a source checkout (`npm ci --prefix "
        "viewer`).",
    )
    viewer_url_expiry_s: int = Field(
        default=3600,
        ge=60,
        le=7 * 24 * 3600,
        description="Lifetime of the presigned S3 URLs the viewer hands the browser, seconds; "
        "never beyond the viewer token's expiry.",
    )

    # Metrics.
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="TCP port (on `metrics_host`) where Prometheus scrapes /metrics, the whole "
        "task's figures (every worker); 0: not served. Never the public port.",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the metrics port listens on: this machine only by default; "
        "0.0.0.0 where a scraper elsewhere reaches it (another container, the VPC).",
    )
    cloudwatch_metrics: bool = Field(
        default=False,
        description="Log the key figures every `cloudwatch_metrics_interval_s` in CloudWatch's "
        "embedded metric format (on ECS the awslogs driver makes them metrics).",
    )
    cloudwatch_namespace: str = Field(
        default="RecallArchiver", description="CloudWatch namespace of those metrics."
    )
    cloudwatch_service: str = Field(
        default="recall-archiver",
        description="Value of their one dimension, `Service`: the deployment's name.",
    )
    cloudwatch_metrics_interval_s: float = Field(
        default=60.0, gt=0, description="Seconds between two CloudWatch metric documents."
    )

    # Logging.
    log_level: str = Field(default="info", description="debug, info, warning or error.")
    log_format: str = Field(
        default="auto", description="json, console, or auto (console on a terminal)."
    )

    @field_validator("auth_tokens", "token_keys", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    @field_validator("store", "fallback_store")
    @classmethod
    def _known_store_scheme(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("s3://", "file://")):
            raise ValueError("a store must be s3://bucket/prefix or file:///path")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _web_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("the webhook URL must be https://... (or http://...)")
        return value
