"""checkov over the synthesized templates: no failed check. Each finding that does not
apply is suppressed in the stack, on its resource, with the reason written down
(`skip_checks` in infra/archiver_infra/stack.py); this test keeps that list honest.

checkov pins an old boto3, so it lives in its own environment (`.venv-checkov`, installed
from infra/checkov-requirements.txt), run as a program.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from typing import Any

import pytest

from tests.deploy.test_infra_stack import INFRA, KMS_VARIANT, REPO, synthesize

VARIANTS = {
    "default": {},
    "variant": KMS_VARIANT,
    # The stack's own secrets encrypted with the archive's key.
    "kms-generated-secrets": {"encryption": "kms"},
}
# Every check suppressed in the stack, and the variants whose templates carry it.
EXPECTED_SKIPS = {
    "CKV_AWS_18": {"default", "variant", "kms-generated-secrets"},  # S3 access logs
    "CKV_AWS_21": {"default", "kms-generated-secrets"},  # versioning, unless versioned=true
    "CKV_AWS_91": {"default", "variant", "kms-generated-secrets"},  # ALB access logs
    "CKV_AWS_115": {"default", "kms-generated-secrets"},  # the CDK's VPC custom resource
    "CKV_AWS_116": {"default", "kms-generated-secrets"},
    "CKV_AWS_117": {"default", "kms-generated-secrets"},
    "CKV_AWS_149": {"default"},  # secrets on AWS managed keys with encryption=s3
    "CKV_AWS_158": {"default", "variant", "kms-generated-secrets"},  # log group key
}


def checkov() -> str:
    local = REPO / ".venv-checkov" / "bin" / "checkov"
    found = str(local) if local.exists() else shutil.which("checkov")
    if found is None:
        pytest.fail(
            "checkov not found: python3 -m venv .venv-checkov && "
            ".venv-checkov/bin/pip install -r infra/checkov-requirements.txt"
        )
    return found


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    sys.path.insert(0, str(INFRA))
    try:
        infra = importlib.import_module("archiver_infra")
        templates = {
            name: synthesize(infra, tmp_path_factory.mktemp(f"checkov-{name}"), parameters).path
            for name, parameters in VARIANTS.items()
        }
    finally:
        sys.path.remove(str(INFRA))
    found: dict[str, dict[str, Any]] = {}
    for name, template in templates.items():
        run = subprocess.run(
            [
                checkov(),
                "--file",
                str(template),
                "--framework",
                "cloudformation",
                "--output",
                "json",
                # Offline: no download of Prisma Cloud's guidelines or policies.
                "--skip-download",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert run.returncode in (0, 1), run.stderr
        found[name] = json.loads(run.stdout)
    return found


@pytest.mark.parametrize("name", list(VARIANTS))
def test_checkov_finds_no_failed_check(name: str, reports: dict[str, dict[str, Any]]) -> None:
    report = reports[name]
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for c in report["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 50


def test_every_suppression_is_expected_and_has_a_reason(
    reports: dict[str, dict[str, Any]],
) -> None:
    skipped: dict[str, set[str]] = {}
    for name, report in reports.items():
        for check in report["results"]["skipped_checks"]:
            assert len(check["check_result"].get("suppress_comment", "")) > 40, check
            skipped.setdefault(check["check_id"], set()).add(name)
    assert skipped == EXPECTED_SKIPS


def test_versioning_is_no_suppression_when_versioned(reports: dict[str, dict[str, Any]]) -> None:
    passed = {c["check_id"] for c in reports["variant"]["results"]["passed_checks"]}
    assert "CKV_AWS_21" in passed
