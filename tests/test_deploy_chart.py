"""The Helm chart (deploy/helm/layerkv): rendered offline, linted strictly, validated against the
Kubernetes schemas, and checked for the properties the deployment relies on.

Rendering and linting go through helm-python-sdk, which binds Helm's Go SDK as a shared library: no
helm binary, no cluster, no network. Manifests are validated with kubernetes-validate's bundled
schemas (strict: unknown fields are errors).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "deploy" / "helm" / "layerkv"
EXAMPLE = REPO / "deploy" / "helm" / "examples" / "multi-worker-external-redis-tls.yaml"
CONTRACT = REPO / "docs" / "cli-contract.md"
KUBE_VERSION = "1.30.0"
RELEASE = "lkv"
NAMESPACE = "serving"
# Custom resources: no bundled schema, checked by hand in test_service_monitors_select_services.
CRD_KINDS = {"ServiceMonitor"}
# Environment the chart sets that is not a CLI setting: read only by the image's health check.
HEALTHCHECK_ENV = {"HEALTHCHECK_TLS_SERVER_NAME"}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def example_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return values


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All rendered Kubernetes objects (NOTES.txt excluded), in template order."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {len(found)}"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def contract_env(command: str) -> set[str]:
    """Environment names of one command in docs/cli-contract.md: LAYERKV_ + flag name upper-cased
    with '_', plus the env names the table spells out (REDIS_URL)."""
    text = CONTRACT.read_text()
    section = text.split(f"## `layerkv {command}`", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`--"):
            continue
        for flag in re.findall(r"`--([a-z0-9-]+)`", cells[1]):
            names.add("LAYERKV_" + flag.upper().replace("-", "_"))
        names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[2]))
    return names


# --- rendering, lint, schemas ------------------------------------------------------------------


@pytest.mark.parametrize("values_name", ["default", "example"])
def test_renders_and_validates_against_kubernetes_schemas(chart: helm.Chart, values_name: str) -> None:
    values = None if values_name == "default" else example_values()
    docs = render(chart, values)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        # Raises ValidationError naming the field on any schema violation (strict: unknown fields).
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values_name", ["default", "example"])
def test_lint_strict_is_clean(values_name: str) -> None:
    values = None if values_name == "default" else example_values()
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_lint_reports_bad_values() -> None:
    report = helm.lint(CHART, {"workers": {"replicas": -1}}, strict=True, kube_version=f"v{KUBE_VERSION}")
    text = json.dumps(report)
    assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"])
    assert "/workers/replicas" in text


# --- default values ----------------------------------------------------------------------------


def test_default_topology(chart: helm.Chart) -> None:
    docs = render(chart)
    sched = one(docs, "Deployment", "-scheduler")
    workers = one(docs, "StatefulSet", "-workers")
    redis = one(docs, "StatefulSet", "-redis")
    assert sched["spec"]["replicas"] == 1 and sched["spec"]["strategy"]["type"] == "Recreate"
    assert workers["spec"]["replicas"] == 2

    # Workers sit behind a headless Service that publishes not-ready pods (they register first).
    headless = one(docs, "Service", "-workers")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert workers["spec"]["serviceName"] == headless["metadata"]["name"]

    # Bundled Redis: persistent volume and append-only file on.
    args = container(redis)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/data"} in container(redis)["volumeMounts"]
    redis_env = env_of(container(sched))["LAYERKV_REDIS_URL"]
    assert redis_env["value"] == f"redis://{redis['metadata']['name']}:6379/0"


def test_services_and_pdb_select_their_pods(chart: helm.Chart) -> None:
    docs = render(chart)
    for workload, service_suffix in [
        (one(docs, "Deployment", "-scheduler"), "-scheduler"),
        (one(docs, "StatefulSet", "-workers"), "-workers"),
        (one(docs, "StatefulSet", "-redis"), "-redis"),
    ]:
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        selector = one(docs, "Service", service_suffix)["spec"]["selector"]
        assert selector.items() <= pod_labels.items()
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        port_names = {p["name"] for p in container(workload)["ports"]}
        for port in one(docs, "Service", service_suffix)["spec"]["ports"]:
            assert port["targetPort"] in port_names
    workers = one(docs, "StatefulSet", "-workers")
    pdb = one(docs, "PodDisruptionBudget", "-workers")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= workers["spec"]["template"]["metadata"]["labels"].items()
    )


def test_workers_request_gpus_and_spread(chart: helm.Chart) -> None:
    docs = render(chart, {"workers": {"gpus": 2}})
    workers = one(docs, "StatefulSet", "-workers")
    resources = container(workers)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 2 and resources["limits"]["nvidia.com/gpu"] == 2
    # The user's CPU/memory settings survive the merge.
    assert resources["requests"]["memory"] == "32Gi" and resources["limits"]["memory"] == "64Gi"
    anti = workers["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"


def test_cpu_fleet_requests_no_gpu(chart: helm.Chart) -> None:
    docs = render(chart, {"workers": {"gpus": 0, "device": "cpu", "antiAffinity": "none"}})
    workers = one(docs, "StatefulSet", "-workers")
    resources = container(workers)["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]
    assert "affinity" not in workers["spec"]["template"]["spec"]
    assert env_of(container(workers))["LAYERKV_DEVICE"]["value"] == "cpu"


def test_probes_use_native_grpc_health(chart: helm.Chart) -> None:
    docs = render(chart)
    for workload, probes in [
        (one(docs, "Deployment", "-scheduler"), ("readinessProbe", "livenessProbe")),
        (one(docs, "StatefulSet", "-workers"), ("startupProbe", "readinessProbe", "livenessProbe")),
    ]:
        c = container(workload)
        grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        assert env_of(c)["LAYERKV_PORT"]["value"] == str(grpc_port)
        for probe in probes:
            assert c[probe]["grpc"] == {"port": grpc_port}, probe
            assert "exec" not in c[probe] and "httpGet" not in c[probe]


def test_worker_settings_reach_the_worker(chart: helm.Chart) -> None:
    values = {
        "model": {"path": "/models/llama", "volume": {"enabled": True, "existingClaim": "weights"}},
        "kv": {"blockSize": 32, "gpuBlocks": 2_000_000, "hostGiB": 1.5},
    }
    docs = render(chart, values)
    workers = one(docs, "StatefulSet", "-workers")
    c = container(workers)
    env = env_of(c)
    assert env["LAYERKV_MODEL"]["value"] == "/models/llama"
    assert env["LAYERKV_BLOCK_SIZE"]["value"] == "32"
    assert env["LAYERKV_GPU_BLOCKS"]["value"] == "2000000"  # not 2e+06
    assert env["LAYERKV_HOST_KV_GIB"]["value"] == "1.5"
    assert "LAYERKV_HOST_BLOCKS" not in env and "LAYERKV_GPU_KV_GIB" not in env
    assert env["LAYERKV_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Each worker advertises its stable StatefulSet DNS name and registers with the scheduler Service.
    headless = one(docs, "Service", "-workers")["metadata"]["name"]
    assert env["LAYERKV_ADVERTISE_ADDRESS"]["value"] == (
        f"$(LAYERKV_WORKER_ID).{headless}.{NAMESPACE}.svc.cluster.local:50061"
    )
    sched_svc = one(docs, "Service", "-scheduler")
    grpc_port = next(p["port"] for p in sched_svc["spec"]["ports"] if p["name"] == "grpc")
    assert env["LAYERKV_SCHEDULER"]["value"] == (
        f"{sched_svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{grpc_port}"
    )
    # The model volume is mounted read-only where the path points.
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    volume = next(v for v in workers["spec"]["template"]["spec"]["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}


def test_dns_discovery_points_the_scheduler_at_the_headless_service(chart: helm.Chart) -> None:
    docs = render(chart, {"workers": {"discovery": "dns"}})
    sched_env = env_of(container(one(docs, "Deployment", "-scheduler")))
    headless = one(docs, "Service", "-workers")["metadata"]["name"]
    assert sched_env["LAYERKV_WORKERS_DNS"]["value"] == f"{headless}.{NAMESPACE}.svc.cluster.local:50061"
    assert "LAYERKV_SCHEDULER" not in env_of(container(one(docs, "StatefulSet", "-workers")))


# Values that together reach every environment variable the chart can set.
ENV_VARIANTS: dict[str, dict[str, Any] | None] = {
    "default": None,
    "dns+blocks": {"workers": {"discovery": "both"}, "kv": {"gpuBlocks": 64, "hostBlocks": 128}},
    "tokens": {"auth": {"enabled": True, "adminToken": "a", "requireApiToken": True, "apiToken": "b",
                        "requireWorkerToken": True, "workerToken": "w"}},
}


def chart_env(chart: helm.Chart, command: str) -> set[str]:
    """Every env name the chart sets on the container running `layerkv <command>`."""
    suffix, kind = {"scheduler": ("-scheduler", "Deployment"), "worker": ("-workers", "StatefulSet")}[command]
    names: set[str] = set()
    for values in [*ENV_VARIANTS.values(), example_values()]:
        names |= set(env_of(container(one(render(chart, values), kind, suffix))))
    return names


@pytest.mark.parametrize("command", ["scheduler", "worker"])
def test_env_and_entrypoint_follow_the_cli_contract(chart: helm.Chart, command: str) -> None:
    for values in [*ENV_VARIANTS.values(), example_values()]:
        docs = render(chart, values)
        workload = one(
            docs, *{"scheduler": ("Deployment", "-scheduler"), "worker": ("StatefulSet", "-workers")}[command]
        )
        # The image's entrypoint (`layerkv <command>`) runs; the chart never replaces it.
        assert "command" not in container(workload)
    unknown = chart_env(chart, command) - contract_env(command) - HEALTHCHECK_ENV
    assert not unknown, f"{command}: env not in docs/cli-contract.md: {sorted(unknown)}"


@pytest.mark.parametrize("command", ["scheduler", "worker"])
def test_the_cli_reads_every_env_the_chart_sets(chart: helm.Chart, command: str) -> None:
    """The real `layerkv <command>` options (typer/click introspection) accept every variable."""
    import typer.main

    # Imported by name so that type-checking this file does not walk the whole service code.
    app = importlib.import_module("layerkv.cli").app
    group = typer.main.get_command(app)
    cmd = getattr(group, "commands", {}).get(command)  # typer may bring its own click: duck-type
    assert cmd is not None, f"`layerkv {command}` is not registered in layerkv.cli"
    accepted: set[str] = set()
    for param in cmd.params:
        envvar = getattr(param, "envvar", None)
        accepted |= {envvar} if isinstance(envvar, str) else set(envvar or ())
    missing = chart_env(chart, command) - HEALTHCHECK_ENV - accepted
    assert not missing, f"`layerkv {command}` has no option reading {sorted(missing)}"


# --- policy swap -------------------------------------------------------------------------------


def test_policy_configmap_is_mounted_and_watched(chart: helm.Chart) -> None:
    docs = render(chart, {"policy": {"name": "least-loaded", "params": {"alpha": 0.5}}})
    cm = one(docs, "ConfigMap", "-policy")
    assert json.loads(cm["data"]["policy.json"]) == {"name": "least-loaded", "params": {"alpha": 0.5}}
    sched = one(docs, "Deployment", "-scheduler")
    c = container(sched)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "policy")
    # A subPath mount would never see ConfigMap updates.
    assert "subPath" not in mount
    volume = next(v for v in sched["spec"]["template"]["spec"]["volumes"] if v["name"] == "policy")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert env_of(c)["LAYERKV_POLICY_FILE"]["value"] == f"{mount['mountPath']}/policy.json"
    # The file is the only source of the policy: flags/env would roll the pod on every change.
    assert "LAYERKV_POLICY" not in env_of(c) and "LAYERKV_POLICY_PARAMS" not in env_of(c)


def test_policy_change_touches_only_the_configmap(chart: helm.Chart) -> None:
    """`helm upgrade` with another policy changes the ConfigMap and nothing else: no pod template
    (hence no checksum annotation) of the scheduler or the workers changes, so nothing restarts."""
    before = chart.render(None, name=RELEASE, namespace=NAMESPACE)
    after = chart.render(
        {"policy": {"name": "fcfs-full", "params": {"max_batch": 4}}}, name=RELEASE, namespace=NAMESPACE
    )
    changed = {path for path in before if before[path] != after[path]}
    assert changed == {"layerkv/templates/policy-configmap.yaml", "layerkv/templates/NOTES.txt"}


# --- multi-worker, external Redis, TLS, auth ---------------------------------------------------


def test_example_external_redis_tls_auth(chart: helm.Chart) -> None:
    docs = render(chart, example_values())
    sched = one(docs, "Deployment", "-scheduler")
    workers = one(docs, "StatefulSet", "-workers")
    assert workers["spec"]["replicas"] == 8
    assert [d["metadata"]["name"] for d in by_kind(docs, "StatefulSet")] == [workers["metadata"]["name"]]
    assert not [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-redis")]
    sched_env = env_of(container(sched))
    assert sched_env["LAYERKV_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "layerkv-redis",
        "key": "redis-url",
    }
    anti = workers["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert (
        anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
    )
    assert one(docs, "PodDisruptionBudget", "-workers")["spec"]["maxUnavailable"] == 2

    for workload, secret in [(sched, "layerkv-scheduler-tls"), (workers, "layerkv-worker-tls")]:
        c = container(workload)
        env = env_of(c)
        volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == secret
        mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
        assert mount["readOnly"]
        for var, key in [
            ("LAYERKV_TLS_CERT", "tls.crt"),
            ("LAYERKV_TLS_KEY", "tls.key"),
            ("LAYERKV_TLS_CA", "ca.crt"),
        ]:
            assert env[var]["value"] == f"{mount['mountPath']}/{key}"
        # The kubelet's gRPC probe cannot speak TLS: the image's health check script runs instead.
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["exec"]["command"] == ["python", "/opt/layerkv/healthcheck.py"]
            assert "grpc" not in c[probe]
        assert env["LAYERKV_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "layerkv-tokens",
            "key": "admin-token",
        }
    assert sched_env["LAYERKV_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "layerkv-tokens"
    worker_env = env_of(container(workers))
    assert worker_env["LAYERKV_SCHEDULER_IDENTITY"]["value"] == "layerkv-scheduler"
    assert sched_env["HEALTHCHECK_TLS_SERVER_NAME"]["value"].startswith(sched["metadata"]["name"] + ".")
    # An existing Secret is used as is: the chart creates none.
    assert by_kind(docs, "Secret") == []


def test_chart_made_token_secret_rolls_pods_on_change(chart: helm.Chart) -> None:
    def pods(token: str) -> tuple[str, str, dict[str, Any]]:
        docs = render(chart, {"auth": {"enabled": True, "adminToken": token}})
        secret = one(docs, "Secret", "-auth")
        sched = one(docs, "Deployment", "-scheduler")["spec"]["template"]["metadata"]["annotations"]
        work = one(docs, "StatefulSet", "-workers")["spec"]["template"]["metadata"]["annotations"]
        return sched["checksum/auth"], work["checksum/auth"], secret

    a_sched, a_work, secret = pods("first")
    b_sched, b_work, _ = pods("second")
    assert secret["data"]["admin-token"] == "Zmlyc3Q="  # base64("first")
    assert a_sched != b_sched and a_work != b_work


def test_worker_token_reaches_scheduler_and_workers_from_one_secret(chart: helm.Chart) -> None:
    docs = render(chart, {"auth": {"enabled": True, "adminToken": "a", "requireWorkerToken": True,
                                   "workerToken": "w"}})  # fmt: skip
    secret = one(docs, "Secret", "-auth")
    assert secret["data"]["worker-token"] == "dw=="  # base64("w")
    for kind, suffix in (("Deployment", "-scheduler"), ("StatefulSet", "-workers")):
        ref = env_of(container(one(docs, kind, suffix)))["LAYERKV_WORKER_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "worker-token"}
    plain = render(chart, {"auth": {"enabled": True, "adminToken": "a"}})
    assert "LAYERKV_WORKER_TOKEN" not in env_of(container(one(plain, "StatefulSet", "-workers")))
    with pytest.raises(helm.HelmRenderError, match=r"set auth\.existingSecret or auth\.workerToken"):
        render(chart, {"auth": {"enabled": True, "adminToken": "a", "requireWorkerToken": True}})


def test_service_monitors_select_services(chart: helm.Chart) -> None:
    docs = render(chart, example_values())
    monitors = by_kind(docs, "ServiceMonitor")
    assert len(monitors) == 2
    services = by_kind(docs, "Service")
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
        assert len(matched) == 1
        port_names = {p["name"] for p in matched[0]["spec"]["ports"]}
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
        assert "metrics" in port_names
    assert by_kind(render(chart), "ServiceMonitor") == []


# --- bad values fail at template time with a clear message ------------------------------------


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        (
            {"workers": {"replicas": -1}},
            helm.HelmValuesError,
            "at '/workers/replicas': minimum: got -1, want 0",
        ),
        ({"model": {"path": None}}, helm.HelmValuesError, "at '/model': missing property 'path'"),
        ({"model": {"path": ""}}, helm.HelmValuesError, "at '/model/path': minLength"),
        ({"workers": {"replica": 3}}, helm.HelmValuesError, "additional properties 'replica' not allowed"),
        ({"kv": {"blockSize": 0}}, helm.HelmValuesError, "at '/kv/blockSize': minimum"),
        ({"redis": {"url": "http://redis:6379"}}, helm.HelmValuesError, "at '/redis/url'"),
        ({"redis": {"enabled": False}}, helm.HelmRenderError, "set redis.url"),
        ({"redis": {"url": "redis://r:6379/0"}}, helm.HelmRenderError, "set redis.enabled=false"),
        ({"kv": {"gpuBlocks": 100, "gpuGiB": 2}}, helm.HelmRenderError, "kv.gpuBlocks and kv.gpuGiB"),
        ({"tls": {"enabled": True}}, helm.HelmRenderError, "set tls.schedulerSecret and tls.workerSecret"),
        ({"workers": {"gpus": 0}}, helm.HelmRenderError, "workers.device is cuda but workers.gpus is 0"),
        ({"auth": {"enabled": True}}, helm.HelmRenderError, "set auth.existingSecret or auth.adminToken"),
        (
            {"model": {"volume": {"enabled": True}}},
            helm.HelmRenderError,
            "set model.volume.existingClaim or model.volume.hostPath",
        ),
    ],
)
def test_bad_values_fail_with_a_clear_message(
    chart: helm.Chart, values: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(caught.value)


def test_network_policies_admit_only_the_scheduler(chart: helm.Chart) -> None:
    docs = render(chart)
    sched_labels = one(docs, "Deployment", "-scheduler")["spec"]["template"]["metadata"]["labels"]
    for suffix, kind, port in [("-workers", "StatefulSet", "grpc"), ("-redis", "StatefulSet", "redis")]:
        workload = one(docs, kind, suffix)
        policy = one(docs, "NetworkPolicy", suffix)
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
        restricted = next(r for r in policy["spec"]["ingress"] if {"port": port} in r["ports"])
        selector = restricted["from"][0]["podSelector"]["matchLabels"]
        assert selector.items() <= sched_labels.items()
        assert not selector.items() <= pod_labels.items()
        assert port in {p["name"] for p in container(workload)["ports"]}
    # With an external Redis there is no Redis pod to protect.
    external = render(chart, example_values())
    assert [p["metadata"]["name"] for p in by_kind(external, "NetworkPolicy")] == [
        one(external, "StatefulSet", "-workers")["metadata"]["name"]
    ]
