"""The CDK stack in infra/: synthesized once per variant, then checked point by point."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aws_cdk as cdk
import cfnlint.api
import pytest
from aws_cdk.assertions import Match, Template

from archiver.settings import Settings

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
ACCOUNT = "123456789012"
REGION = "eu-west-1"
CERTIFICATE_ARN = f"arn:aws:acm:{REGION}:{ACCOUNT}:certificate/0f6a1b2c-3d4e-5f60-7182-93a4b5c6d7e8"
SECRET_ARN = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:archiver/bot-tokens-AbCdEf"
TOKEN_KEYS_SECRET_ARN = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:archiver/keys-GhIjKl"
VPC_ID = "vpc-0a1b2c3d4e5f60718"
IMPORTED_VPC = {
    "vpcId": VPC_ID,
    "vpcCidrBlock": "10.20.0.0/16",
    "ownerAccountId": ACCOUNT,
    "availabilityZones": [],
    "subnetGroups": [
        {
            "name": name,
            "type": name,
            "subnets": [
                {
                    "subnetId": f"subnet-0{index}{zone_index}a1b2c3d4e5f607",
                    "cidr": f"10.20.{index * 16 + zone_index}.0/24",
                    "availabilityZone": f"{REGION}{zone}",
                    "routeTableId": f"rtb-0{index}{zone_index}a1b2c3d4e5f607",
                }
                for zone_index, zone in enumerate("ab")
            ],
        }
        for index, name in enumerate(["Public", "Private"])
    ],
}
KMS_VARIANT = {
    "encryption": "kms",
    "cpuArchitecture": "arm64",
    "cpu": "2048",
    "memoryMiB": "4096",
    "ephemeralStorageGiB": "50",
    "versioned": "true",
    "expireAfterDays": "400",
    "bucketName": "acme-meeting-archive",
    "archivePrefix": "recall/video",
    "imageUri": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/recall-archiver:1.4.0",
    "staticTokens": "true",
    "authSecretArn": SECRET_ARN,
    "tokenKeysSecretArn": TOKEN_KEYS_SECRET_ARN,
    "vpcId": VPC_ID,
    "logRetentionDays": "90",
    "fallbackBucketName": "acme-meeting-archive-fallback-eu",
    "fallbackPrefix": "recall/fallback",
    "alarmTopicArn": f"arn:aws:sns:{REGION}:{ACCOUNT}:archiver-alarms",
    "viewerOrigins": "https://archiver.acme.example, https://review.acme.example:8443",
}


@dataclass(frozen=True)
class Synthesized:
    """One synthesized stack: its template for assertions and the file cfn-lint reads."""

    template: Template
    resources: dict[str, Any]
    path: Path

    def only(self, resource_type: str) -> dict[str, Any]:
        found = [r for r in self.resources.values() if r["Type"] == resource_type]
        assert len(found) == 1, f"{len(found)} resources of type {resource_type}"
        return found[0]

    def container(self) -> dict[str, Any]:
        definitions = self.only("AWS::ECS::TaskDefinition")["Properties"]["ContainerDefinitions"]
        assert len(definitions) == 1
        return definitions[0]

    def task_role_statements(self) -> list[dict[str, Any]]:
        task_definition = self.only("AWS::ECS::TaskDefinition")["Properties"]
        role_id = task_definition["TaskRoleArn"]["Fn::GetAtt"][0]
        statements: list[dict[str, Any]] = []
        for resource in self.resources.values():
            if resource["Type"] != "AWS::IAM::Policy":
                continue
            if {"Ref": role_id} in resource["Properties"]["Roles"]:
                statements += resource["Properties"]["PolicyDocument"]["Statement"]
        role = self.resources[role_id]["Properties"]
        assert "ManagedPolicyArns" not in role
        assert "Policies" not in role
        return statements


@pytest.fixture(scope="session")
def infra() -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(INFRA))
        yield importlib.import_module("archiver_infra")


def synthesize(infra: ModuleType, outdir: Path, parameters: dict[str, str]) -> Synthesized:
    """The stack as `cdk synth` builds it: cdk.json's feature flags and these parameters."""
    context = json.loads((INFRA / "cdk.json").read_text())["context"]
    # What `cdk synth` would have looked up and cached in cdk.context.json.
    context[f"availability-zones:account={ACCOUNT}:region={REGION}"] = [
        f"{REGION}a",
        f"{REGION}b",
        f"{REGION}c",
    ]
    context[
        f"vpc-provider:account={ACCOUNT}:filter.vpc-id={VPC_ID}:region={REGION}"
        ":returnAsymmetricSubnets=true"
    ] = IMPORTED_VPC
    context.update(certificateArn=CERTIFICATE_ARN, account=ACCOUNT, region=REGION, **parameters)
    app = cdk.App(context=context, outdir=str(outdir))
    config = infra.ArchiverConfig.from_context(app.node)
    stack = infra.ArchiverStack(
        app,
        config.stack_name,
        config=config,
        env=cdk.Environment(account=config.account, region=config.region),
    )
    artifact = app.synth().get_stack_artifact(stack.artifact_id)
    template_json = artifact.template
    return Synthesized(
        template=Template.from_json(template_json),
        resources=template_json["Resources"],
        path=Path(artifact.template_full_path),
    )


@pytest.fixture(scope="session")
def default(infra: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    return synthesize(infra, tmp_path_factory.mktemp("cdk-default"), {})


@pytest.fixture(scope="session")
def variant(infra: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    return synthesize(infra, tmp_path_factory.mktemp("cdk-variant"), KMS_VARIANT)


def environment(container: dict[str, Any]) -> dict[str, Any]:
    return {item["Name"]: item["Value"] for item in container.get("Environment", [])}


def s3_statements(statements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in statements if any(a.startswith("s3:") for a in _listed(s["Action"]))]


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# Load balancer


def test_load_balancer_keeps_long_websockets(default: Synthesized) -> None:
    default.template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::LoadBalancer",
        {
            "Scheme": "internet-facing",
            "LoadBalancerAttributes": Match.array_with(
                [{"Key": "idle_timeout.timeout_seconds", "Value": "4000"}]
            ),
        },
    )


def test_only_an_https_listener_with_the_certificate(default: Synthesized) -> None:
    default.template.resource_count_is("AWS::ElasticLoadBalancingV2::Listener", 1)
    default.template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::Listener",
        {
            "Protocol": "HTTPS",
            "Port": 443,
            "Certificates": [{"CertificateArn": CERTIFICATE_ARN}],
            "SslPolicy": Match.string_like_regexp("TLS13"),
        },
    )


def test_target_group_checks_liveness_and_drains_for_the_deadline(
    default: Synthesized,
) -> None:
    target_group = default.only("AWS::ElasticLoadBalancingV2::TargetGroup")["Properties"]
    # Liveness only: a full or draining task failing this would be replaced, disk and all.
    assert target_group["HealthCheckPath"] == "/healthz"
    assert target_group["TargetType"] == "ip"
    assert target_group["Port"] == 8080
    attributes = {a["Key"]: a["Value"] for a in target_group["TargetGroupAttributes"]}
    drain_deadline = environment(default.container())["ARCHIVER_DRAIN_DEADLINE_S"]
    assert attributes["deregistration_delay.timeout_seconds"] == drain_deadline == "90"


# Task


def test_container_stops_within_the_fargate_maximum_after_the_drain(
    default: Synthesized,
) -> None:
    container = default.container()
    assert container["StopTimeout"] == 120
    assert float(environment(container)["ARCHIVER_DRAIN_DEADLINE_S"]) < container["StopTimeout"]


def test_spool_lives_on_sized_ephemeral_storage(default: Synthesized) -> None:
    task_definition = default.only("AWS::ECS::TaskDefinition")["Properties"]
    assert task_definition["EphemeralStorage"] == {"SizeInGiB": 100}
    container = default.container()
    assert container["ReadonlyRootFilesystem"] is True
    mounts = {m["ContainerPath"]: m["SourceVolume"] for m in container["MountPoints"]}
    spool_dir = environment(container)["ARCHIVER_SPOOL_DIR"]
    assert spool_dir in mounts
    assert "/var/lib/archiver/tmp" in mounts
    volumes = {v["Name"]: v for v in task_definition["Volumes"]}
    # No host and no EFS: a bind mount on the task's ephemeral storage.
    assert volumes[mounts[spool_dir]] == {"Name": mounts[spool_dir]}


def test_default_task_is_x86_64_from_the_repository_dockerfile(default: Synthesized) -> None:
    task_definition = default.only("AWS::ECS::TaskDefinition")["Properties"]
    assert task_definition["RuntimePlatform"]["CpuArchitecture"] == "X86_64"
    assert "container-assets" in json.dumps(default.container()["Image"])


def test_static_tokens_come_from_secrets_manager_when_asked_for(
    infra: ModuleType, tmp_path_factory: pytest.TempPathFactory, variant: Synthesized
) -> None:
    with_static = synthesize(infra, tmp_path_factory.mktemp("cdk-static"), {"staticTokens": "true"})
    container = with_static.container()
    assert "ARCHIVER_AUTH_TOKENS" not in environment(container)
    secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
    secret_id = secrets["ARCHIVER_AUTH_TOKENS"]["Ref"]
    generated = with_static.resources[secret_id]
    assert generated["Type"] == "AWS::SecretsManager::Secret"
    assert "SecretString" not in generated["Properties"]
    assert generated["Properties"]["GenerateSecretString"]["ExcludePunctuation"] is True
    assert secrets["ARCHIVER_TOKEN_KEYS"] != secrets["ARCHIVER_AUTH_TOKENS"]
    imported = {s["Name"]: s["ValueFrom"] for s in variant.container()["Secrets"]}
    assert imported["ARCHIVER_AUTH_TOKENS"] == SECRET_ARN


def test_token_signing_keys_come_from_secrets_manager(
    default: Synthesized, variant: Synthesized
) -> None:
    container = default.container()
    assert "ARCHIVER_TOKEN_KEYS" not in environment(container)
    secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
    generated = default.resources[secrets["ARCHIVER_TOKEN_KEYS"]["Ref"]]
    assert generated["Type"] == "AWS::SecretsManager::Secret"
    generating = generated["Properties"]["GenerateSecretString"]
    # No commas (they separate keys), and at least the 32 characters the service wants.
    assert generating["ExcludePunctuation"] is True
    assert generating["PasswordLength"] >= 32
    imported = {s["Name"]: s["ValueFrom"] for s in variant.container()["Secrets"]}
    assert imported["ARCHIVER_TOKEN_KEYS"] == TOKEN_KEYS_SECRET_ARN


def test_the_stack_deploys_with_signed_tokens_only_by_default(default: Synthesized) -> None:
    signed_only = default
    secrets = {s["Name"] for s in signed_only.container()["Secrets"]}
    assert secrets == {"ARCHIVER_TOKEN_KEYS"}
    (secret,) = [
        r for r in signed_only.resources.values() if r["Type"] == "AWS::SecretsManager::Secret"
    ]
    assert "signing" in secret["Properties"]["Description"]


def test_logs_go_to_a_group_with_retention(default: Synthesized) -> None:
    default.template.has_resource_properties("AWS::Logs::LogGroup", {"RetentionInDays": 30})
    log_configuration = default.container()["LogConfiguration"]
    assert log_configuration["LogDriver"] == "awslogs"
    group = default.only("AWS::Logs::LogGroup")
    assert log_configuration["Options"]["awslogs-group"] == {
        "Ref": next(k for k, v in default.resources.items() if v is group)
    }
    assert environment(default.container())["ARCHIVER_LOG_FORMAT"] == "json"


def test_every_archiver_variable_of_the_task_is_a_setting(default: Synthesized) -> None:
    prefix = (Settings.model_config.get("env_prefix") or "").upper()
    known = {f"{prefix}{name}".upper() for name in Settings.model_fields}
    container = default.container()
    names = set(environment(container)) | {s["Name"] for s in container["Secrets"]}
    unknown = {n for n in names if n.startswith("ARCHIVER_")} - known
    assert not unknown, f"the task sets variables Settings does not read: {sorted(unknown)}"


# Bucket


def test_bucket_is_private_encrypted_and_kept(default: Synthesized) -> None:
    bucket = default.only("AWS::S3::Bucket")
    assert bucket["DeletionPolicy"] == "Retain"
    properties = bucket["Properties"]
    assert properties["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    (rule,) = properties["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    assert "VersioningConfiguration" not in properties


def test_bucket_has_no_cors_rule_without_viewer_origins(default: Synthesized) -> None:
    assert "CorsConfiguration" not in default.only("AWS::S3::Bucket")["Properties"]


def test_viewer_origins_may_get_and_head_media_from_the_bucket(variant: Synthesized) -> None:
    properties = variant.only("AWS::S3::Bucket")["Properties"]
    (rule,) = properties["CorsConfiguration"]["CorsRules"]
    assert sorted(rule["AllowedOrigins"]) == [
        "https://archiver.acme.example",
        "https://review.acme.example:8443",
    ]
    assert sorted(rule["AllowedMethods"]) == ["GET", "HEAD"]
    assert rule["AllowedHeaders"] == ["Range"]
    assert "Content-Range" in rule["ExposedHeaders"]


def test_bucket_policy_refuses_plain_http(default: Synthesized) -> None:
    default.template.has_resource_properties(
        "AWS::S3::BucketPolicy",
        {
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Effect": "Deny",
                                "Action": "s3:*",
                                "Principal": {"AWS": "*"},
                                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                            }
                        )
                    ]
                )
            }
        },
    )


def test_lifecycle_tiers_the_archive_and_cleans_uploads(default: Synthesized) -> None:
    rules = {
        r["Id"]: r
        for r in default.only("AWS::S3::Bucket")["Properties"]["LifecycleConfiguration"]["Rules"]
    }
    tiers = rules["archive-tiers"]
    assert tiers["Prefix"] == "archive/"
    assert tiers["Transitions"] == [
        {"StorageClass": "STANDARD_IA", "TransitionInDays": 30},
        {"StorageClass": "GLACIER_IR", "TransitionInDays": 90},
    ]
    assert "ExpirationInDays" not in tiers
    uploads = rules["abort-incomplete-multipart-uploads"]
    assert uploads["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}


# Task role


def test_task_role_reaches_only_the_archive_prefix(default: Synthesized) -> None:
    statements = default.task_role_statements()
    actions = sorted(a for s in statements for a in _listed(s["Action"]))
    assert actions == ["ecs:UpdateTaskProtection", "s3:GetObject", "s3:ListBucket", "s3:PutObject"]
    for statement in s3_statements(statements):
        assert statement["Effect"] == "Allow"
        assert "s3:*" not in _listed(statement["Action"])
        assert "*" not in _listed(statement["Resource"])
        resources = json.dumps(statement["Resource"])
        if statement["Action"] == "s3:ListBucket":
            assert statement["Condition"] == {"StringLike": {"s3:prefix": ["archive/*"]}}
        else:
            assert resources.endswith('"/archive/*"]]}'), resources


def test_task_role_protects_only_tasks_of_its_cluster(default: Synthesized) -> None:
    (protection,) = [
        s for s in default.task_role_statements() if s["Action"] == "ecs:UpdateTaskProtection"
    ]
    cluster_id = next(k for k, v in default.resources.items() if v["Type"] == "AWS::ECS::Cluster")
    assert protection["Resource"] == {
        "Fn::Join": ["", [f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/", {"Ref": cluster_id}, "/*"]]
    }


def test_task_role_trusts_only_ecs_tasks_of_this_account(default: Synthesized) -> None:
    task_definition = default.only("AWS::ECS::TaskDefinition")["Properties"]
    role = default.resources[task_definition["TaskRoleArn"]["Fn::GetAtt"][0]]["Properties"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert trust["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}


# Scaling


def scaling_policies(synthesized: Synthesized) -> dict[str, dict[str, Any]]:
    """Target-tracking configurations by what they track (a predefined type or a metric)."""
    policies = [
        r["Properties"]["TargetTrackingScalingPolicyConfiguration"]
        for r in synthesized.resources.values()
        if r["Type"] == "AWS::ApplicationAutoScaling::ScalingPolicy"
    ]
    return {
        p["PredefinedMetricSpecification"]["PredefinedMetricType"]
        if "PredefinedMetricSpecification" in p
        else p["CustomizedMetricSpecification"]["MetricName"]: p
        for p in policies
    }


def test_scales_on_streams_per_task_cpu_and_memory_never_on_requests_anyone_can_send(
    default: Synthesized,
) -> None:
    default.template.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalableTarget",
        {"MinCapacity": 2, "MaxCapacity": 10, "ScalableDimension": "ecs:service:DesiredCount"},
    )
    metrics = scaling_policies(default)
    assert metrics.keys() == {
        "StreamsActive",
        "ECSServiceAverageCPUUtilization",
        "ECSServiceAverageMemoryUtilization",
    }
    assert metrics["ECSServiceAverageCPUUtilization"]["TargetValue"] == 60
    assert metrics["ECSServiceAverageMemoryUtilization"]["TargetValue"] == 70


def test_scaling_tracks_the_streams_each_task_logs_against_the_benchmark_capacity(
    default: Synthesized, variant: Synthesized
) -> None:
    streams = scaling_policies(default)["StreamsActive"]
    assert streams["CustomizedMetricSpecification"] == {
        "MetricName": "StreamsActive",
        "Namespace": "RecallArchiver",
        "Dimensions": [{"Name": "Service", "Value": "RecallArchiver"}],
        "Statistic": "Average",
    }
    # 5.3 bots of 16 streams per vCPU at 60% CPU: 1 vCPU by default, 2 in the variant.
    assert streams["TargetValue"] == 85
    assert scaling_policies(variant)["StreamsActive"]["TargetValue"] == 170
    env = environment(default.container())
    assert env["ARCHIVER_CLOUDWATCH_METRICS"] == "true"
    assert env["ARCHIVER_CLOUDWATCH_NAMESPACE"] == "RecallArchiver"
    assert env["ARCHIVER_CLOUDWATCH_SERVICE"] == "RecallArchiver"
    assert float(env["ARCHIVER_CLOUDWATCH_METRICS_INTERVAL_S"]) == 60
    assert env["ARCHIVER_METRICS_PORT"] == "9090"
    # The metrics listener defaults to loopback; a scraper in the VPC needs every address.
    assert env["ARCHIVER_METRICS_HOST"] == "0.0.0.0"


def test_a_streams_target_may_be_given(infra: ModuleType) -> None:
    app = cdk.App(context={"certificateArn": CERTIFICATE_ARN, "targetStreamsPerTask": "30"})
    assert infra.ArchiverConfig.from_context(app.node).streams_per_task == 30


def alarms(synthesized: Synthesized) -> dict[str, dict[str, Any]]:
    return {
        r["Properties"]["MetricName"]: r["Properties"]
        for r in synthesized.resources.values()
        if r["Type"] == "AWS::CloudWatch::Alarm"
    }


def test_alarms_on_a_growing_spool_an_unreachable_store_and_dropped_frames(
    default: Synthesized,
) -> None:
    found = alarms(default)
    assert found.keys() == {"SpoolPendingBytes", "StoreUnreachable", "FramesDropped"}
    for alarm in found.values():
        assert alarm["Namespace"] == "RecallArchiver"
        assert alarm["Dimensions"] == [{"Name": "Service", "Value": "RecallArchiver"}]
        assert alarm["TreatMissingData"] == "notBreaching"
        assert "AlarmActions" not in alarm
    spool = found["SpoolPendingBytes"]
    assert (spool["Statistic"], spool["Threshold"], spool["EvaluationPeriods"]) == (
        "Maximum",
        1024**3,
        5,
    )
    assert spool["ComparisonOperator"] == "GreaterThanThreshold"
    store = found["StoreUnreachable"]
    assert (store["Statistic"], store["Threshold"], store["Period"]) == ("Maximum", 1, 60)
    assert store["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    dropped = found["FramesDropped"]
    assert (dropped["Statistic"], dropped["Threshold"], dropped["Period"]) == ("Sum", 1, 300)


def test_alarms_notify_the_given_topic(variant: Synthesized) -> None:
    topic = f"arn:aws:sns:{REGION}:{ACCOUNT}:archiver-alarms"
    for alarm in alarms(variant).values():
        assert alarm["AlarmActions"] == [topic]
        assert alarm["OKActions"] == [topic]


def test_service_replaces_tasks_before_stopping_old_ones(default: Synthesized) -> None:
    service = default.only("AWS::ECS::Service")["Properties"]
    assert service["DeploymentConfiguration"]["MinimumHealthyPercent"] == 100
    assert service["DeploymentConfiguration"]["DeploymentCircuitBreaker"]["Rollback"] is True
    assert service["NetworkConfiguration"]["AwsvpcConfiguration"]["AssignPublicIp"] == "DISABLED"


# The KMS / ARM64 / imported-resources variant


def test_kms_variant_encrypts_with_its_own_rotated_key(variant: Synthesized) -> None:
    key_id, key = next((k, v) for k, v in variant.resources.items() if v["Type"] == "AWS::KMS::Key")
    assert key["Properties"]["EnableKeyRotation"] is True
    bucket = variant.only("AWS::S3::Bucket")["Properties"]
    (rule,) = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["BucketKeyEnabled"] is True
    assert rule["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms",
        "KMSMasterKeyID": {"Fn::GetAtt": [key_id, "Arn"]},
    }
    (use_key,) = [
        s for s in variant.task_role_statements() if "kms:Decrypt" in _listed(s["Action"])
    ]
    assert sorted(use_key["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert use_key["Resource"] == {"Fn::GetAtt": [key_id, "Arn"]}


def test_no_kms_permission_without_kms(default: Synthesized) -> None:
    actions = [a for s in default.task_role_statements() for a in _listed(s["Action"])]
    assert not [a for a in actions if a.startswith("kms:")]
    default.template.resource_count_is("AWS::KMS::Key", 0)


def test_arm64_variant_runs_on_graviton_with_its_size(variant: Synthesized) -> None:
    task_definition = variant.only("AWS::ECS::TaskDefinition")["Properties"]
    assert task_definition["RuntimePlatform"] == {
        "CpuArchitecture": "ARM64",
        "OperatingSystemFamily": "LINUX",
    }
    assert (task_definition["Cpu"], task_definition["Memory"]) == ("2048", "4096")
    assert task_definition["EphemeralStorage"] == {"SizeInGiB": 50}


def test_variant_runs_the_given_ecr_image_and_may_pull_it(variant: Synthesized) -> None:
    image = json.dumps(variant.container()["Image"])
    assert "recall-archiver:1.4.0" in image
    execution_statements = [
        s
        for r in variant.resources.values()
        if r["Type"] == "AWS::IAM::Policy"
        for s in r["Properties"]["PolicyDocument"]["Statement"]
    ]
    pulls = [s for s in execution_statements if "ecr:BatchGetImage" in _listed(s["Action"])]
    assert pulls
    assert pulls[0]["Resource"] == {
        "Fn::Join": [
            "",
            [
                "arn:",
                {"Ref": "AWS::Partition"},
                f":ecr:{REGION}:{ACCOUNT}:repository/recall-archiver",
            ],
        ]
    }


def test_variant_versions_expires_and_uses_its_prefix(variant: Synthesized) -> None:
    bucket = variant.only("AWS::S3::Bucket")["Properties"]
    assert bucket["BucketName"] == "acme-meeting-archive"
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    (tiers,) = [r for r in bucket["LifecycleConfiguration"]["Rules"] if r["Id"] == "archive-tiers"]
    assert tiers["Prefix"] == "recall/video/"
    assert tiers["ExpirationInDays"] == 400
    assert tiers["NoncurrentVersionExpiration"] == {"NoncurrentDays": 400}
    assert environment(variant.container())["ARCHIVER_STORE"] == {
        "Fn::Join": [
            "",
            [
                "s3://",
                {
                    "Ref": next(
                        k for k, v in variant.resources.items() if v["Type"] == "AWS::S3::Bucket"
                    )
                },
                "/recall/video",
            ],
        ]
    }
    listing = [s for s in variant.task_role_statements() if s["Action"] == "s3:ListBucket"]
    assert listing[0]["Condition"] == {"StringLike": {"s3:prefix": ["recall/video/*"]}}


def test_variant_imports_the_vpc_and_secret(variant: Synthesized) -> None:
    variant.template.resource_count_is("AWS::EC2::VPC", 0)
    variant.template.resource_count_is("AWS::SecretsManager::Secret", 0)
    variant.template.resource_count_is("AWS::Logs::LogGroup", 1)
    variant.template.has_resource_properties("AWS::Logs::LogGroup", {"RetentionInDays": 90})


# Whole templates


@pytest.mark.parametrize("name", ["default", "variant"])
def test_cfn_lint_finds_no_errors(name: str, request: pytest.FixtureRequest) -> None:
    synthesized: Synthesized = request.getfixturevalue(name)
    matches = cfnlint.api.lint_file(
        synthesized.path, config=cfnlint.api.ManualArgs(regions=[REGION])
    )
    errors = [f"{m.rule.id} {m.message} ({m.path})" for m in matches if m.rule.severity == "error"]
    assert not errors


@pytest.mark.parametrize(
    ("parameters", "complaint"),
    [
        ({"cpu": "1024", "memoryMiB": "512"}, "task size"),
        ({"cpuArchitecture": "sparc"}, "cpuArchitecture"),
        ({"encryption": "sse-c"}, "encryption"),
        ({"ephemeralStorageGiB": "500"}, "ephemeralStorageGiB"),
        ({"minCount": "3", "desiredCount": "2"}, "minCount"),
        ({"archivePrefix": "/leading-slash"}, "archivePrefix"),
        ({"infrequentAccessAfterDays": "10"}, "Standard-IA"),
        ({"expireAfterDays": "60"}, "expireAfterDays"),
        ({"versioned": "maybe"}, "versioned"),
        ({"desiredCount": "two"}, "desiredCount"),
        ({"targetStreamsPerTask": "0"}, "targetStreamsPerTask"),
        ({"spoolAlarmMinutes": "0"}, "spoolAlarmMinutes"),
        ({"droppedFramesAlarm": "0"}, "droppedFramesAlarm"),
        ({"viewerOrigins": "https://ok.example, archiver.example.com"}, "viewerOrigins"),
        ({"viewerOrigins": "https://archiver.example.com/recordings"}, "viewerOrigins"),
    ],
)
def test_refuses_parameters_that_would_fail_at_deploy(
    infra: ModuleType, parameters: dict[str, str], complaint: str
) -> None:
    app = cdk.App(context={"certificateArn": CERTIFICATE_ARN, **parameters})
    with pytest.raises(infra.ConfigError, match=complaint):
        infra.ArchiverConfig.from_context(app.node)


def test_certificate_is_required(infra: ModuleType) -> None:
    with pytest.raises(infra.ConfigError, match="certificateArn"):
        infra.ArchiverConfig.from_context(cdk.App().node)


def test_no_fallback_permission_without_a_fallback(default: Synthesized) -> None:
    assert "ARCHIVER_FALLBACK_STORE" not in environment(default.container())
    assert "fallback" not in json.dumps(default.task_role_statements()).lower()


def test_fallback_is_configured_and_reachable_in_its_prefix_only(variant: Synthesized) -> None:
    store = environment(variant.container())["ARCHIVER_FALLBACK_STORE"]
    assert store == "s3://acme-meeting-archive-fallback-eu/recall/fallback"
    statements = [
        s
        for s in variant.task_role_statements()
        if "acme-meeting-archive-fallback-eu" in json.dumps(s["Resource"])
    ]
    assert sorted(a for s in statements for a in _listed(s["Action"])) == [
        "s3:DeleteObject",
        "s3:GetObject",
        "s3:ListBucket",
        "s3:PutObject",
    ]
    for statement in statements:
        resources = json.dumps(statement["Resource"])
        if statement["Action"] == "s3:ListBucket":
            assert statement["Condition"] == {"StringLike": {"s3:prefix": ["recall/fallback/*"]}}
            assert resources.rstrip('"]}').endswith("acme-meeting-archive-fallback-eu"), resources
        else:
            tail = "acme-meeting-archive-fallback-eu/recall/fallback/*"
            assert resources.rstrip('"]}').endswith(tail), resources
    # Delete reaches the fallback prefix only, never the archive.
    archive = [
        s
        for s in variant.task_role_statements()
        if "s3:DeleteObject" in _listed(s["Action"]) and "fallback" not in json.dumps(s["Resource"])
    ]
    assert archive == []
