#!/usr/bin/env python3
"""CDK app: `npx cdk deploy -c certificateArn=...`; every parameter is in ArchiverConfig."""

from __future__ import annotations

import aws_cdk as cdk
from archiver_infra import ArchiverConfig, ArchiverStack

app = cdk.App()
config = ArchiverConfig.from_context(app.node)
ArchiverStack(
    app,
    config.stack_name,
    config=config,
    env=cdk.Environment(account=config.account, region=config.region),
    description="Archives Recall.ai bots' per-participant video into S3",
)
app.synth()
