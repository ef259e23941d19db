"""The archiver on ECS Fargate behind an HTTPS load balancer, archiving into its own bucket."""

from __future__ import annotations

import re
from typing import Any

from aws_cdk import (
    Aws,
    CfnOutput,
    CfnResource,
    Duration,
    RemovalPolicy,
    Size,
    Stack,
)
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from aws_cdk.aws_ecr_assets import Platform
from constructs import Construct, IConstruct

from archiver_infra.config import ArchiverConfig, ConfigError

CONTAINER_NAME = "archiver"
CONTAINER_PORT = 8080
# Fargate's maximum: the time between SIGTERM and SIGKILL.
STOP_TIMEOUT_S = 120
# The service's own drain (flush streams, write final manifests, empty the spool) must end
# before SIGKILL; the load balancer keeps draining connections for as long.
DRAIN_DEADLINE_S = 90
# The ALB maximum. A camera-off participant sends nothing for long stretches; the
# service's websocket pings keep the connection alive, this only bounds true silence.
ALB_IDLE_TIMEOUT_S = 4000
# Prometheus scrapes every task here (inside the VPC only: the load balancer forwards 8080).
METRICS_PORT = 9090
# The service logs its key figures in CloudWatch's embedded metric format every minute;
# CloudWatch Logs makes them metrics in this namespace, with the stack's name as `Service`.
METRICS_NAMESPACE = "RecallArchiver"
METRICS_INTERVAL = Duration.minutes(1)
SPOOL_DIR = "/var/lib/archiver/spool"
TMP_DIR = "/var/lib/archiver/tmp"

_LOG_RETENTION = {
    1: logs.RetentionDays.ONE_DAY,
    3: logs.RetentionDays.THREE_DAYS,
    5: logs.RetentionDays.FIVE_DAYS,
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    60: logs.RetentionDays.TWO_MONTHS,
    90: logs.RetentionDays.THREE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    731: logs.RetentionDays.TWO_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
}
_ECR_IMAGE = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
    r"(?P<repository>[^:@]+)(?::(?P<tag>[^@]+)|@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


class ArchiverStack(Stack):
    """Everything one deployment of the archiver needs, parameterised by `ArchiverConfig`."""

    def __init__(
        self, scope: Construct, construct_id: str, *, config: ArchiverConfig, **kwargs: Any
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        if config.log_retention_days not in _LOG_RETENTION:
            raise ConfigError(f"logRetentionDays must be one of {sorted(_LOG_RETENTION)}")
        self.config = config

        vpc = self._vpc()
        key = self._archive_key() if config.encryption == "kms" else None
        bucket = self._bucket(key)
        auth_tokens = self._auth_tokens(key) if config.static_tokens else None
        token_keys = self._token_keys(key)
        log_group = logs.LogGroup(self, "Logs", retention=_LOG_RETENTION[config.log_retention_days])
        skip_checks(
            log_group,
            CKV_AWS_158="CloudWatch Logs encrypts the log data at rest with its own keys; the "
            "service never logs tokens, keys or media (it redacts them), so a customer "
            "managed key would add a key policy for the logs service and no protection.",
        )
        cluster = ecs.Cluster(
            self, "Cluster", vpc=vpc, container_insights_v2=ecs.ContainerInsights.ENABLED
        )
        task_role = self._task_role(cluster, bucket, key)
        task_definition = self._task_definition(
            task_role,
            bucket,
            {
                "ARCHIVER_TOKEN_KEYS": token_keys,
                **({"ARCHIVER_AUTH_TOKENS": auth_tokens} if auth_tokens is not None else {}),
            },
            log_group,
        )

        service = ecs.FargateService(
            self,
            "Service",
            cluster=cluster,
            task_definition=task_definition,
            desired_count=config.desired_count,
            # Start new tasks before stopping old ones: a bot's reconnect needs somewhere to go.
            min_healthy_percent=100,
            max_healthy_percent=200,
            circuit_breaker=ecs.DeploymentCircuitBreaker(rollback=True),
            health_check_grace_period=Duration.seconds(60),
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            assign_public_ip=False,
            propagate_tags=ecs.PropagatedTagSource.SERVICE,
        )
        target_group = self._load_balancer(vpc, service)
        self._auto_scaling(service, target_group)
        self._alarms()

        CfnOutput(self, "BucketName", value=bucket.bucket_name)
        CfnOutput(self, "ArchiveStore", value=self._store_url(bucket))
        if auth_tokens is not None:
            CfnOutput(self, "AuthTokensSecretArn", value=auth_tokens.secret_arn)
        CfnOutput(self, "TokenKeysSecretArn", value=token_keys.secret_arn)
        CfnOutput(self, "LogGroupName", value=log_group.log_group_name)
        CfnOutput(self, "ClusterName", value=cluster.cluster_name)
        CfnOutput(self, "ServiceName", value=service.service_name)

    def _vpc(self) -> ec2.IVpc:
        if self.config.vpc_id:
            return ec2.Vpc.from_lookup(self, "Vpc", vpc_id=self.config.vpc_id)
        vpc = ec2.Vpc(
            self,
            "Vpc",
            max_azs=self.config.max_azs,
            nat_gateways=self.config.max_azs,
            # Video goes to S3 through the gateway endpoint, not through paid NAT traffic.
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)
            },
        )
        # The CDK's own function that strips the default security group's rules, once, when
        # CloudFormation creates the VPC.
        provider = self.node.try_find_child("Custom::VpcRestrictDefaultSGCustomResourceProvider")
        if provider is not None:
            reason = (
                "The CDK's deploy-time function that removes the default security group's "
                "rules: invoked only by CloudFormation, which reports its failure (no dead "
                "letter queue to read), once per deployment (no concurrency to limit), and it "
                "calls only the EC2 API (nothing in the VPC to reach)."
            )
            skip_checks(
                provider.node.find_child("Handler"),
                CKV_AWS_115=reason,
                CKV_AWS_116=reason,
                CKV_AWS_117=reason,
            )
        return vpc

    def _archive_key(self) -> kms.Key:
        return kms.Key(
            self,
            "ArchiveKey",
            description="Encrypts the meeting video archive",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )

    def _bucket(self, key: kms.IKey | None) -> s3.Bucket:
        config = self.config
        tiers = s3.LifecycleRule(
            id="archive-tiers",
            prefix=f"{config.archive_prefix}/",
            transitions=[
                s3.Transition(
                    storage_class=s3.StorageClass.INFREQUENT_ACCESS,
                    transition_after=Duration.days(config.infrequent_access_after_days),
                ),
                s3.Transition(
                    storage_class=s3.StorageClass.GLACIER_INSTANT_RETRIEVAL,
                    transition_after=Duration.days(config.glacier_ir_after_days),
                ),
            ],
            expiration=_days(config.expire_after_days),
            noncurrent_version_expiration=(
                _days(config.expire_after_days) if config.versioned else None
            ),
        )
        unfinished_uploads = s3.LifecycleRule(
            id="abort-incomplete-multipart-uploads",
            abort_incomplete_multipart_upload_after=Duration.days(7),
        )
        bucket = s3.Bucket(
            self,
            "Archive",
            bucket_name=config.bucket_name,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            encryption=s3.BucketEncryption.KMS if key else s3.BucketEncryption.S3_MANAGED,
            encryption_key=key,
            # One data key per bucket rather than per object: far fewer KMS calls.
            bucket_key_enabled=key is not None,
            enforce_ssl=True,
            minimum_tls_version=1.2,
            versioned=config.versioned,
            lifecycle_rules=[tiers, unfinished_uploads],
            cors=self._viewer_cors(),
            removal_policy=RemovalPolicy.RETAIN,
        )
        skip_checks(
            bucket,
            CKV_AWS_18="Server access logs would record the viewer's presigned URLs, whose "
            "query strings are bearer credentials until they expire; for an audit of object "
            "access turn on CloudTrail data events for this bucket instead.",
        )
        if not config.versioned:
            skip_checks(
                bucket,
                CKV_AWS_21="Media objects are written once (conditional writes, never "
                "overwritten) and documents are replaced only with If-Match; versioning would "
                "keep every manifest revision. Opt in with -c versioned=true.",
            )
        return bucket

    def _viewer_cors(self) -> list[s3.CorsRule] | None:
        """The viewer's browser fetches media from the bucket by presigned URLs: its
        origin may GET (ranges too) and HEAD, nothing else, and no other origin may."""
        origins = self.config.viewer_origin_list
        if not origins:
            return None
        return [
            s3.CorsRule(
                allowed_origins=origins,
                allowed_methods=[s3.HttpMethods.GET, s3.HttpMethods.HEAD],
                allowed_headers=["Range"],
                exposed_headers=["Content-Length", "Content-Range", "ETag"],
                max_age=3600,
            )
        ]

    def _auth_tokens(self, key: kms.IKey | None) -> secretsmanager.ISecret:
        if self.config.auth_secret_arn:
            return secretsmanager.Secret.from_secret_complete_arn(
                self, "AuthTokens", self.config.auth_secret_arn
            )
        secret = secretsmanager.Secret(
            self,
            "AuthTokens",
            encryption_key=key,
            description="Bot tokens the archiver accepts, comma-separated (two during rotation)",
            # URL-safe: the token travels in the websocket URL's query string.
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=48, exclude_punctuation=True, include_space=False
            ),
        )
        return _with_managed_key_noted(secret)

    def _token_keys(self, key: kms.IKey | None) -> secretsmanager.ISecret:
        """Keys that sign short-lived bot tokens (`archiver token create`): the first signs,
        every one verifies."""
        if self.config.token_keys_secret_arn:
            return secretsmanager.Secret.from_secret_complete_arn(
                self, "TokenKeys", self.config.token_keys_secret_arn
            )
        secret = secretsmanager.Secret(
            self,
            "TokenKeys",
            encryption_key=key,
            description="Keys signing the archiver's short-lived bot tokens, comma-separated, "
            "the signing key first (two during rotation)",
            # No commas: they separate keys.
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=64, exclude_punctuation=True, include_space=False
            ),
        )
        return _with_managed_key_noted(secret)

    def _task_role(
        self, cluster: ecs.Cluster, bucket: s3.IBucket, key: kms.IKey | None
    ) -> iam.Role:
        prefix = self.config.archive_prefix
        role = iam.Role(
            self,
            "TaskRole",
            description="What the archiver itself may do: write and read back its archive prefix",
            assumed_by=iam.ServicePrincipal(
                "ecs-tasks.amazonaws.com",
                conditions={
                    "StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID},
                    "ArnLike": {
                        "aws:SourceArn": f"arn:{Aws.PARTITION}:ecs:{Aws.REGION}:{Aws.ACCOUNT_ID}:*"
                    },
                },
            ),
        )
        archive_objects = bucket.arn_for_objects(f"{prefix}/*")
        role.add_to_policy(
            iam.PolicyStatement(
                sid="WriteArchive", actions=["s3:PutObject"], resources=[archive_objects]
            )
        )
        # A stream resumed after a reconnect reads back its manifest.
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadArchive", actions=["s3:GetObject"], resources=[archive_objects]
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ListArchivePrefix",
                actions=["s3:ListBucket"],
                resources=[bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{prefix}/*"]}},
            )
        )
        if key is not None:
            role.add_to_policy(
                iam.PolicyStatement(
                    sid="UseArchiveKey",
                    actions=["kms:GenerateDataKey", "kms:Decrypt"],
                    resources=[key.key_arn],
                )
            )
        if self.config.fallback_bucket_name is not None:
            self._allow_fallback(role)
        # Scale-in protection while bots are connected: the tasks of this cluster only.
        cluster.grant_task_protection(role)
        return role

    def _allow_fallback(self, role: iam.Role) -> None:
        """Write, read back, list and delete in the fallback bucket's prefix, nothing else:
        the spool empties there and the reconciler moves it back."""
        config = self.config
        fallback = s3.Bucket.from_bucket_name(self, "FallbackBucket", config.fallback_bucket_name)
        prefix = config.fallback_prefix
        role.add_to_policy(
            iam.PolicyStatement(
                sid="UseFallbackPrefix",
                actions=["s3:PutObject", "s3:GetObject", "s3:DeleteObject"],
                resources=[fallback.arn_for_objects(f"{prefix}/*")],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ListFallbackPrefix",
                actions=["s3:ListBucket"],
                resources=[fallback.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{prefix}/*"]}},
            )
        )

    def _task_definition(
        self,
        task_role: iam.IRole,
        bucket: s3.IBucket,
        secrets: dict[str, secretsmanager.ISecret],
        log_group: logs.ILogGroup,
    ) -> ecs.FargateTaskDefinition:
        config = self.config
        arm64 = config.cpu_architecture == "arm64"
        task_definition = ecs.FargateTaskDefinition(
            self,
            "Task",
            cpu=config.cpu,
            memory_limit_mib=config.memory_mib,
            ephemeral_storage_gib=config.ephemeral_storage_gib,
            runtime_platform=ecs.RuntimePlatform(
                operating_system_family=ecs.OperatingSystemFamily.LINUX,
                cpu_architecture=(
                    ecs.CpuArchitecture.ARM64 if arm64 else ecs.CpuArchitecture.X86_64
                ),
            ),
            task_role=task_role,
            # Bind mounts live on the task's ephemeral storage; the image declares both
            # paths as volumes, so Fargate copies their ownership for the non-root user.
            volumes=[ecs.Volume(name="spool"), ecs.Volume(name="tmp")],
        )
        container = task_definition.add_container(
            CONTAINER_NAME,
            container_name=CONTAINER_NAME,
            image=self._image(arm64),
            essential=True,
            port_mappings=[
                ecs.PortMapping(container_port=CONTAINER_PORT, name="http"),
                ecs.PortMapping(container_port=METRICS_PORT, name="metrics"),
            ],
            environment={
                "ARCHIVER_STORE": self._store_url(bucket),
                "ARCHIVER_SPOOL_DIR": SPOOL_DIR,
                "ARCHIVER_DRAIN_DEADLINE_S": str(DRAIN_DEADLINE_S),
                "ARCHIVER_LOG_FORMAT": "json",
                "ARCHIVER_METRICS_PORT": str(METRICS_PORT),
                # Every address of the task: the scraper reaches it over the VPC.
                "ARCHIVER_METRICS_HOST": "0.0.0.0",  # noqa: S104
                "ARCHIVER_CLOUDWATCH_METRICS": "true",
                "ARCHIVER_CLOUDWATCH_NAMESPACE": METRICS_NAMESPACE,
                "ARCHIVER_CLOUDWATCH_SERVICE": config.stack_name,
                "ARCHIVER_CLOUDWATCH_METRICS_INTERVAL_S": str(METRICS_INTERVAL.to_seconds()),
                **(
                    {
                        "ARCHIVER_FALLBACK_STORE": (
                            f"s3://{config.fallback_bucket_name}/{config.fallback_prefix}"
                        )
                    }
                    if config.fallback_bucket_name is not None
                    else {}
                ),
            },
            secrets={
                name: ecs.Secret.from_secrets_manager(secret) for name, secret in secrets.items()
            },
            logging=ecs.LogDrivers.aws_logs(
                stream_prefix=CONTAINER_NAME,
                log_group=log_group,
                # Never let a slow log pipe stall the receive loop.
                mode=ecs.AwsLogDriverMode.NON_BLOCKING,
                max_buffer_size=Size.mebibytes(25),
            ),
            stop_timeout=Duration.seconds(STOP_TIMEOUT_S),
            readonly_root_filesystem=True,
        )
        container.add_mount_points(
            ecs.MountPoint(container_path=SPOOL_DIR, source_volume="spool", read_only=False),
            ecs.MountPoint(container_path=TMP_DIR, source_volume="tmp", read_only=False),
        )
        return task_definition

    def _image(self, arm64: bool) -> ecs.ContainerImage:
        uri = self.config.image_uri
        if uri is None:
            return ecs.ContainerImage.from_asset(
                self.config.image_directory,
                platform=Platform.LINUX_ARM64 if arm64 else Platform.LINUX_AMD64,
            )
        ecr_image = _ECR_IMAGE.match(uri)
        if ecr_image is None:
            return ecs.ContainerImage.from_registry(uri)
        # Through the repository, so that the execution role is allowed to pull it.
        repository = ecr.Repository.from_repository_attributes(
            self,
            "ImageRepository",
            repository_name=ecr_image["repository"],
            repository_arn=(
                f"arn:{Aws.PARTITION}:ecr:{ecr_image['region']}:{ecr_image['account']}"
                f":repository/{ecr_image['repository']}"
            ),
        )
        return ecs.ContainerImage.from_ecr_repository(
            repository, ecr_image["digest"] or ecr_image["tag"] or "latest"
        )

    def _load_balancer(
        self, vpc: ec2.IVpc, service: ecs.FargateService
    ) -> elbv2.ApplicationTargetGroup:
        load_balancer = elbv2.ApplicationLoadBalancer(
            self,
            "LoadBalancer",
            vpc=vpc,
            internet_facing=True,
            idle_timeout=Duration.seconds(ALB_IDLE_TIMEOUT_S),
            drop_invalid_header_fields=True,
        )
        skip_checks(
            load_balancer,
            CKV_AWS_91="ALB access logs record every request's full URL, and a bot's token "
            "travels in the query string (a Recall bot can send no header). The service "
            "logs each request without its query string (CloudWatch, the stack's log "
            "group), and the load balancer's metrics count requests and refusals; if ALB "
            "logs are needed anyway, use short-lived signed tokens only, so that what they "
            "record expires, and keep the log bucket as private as the secret.",
        )
        target_group = elbv2.ApplicationTargetGroup(
            self,
            "Targets",
            vpc=vpc,
            port=CONTAINER_PORT,
            protocol=elbv2.ApplicationProtocol.HTTP,
            target_type=elbv2.TargetType.IP,
            targets=[
                service.load_balancer_target(
                    container_name=CONTAINER_NAME, container_port=CONTAINER_PORT
                )
            ],
            # A draining task keeps its bots this long, then they reconnect elsewhere.
            deregistration_delay=Duration.seconds(DRAIN_DEADLINE_S),
            health_check=elbv2.HealthCheck(
                # Liveness, never admission: a full or draining task that failed this check
                # would be replaced, and its spool lost with its disk. Admission is the
                # service's own: it refuses the websocket upgrade with 503.
                path="/healthz",
                healthy_http_codes="200",
                interval=Duration.seconds(10),
                timeout=Duration.seconds(5),
                healthy_threshold_count=2,
                unhealthy_threshold_count=3,
            ),
        )
        load_balancer.add_listener(
            "Https",
            port=443,
            protocol=elbv2.ApplicationProtocol.HTTPS,
            certificates=[elbv2.ListenerCertificate.from_arn(self.config.certificate_arn)],
            ssl_policy=elbv2.SslPolicy.RECOMMENDED_TLS,
            default_target_groups=[target_group],
            open=True,
        )
        CfnOutput(self, "LoadBalancerDnsName", value=load_balancer.load_balancer_dns_name)
        return target_group

    def _auto_scaling(
        self, service: ecs.FargateService, target_group: elbv2.ApplicationTargetGroup
    ) -> None:
        scaling = service.auto_scale_task_count(
            min_capacity=self.config.min_count, max_capacity=self.config.max_count
        )
        # What loads a task: the streams it holds (long websockets, not requests). Each task
        # logs its own count every minute, so the average over the samples is per task.
        scaling.scale_to_track_custom_metric(
            "Streams",
            metric=self._metric("StreamsActive", "Average"),
            target_value=self.config.streams_per_task,
            scale_out_cooldown=Duration.minutes(1),
            scale_in_cooldown=Duration.minutes(10),
        )
        # CPU and memory stay as safety nets for load the stream count misses (larger video,
        # PNG, bursts of events). ECS scales out when any policy asks and in only when all
        # agree. Scale-in only takes tasks without bots: the service protects the others.
        scaling.scale_on_cpu_utilization(
            "Cpu",
            target_utilization_percent=self.config.target_cpu_percent,
            scale_out_cooldown=Duration.minutes(1),
            scale_in_cooldown=Duration.minutes(10),
        )
        # Not on the load balancer's request count: it counts refused and anonymous requests
        # too, so anyone could scale the service out. Memory follows the streams a task holds.
        scaling.scale_on_memory_utilization(
            "Memory",
            target_utilization_percent=self.config.target_memory_percent,
            scale_out_cooldown=Duration.minutes(1),
            scale_in_cooldown=Duration.minutes(10),
        )

    def _metric(
        self, name: str, statistic: str, period: Duration = METRICS_INTERVAL
    ) -> cloudwatch.Metric:
        return cloudwatch.Metric(
            namespace=METRICS_NAMESPACE,
            metric_name=name,
            dimensions_map={"Service": self.config.stack_name},
            statistic=statistic,
            period=period,
        )

    def _alarms(self) -> None:
        """A spool that keeps growing, a store that cannot be reached, frames dropped; each
        notifies `alarmTopicArn` when one is given."""
        config = self.config
        alarms = [
            cloudwatch.Alarm(
                self,
                "SpoolGrowing",
                alarm_description="A task's spool holds more than it should for minutes: "
                "uploads do not keep up, or the store refuses them (see StoreUnreachable).",
                metric=self._metric("SpoolPendingBytes", "Maximum"),
                threshold=config.spool_alarm_bytes,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                evaluation_periods=config.spool_alarm_minutes,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            cloudwatch.Alarm(
                self,
                "StoreUnreachable",
                alarm_description="Uploads to the archive bucket fail: what bots send waits "
                "in the spools (and goes to the fallback bucket, if there is one).",
                metric=self._metric("StoreUnreachable", "Maximum"),
                threshold=1,
                comparison_operator=(
                    cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
                ),
                evaluation_periods=2,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            cloudwatch.Alarm(
                self,
                "FramesDropped",
                alarm_description="Frames were not archived: the logs' frame_dropped and "
                "message_refused lines say why (bad input, a backlog, a failure of ours).",
                metric=self._metric("FramesDropped", "Sum", Duration.minutes(5)),
                threshold=config.dropped_frames_alarm,
                comparison_operator=(
                    cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
                ),
                evaluation_periods=1,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
        ]
        if config.alarm_topic_arn is not None:
            topic = sns.Topic.from_topic_arn(self, "AlarmTopic", config.alarm_topic_arn)
            for alarm in alarms:
                alarm.add_alarm_action(cloudwatch_actions.SnsAction(topic))
                alarm.add_ok_action(cloudwatch_actions.SnsAction(topic))

    def _store_url(self, bucket: s3.IBucket) -> str:
        return f"s3://{bucket.bucket_name}/{self.config.archive_prefix}"


def skip_checks(construct: IConstruct, **reasons: str) -> None:
    """Tell checkov why a check does not apply to this resource (its CloudFormation
    metadata, read by checkov; `tests/deploy/test_checkov.py` lists them)."""
    resource = construct.node.default_child or construct
    assert isinstance(resource, CfnResource), construct.node.path
    metadata = resource.get_metadata("checkov") or {"skip": []}
    metadata["skip"] += [{"id": check, "comment": why} for check, why in reasons.items()]
    resource.add_metadata("checkov", metadata)


def _with_managed_key_noted(secret: secretsmanager.Secret) -> secretsmanager.Secret:
    """A secret the stack generates without the archive's key: say why for checkov."""
    if secret.encryption_key is None:
        skip_checks(
            secret,
            CKV_AWS_149="With encryption=s3 the deployment uses AWS managed keys throughout: "
            "this secret is encrypted with aws/secretsmanager. With encryption=kms it uses "
            "the archive's customer managed key.",
        )
    return secret


def _days(days: int | None) -> Duration | None:
    return Duration.days(days) if days is not None else None
