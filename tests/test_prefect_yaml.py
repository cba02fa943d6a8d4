"""prefect.yaml: the lifecycle deployments on a process work pool (one machine) and a
Kubernetes work pool (a cluster). Checked the way `prefect deploy` and a worker read them:
Prefect's own prefect.yaml model, the entrypoints loaded as flows, the job variables against
each pool's variables schema, and the Kubernetes Job a worker would submit against the
Kubernetes client's models. Nothing is deployed: there is no cluster here."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import uuid
from pathlib import Path

import pytest
import yaml
from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, WorkPoolConfig
from prefect.client.schemas.objects import FlowRun
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.utilities.schema_tools.validation import ValidationError, validate
from prefect.utilities.templating import apply_values
from prefect.workers.process import ProcessWorker

ROOT = Path(__file__).resolve().parents[1]
K8S_TEMPLATE = ROOT / "deploy" / "prefect" / "k8s-base-job-template.json"
# The environment `prefect deploy` runs in: it fills the {{ $VAR }} placeholders.
DEPLOY_ENV = {"PWD": "/srv/checkout", "LIFECYCLE_IMAGE": "registry.example.com/llm-lifecycle:abc123"}


@pytest.fixture
def deployments(monkeypatch) -> dict[str, dict]:
    """Each deployment as `prefect deploy` sees it: parsed with Prefect's prefect.yaml model,
    then templated from the environment."""
    for k, v in DEPLOY_ENV.items():
        monkeypatch.setenv(k, v)
    raw = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    PrefectYamlModel.model_validate(raw)
    return {d["name"]: apply_values(d, os.environ, remove_notset=False) for d in raw["deployments"]}


def check_job_variables(job_variables: dict, template: dict) -> None:
    """As the Prefect server does on deployment creation, plus: a variable the pool does not
    declare is an error (Prefect would silently ignore a typo)."""
    declared = template["variables"]["properties"]
    unknown = sorted(set(job_variables) - set(declared))
    if unknown:
        raise ValidationError(f"job variable(s) {unknown} are not declared by the work pool (declared: {', '.join(declared)})")
    validate(job_variables, template["variables"], raise_on_error=True, ignore_required=True)


def k8s_job(job_variables: dict, template: dict) -> dict:
    """The Job manifest a Kubernetes worker submits for one flow run."""
    from prefect.client.orchestration import PrefectClient
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from serving.launcher import free_port

    # A worker resolves block and variable placeholders through its API client; these templates
    # have none, so a client at an address where nothing listens proves no lookup is needed
    # (one would fail loudly) and keeps Prefect's ephemeral server out of this test.
    nowhere = PrefectClient(f"http://127.0.0.1:{free_port()}/api")
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables, client=nowhere))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="quiet-otter"))
    return config.job_manifest


def test_prefect_yaml_parses_and_uses_only_known_keys(deployments):
    raw = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for d in raw["deployments"]:
        assert set(d) <= set(DeploymentConfig.model_fields), set(d) - set(DeploymentConfig.model_fields)
        assert set(d["work_pool"]) <= set(WorkPoolConfig.model_fields)
    assert set(deployments) == {"lifecycle-local", "lifecycle-k8s"}


def test_every_entrypoint_is_the_lifecycle_flow_with_its_parameters(deployments):
    for d in deployments.values():
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert isinstance(flow, Flow) and flow.name == "llm-lifecycle"
        assert set(d["parameters"]) <= set(flow.parameters.properties)


def test_the_process_pool_runs_in_this_checkout(deployments):
    d = deployments["lifecycle-local"]
    check_job_variables(d["work_pool"]["job_variables"], ProcessWorker.get_default_base_job_template())
    step = d["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == DEPLOY_ENV["PWD"]  # the checkout `prefect deploy` ran in
    assert d["work_pool"]["job_variables"]["env"]["PREFECT_HOME"] == f"{DEPLOY_ENV['PWD']}/.prefect"


def test_the_kubernetes_job_template_makes_a_valid_job(deployments):
    pytest.importorskip("prefect_kubernetes", reason="pip install -c constraints.txt prefect-kubernetes==0.8.0 (make setup installs it)")
    from serving.kserve import from_dict

    template = json.loads(K8S_TEMPLATE.read_text())
    d = deployments["lifecycle-k8s"]
    job_variables = d["work_pool"]["job_variables"]
    check_job_variables(job_variables, template)
    manifest = k8s_job(job_variables, template)
    job = from_dict(manifest, "V1Job")  # strict: every field known to the Kubernetes client's models
    container = job.spec.template.spec.containers[0]
    assert container.image == DEPLOY_ENV["LIFECYCLE_IMAGE"]
    env = {e.name: e for e in container.env}
    assert env["MLFLOW_TRACKING_URI"].value.startswith("http://mlflow.")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # credentials by reference only
        assert env[key].value is None
        assert (env[key].value_from.secret_key_ref.name, env[key].value_from.secret_key_ref.key) == ("llm-lifecycle-storage", key)
    assert container.resources.limits["nvidia.com/gpu"] in (1, "1")
    assert container.resources.requests == {"cpu": "8", "memory": "48Gi"}
    assert job.metadata.namespace == "llm-lifecycle" and job.spec.template.spec.service_account_name == "llm-lifecycle"
    assert container.args == ["prefect", "flow-run", "execute"]  # the worker fills in its own command


def test_a_bad_job_variable_or_template_field_fails(deployments):
    pytest.importorskip("prefect_kubernetes", reason="pip install -c constraints.txt prefect-kubernetes==0.8.0 (make setup installs it)")
    from serving.kserve import KServeError, from_dict

    template = json.loads(K8S_TEMPLATE.read_text())
    job_variables = deployments["lifecycle-k8s"]["work_pool"]["job_variables"]
    with pytest.raises(ValidationError, match="gpu_limt"):
        check_job_variables({**job_variables, "gpu_limt": 1}, template)
    with pytest.raises(ValidationError):
        check_job_variables({**job_variables, "gpu_limit": "one"}, template)
    broken = copy.deepcopy(template)
    broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["restartPolcy"] = "Never"
    with pytest.raises(KServeError, match="restartPolcy: unknown field of V1PodSpec"):
        from_dict(k8s_job(job_variables, broken), "V1Job")
