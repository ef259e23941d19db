"""Least privilege, proven: the service runs a whole meeting against an S3 server that
enforces IAM, with credentials holding exactly the S3 statements the CDK stack grants the
task role (taken from the synthesized template), and is refused outside its prefix.

moto's server enforces IAM once it has served `INITIAL_NO_AUTH_ACTION_COUNT` requests: the
first ones create the bucket and the user, its policy and its access key; every request
after that is checked against the policy. moto checks actions and resources; it ignores
the `s3:prefix` condition of `s3:ListBucket` (asserted on the template instead, in
test_infra_stack.py), and answers a missing key with 404 where S3 answers 403 to a role
without bucket-wide listing (the store then lists exactly that key, which is allowed:
checked here as well).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import orjson
import pytest

from archiver.consumers.decode_check import check_events, check_png_stream, check_stream
from archiver.errors import StoreError
from archiver.layout import RecordingId
from archiver.store import S3Store
from archiver.tools.simulator import Simulation, run_simulation
from tests.conftest import ServiceFactory
from tests.deploy.test_infra_stack import INFRA, synthesize

PREFIX = "archive"  # The stack's default archivePrefix, and the service fixture's.
# CreateBucket, CreateUser, CreatePolicy, AttachUserPolicy, CreateAccessKey: then enforced.
SETUP_REQUESTS = 5


@dataclass(frozen=True)
class Restricted:
    """The IAM-enforcing S3 server, its bucket, and the task role's credentials."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    policy: dict[str, Any]

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        return boto3.session.Session(
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name="us-east-1",
        ).client("s3", endpoint_url=self.endpoint)


def task_role_s3_policy(tmp: Path, bucket: str) -> dict[str, Any]:
    """The S3 statements the synthesized stack grants the task role, with the bucket's
    tokens resolved to the test bucket."""
    sys.path.insert(0, str(INFRA))
    try:
        synthesized = synthesize(importlib.import_module("archiver_infra"), tmp, {})
    finally:
        sys.path.remove(str(INFRA))
    (bucket_id,) = [k for k, v in synthesized.resources.items() if v["Type"] == "AWS::S3::Bucket"]

    def resolve(value: Any) -> Any:
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if value == {"Fn::GetAtt": [bucket_id, "Arn"]}:
            return f"arn:aws:s3:::{bucket}"
        if value == {"Ref": bucket_id}:
            return bucket
        if value == {"Ref": "AWS::Partition"}:
            return "aws"
        if "Fn::Join" in value:
            separator, parts = value["Fn::Join"]
            return separator.join(resolve(p) for p in parts)
        assert not any(k.startswith(("Fn::", "Ref")) for k in value), value
        return {k: resolve(v) for k, v in value.items()}

    statements = [
        resolve(s)
        for s in synthesized.task_role_statements()
        if any(str(a).startswith("s3:") for a in _listed(s["Action"]))
    ]
    assert statements, "the task role has no S3 statement"
    return {"Version": "2012-10-17", "Statement": statements}


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restricted]:
    port = _free_port()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ARCHIVER_"))},
        "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            # A bare TCP connect: an HTTP request would count against the unchecked ones.
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "moto server exited"
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        bucket = f"archive-{uuid.uuid4().hex[:12]}"
        policy = task_role_s3_policy(tmp_path_factory.mktemp("cdk-iam"), bucket)
        admin = boto3.session.Session(
            aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1"
        )
        admin.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        iam = admin.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="archiver-task")
        arn = iam.create_policy(PolicyName="task-role", PolicyDocument=json.dumps(policy))
        iam.attach_user_policy(UserName="archiver-task", PolicyArn=arn["Policy"]["Arn"])
        key = iam.create_access_key(UserName="archiver-task")["AccessKey"]
        yield Restricted(endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"], policy)
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3_endpoint(restricted: Restricted) -> str:
    """The conftest's service fixture, pointed at the enforcing server."""
    return restricted.endpoint


@pytest.fixture
def bucket(restricted: Restricted, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test bucket, with the task role's credentials for everything in this test."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", restricted.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", restricted.secret_key)
    return restricted.bucket


def test_the_policy_is_the_stacks_and_enforcement_is_on(restricted: Restricted) -> None:
    actions = sorted(a for s in restricted.policy["Statement"] for a in _listed(s["Action"]))
    assert actions == ["s3:GetObject", "s3:ListBucket", "s3:PutObject"]
    # Anyone else is refused from now on: the setup requests used up the unchecked ones.
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        restricted.client("testing", "testing").list_objects_v2(
            Bucket=restricted.bucket, Prefix=f"{PREFIX}/"
        )
    assert refused.value.response["Error"]["Code"] == "InvalidAccessKeyId"


async def test_a_whole_meeting_is_archived_with_only_the_task_role(
    service: ServiceFactory, restricted: Restricted
) -> None:
    first = await service()
    bot, recording = str(uuid.uuid4()), str(uuid.uuid4())
    ids = {"bot_id": bot, "recording_id": recording}
    h264 = Simulation(url=first.url, participants=1, seconds=2, fps=10, **ids)
    png = Simulation(
        url=first.url, participants=1, seconds=2, fps=2, format="png",
        first_participant_id=300, **ids,
    )  # fmt: skip
    # The first manifest read of each stream finds none yet (a missing key, read back).
    await asyncio.gather(run_simulation(h264), run_simulation(png))
    await first.settle()
    await first.runner.cleanup()

    # A restart: the same stream comes back to a new process, which reads its manifest.
    second = await service()
    again = Simulation(
        url=second.url, participants=1, seconds=2, fps=10, start_relative_s=3.0, **ids
    )
    await run_simulation(again)
    await second.settle()
    await second.runner.cleanup()

    store = S3Store(restricted.bucket, PREFIX, endpoint_url=restricted.endpoint)
    try:
        folder = f"{bot}/{recording}/participants"
        video = await check_stream(
            store, f"{folder}/100/webcam/h264/manifest.json", key_prefix=f"{PREFIX}/"
        )
        assert video.ok, video.problems
        assert len(video.frames) == 40
        frames = await check_png_stream(
            store, f"{folder}/300/webcam/png/manifest.json", key_prefix=f"{PREFIX}/"
        )
        assert frames.ok, frames.problems
        events = await check_events(store, RecordingId(bot, recording), key_prefix=f"{PREFIX}/")
        assert events.ok, events.problems
        keys = await store.list_keys(f"{bot}/{recording}/")
        assert f"{folder}/100/webcam/h264/playlist.m3u8" in keys
        session = orjson.loads(await store.get(f"{bot}/{recording}/session.json") or b"{}")
        streams = {(str(s["participant_id"]), s["format"]) for s in session["streams"]}
        assert streams == {("100", "h264"), ("300", "png")}
        # What a missing manifest costs where S3 answers 403: a listing of that key alone.
        assert await store.get(f"{bot}/{recording}/participants/999/manifest.json") is None
        assert await store._absent(f"{bot}/{recording}/participants/999/manifest.json")
    finally:
        await store.close()


async def test_writes_outside_the_prefix_are_refused(restricted: Restricted, bucket: str) -> None:
    client = restricted.client()
    for key in ("elsewhere/object", "archive-other/object", "object"):
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            client.put_object(Bucket=restricted.bucket, Key=key, Body=b"x")
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
    client.put_object(Bucket=restricted.bucket, Key=f"{PREFIX}/inside", Body=b"x")
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        client.delete_object(Bucket=restricted.bucket, Key=f"{PREFIX}/inside")
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    # Through the service's own store: a typed error naming the refusal.
    store = S3Store(bucket, "elsewhere", endpoint_url=restricted.endpoint, attempts=1)
    try:
        with pytest.raises(StoreError, match="AccessDenied"):
            await store.put("manifest.json", b"{}", "application/json")
    finally:
        await store.close()
