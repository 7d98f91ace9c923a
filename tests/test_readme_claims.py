"""The generated README says about probes and overlays only what includes/claims.jinja says, and
the service behaves as those sentences say.

0.2.0's README said "/readyz: a connection answers" in one place while /readyz never checks out,
and said both that the budget test builds every overlay and that an overlay "is outside what it
sees". The claims now have one source; this test renders it with the same Jinja settings as
copier, removes each claim from the README, and finds nothing else said on those subjects.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from rendering import TEMPLATE_ROOT, python, run
from tools import kubectl

PACKAGE = "poolwise_service"
# Words that make a sentence a claim about probes or about what the budget check reads.
PROBE_WORDS = re.compile(r"readyz|healthz|readiness probe|liveness probe", re.IGNORECASE)
OVERLAY_WORDS = re.compile(r"overlay", re.IGNORECASE)
# A URL in a command (curl 127.0.0.1:8000/readyz) names the endpoint; it claims nothing.
URL = re.compile(r"\S+:\d+/\S+")


def claims() -> Any:
    """includes/claims.jinja as copier renders it (copier.yml's _envops)."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_ROOT),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return environment.get_template("includes/claims.jinja").module


def normalized(text: str) -> str:
    return " ".join(text.split())


def unclaimed(readme: str, *claim_texts: str) -> str:
    """The README with every claim removed, whitespace normalized, URLs dropped."""
    remaining = normalized(readme)
    for claim in claim_texts:
        claim = normalized(claim)
        assert claim in remaining, f"the README no longer renders the claim: {claim}"
        remaining = remaining.replace(claim, " ")
    return URL.sub(" ", remaining)


def mentions(text: str, words: re.Pattern[str]) -> list[str]:
    return [match.group(0) for match in re.finditer(rf"[^.]*(?:{words.pattern})[^.]*", text, re.I)]


@pytest.mark.parametrize("target", ["k8s-sync", "k8s-async"])
def test_the_readme_says_of_the_probes_only_what_the_service_does(render, target: str) -> None:
    project = render({"target": target})
    readme = (project / "README.md").read_text()
    source = claims()

    rest = unclaimed(readme, source.probes_comment(), source.readyz_claim(), source.healthz_claim())
    assert mentions(rest, PROBE_WORDS) == []

    # The probes the claims describe are the ones the Deployment runs.
    deployment = yaml.safe_load((project / "deploy/k8s/deployment.yaml").read_text())
    api = deployment["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The generated test pins the behaviour (no checkout, these counters) with the same keys;
    # the render tests run it.
    app_test = (project / "tests/test_app.py").read_text()
    keys = ", ".join(f'"{key}"' for key in source.pool_state_keys)
    assert f'assert set(response.json()["pool"]) == {{{keys}}}' in app_test
    assert "assert checkouts.checkouts == 0" in app_test


@pytest.mark.parametrize("target", ["k8s-sync", "batch"])
def test_the_readme_says_overlays_are_checked_and_they_are(render, target: str) -> None:
    project = render({"target": target})
    readme = (project / "README.md").read_text()
    source = claims()

    rest = unclaimed(readme, source.k8s_sources(), source.overlays_claim())
    assert mentions(rest, OVERLAY_WORDS) == []

    # An overlay that patches a budget number past the budget is what the check refuses.
    kubectl("whether an overlay's patch is checked")
    overlay = project / "deploy/overlays/prod"
    overlay.mkdir(parents=True)
    if target == "batch":
        kind, name, path, value = (
            "CronJob",
            "poolwise-service",
            "/spec/jobTemplate/spec/parallelism",
            200,
        )
    else:
        kind, name, path, value = (
            "HorizontalPodAutoscaler",
            "poolwise-service",
            "/spec/maxReplicas",
            200,
        )
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../../k8s"],
        "patches": [
            {
                "target": {"kind": kind, "name": name},
                "patch": f"- op: replace\n  path: {path}\n  value: {value}\n",
            }
        ],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    checked = run(python("-m", "poolwise", "budget"), project / "src")
    shown = checked.stdout + checked.stderr
    assert checked.returncode == 1, shown
    assert "deploy/overlays/prod" in shown, shown
    assert f"={value}" in shown, shown


def test_the_lambda_readme_claims_no_overlays(render) -> None:
    project = render({"target": "lambda"})
    readme = normalized((project / "README.md").read_text())
    assert mentions(readme, OVERLAY_WORDS) == []
    assert Path(project / "deploy/k8s").exists() is False
