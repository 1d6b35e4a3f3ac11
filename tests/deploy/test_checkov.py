"""checkov's Kubernetes and Dockerfile policies pass on the rendered chart (every scenario, both tenants) and on the
Dockerfiles, in one checkov run, with only the skips listed in checkov-skips.yaml.

checkov cannot share the project's virtualenv (it pins packaging<24, pytest needs >=24), so it runs from its own:
``tests/deploy/install-tools.sh`` creates ``.venv-checkov``; ``ALTAN_CHECKOV`` may point at another checkov binary.
A missing checkov fails these tests: a policy check that did not run must not look like one that passed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .manifests import REPO, RenderCache

SKIPS_FILE = Path(__file__).with_name("checkov-skips.yaml")
DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("*.Dockerfile"))


def checkov_binary() -> str:
    candidates = [
        os.environ.get("ALTAN_CHECKOV"),
        str(REPO / ".venv-checkov" / "bin" / "checkov"),
        shutil.which("checkov"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "checkov not found: run `bash tests/deploy/install-tools.sh` (creates .venv-checkov) or set ALTAN_CHECKOV"
    )


def skips() -> list[dict[str, str]]:
    return yaml.safe_load(SKIPS_FILE.read_text())


@pytest.fixture(scope="session")
def checkov_reports(renders: RenderCache, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One checkov run over every rendering and Dockerfile; its JSON reports by framework, and what it was given."""
    workdir = tmp_path_factory.mktemp("checkov")
    given = []
    for render in renders.all():
        path = workdir / f"{render.scenario}--{render.namespace}.yaml"
        path.write_text(render.as_yaml())
        given.append(path.name)
    for dockerfile in DOCKERFILES:
        shutil.copy(dockerfile, workdir / dockerfile.name)
        given.append(dockerfile.name)
    command = [
        checkov_binary(),
        "--directory",
        str(workdir),
        "--framework",
        "kubernetes",
        "dockerfile",
        "--output",
        "json",
        "--skip-check",
        ",".join(s["id"] for s in skips()),
        "--skip-download",
    ]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=100, env=env, check=False)
    try:
        output = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"checkov printed no JSON (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    reports = output if isinstance(output, list) else [output]
    return {
        "exit_code": result.returncode,
        "by_framework": {r.get("check_type", "?"): r for r in reports},
        "given": given,
        "stderr": result.stderr,
    }


def _failures(report: dict[str, Any]) -> list[str]:
    return [
        f"{c['check_id']} {c['resource']} ({Path(c['file_path']).name}): {c['check_name']}"
        for c in report.get("results", {}).get("failed_checks", [])
    ]


@pytest.mark.parametrize("framework", ["kubernetes", "dockerfile"])
def test_checkov_passes(checkov_reports: dict[str, Any], framework: str) -> None:
    report = checkov_reports["by_framework"].get(framework)
    assert report is not None, f"checkov ran no {framework} checks: {list(checkov_reports['by_framework'])}"
    assert _failures(report) == []
    summary = report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["failed"] == 0
    assert summary["passed"] > 0, "checkov passed nothing: it checked nothing"


def test_checkov_exits_zero(checkov_reports: dict[str, Any]) -> None:
    assert checkov_reports["exit_code"] == 0, checkov_reports["stderr"][-2000:]


def test_checkov_looked_at_every_file(checkov_reports: dict[str, Any]) -> None:
    seen = {
        Path(check["file_path"]).name
        for report in checkov_reports["by_framework"].values()
        for check in report.get("results", {}).get("passed_checks", [])
    }
    assert set(checkov_reports["given"]) <= seen, sorted(set(checkov_reports["given"]) - seen)
    # and every workload of every rendering
    kubernetes = checkov_reports["by_framework"]["kubernetes"]["results"]["passed_checks"]
    deployments = {
        (Path(c["file_path"]).name, c["resource"]) for c in kubernetes if c["resource"].startswith("Deployment.")
    }
    assert len(deployments) >= 4 * len([g for g in checkov_reports["given"] if g.endswith(".yaml")])


def test_every_skip_has_a_reason() -> None:
    entries = skips()
    assert entries, "the skip list is empty: then nothing needs a file"
    ids = [e["id"] for e in entries]
    assert len(ids) == len(set(ids))
    for entry in entries:
        assert set(entry) == {"id", "reason"}, entry
        assert entry["id"].startswith(("CKV_", "CKV2_")), entry
        assert len(entry["reason"].split()) >= 8, f"{entry['id']}: say why"
