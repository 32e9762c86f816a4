"""The Helm chart, rendered with `helm template` and checked object by object.

Needs the helm binary: on PATH, or in .tools/bin where `.ci/k8s-checks.sh` installs it. Without it
every test here is skipped (the reason says how to get it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm"
NAMESPACE = "llm"
RELEASE = "r1"
FULLNAME = "r1-pagedserve"


def _find_helm() -> str | None:
    local = ROOT / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


HELM = _find_helm()
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm is not installed: run `bash .ci/k8s-checks.sh` (installs it into .tools/bin)"
)


def render(*sets: str, values: dict | None = None, check: bool = True) -> dict[tuple[str, str], dict] | str:
    """Objects of `helm template` keyed by (kind, name); the error text when check=False and it fails."""
    cmd = [HELM, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", "1.32.0"]
    for s in sets:
        cmd += ["--set", s]
    if values is not None:
        cmd += ["--values", "-"]
    proc = subprocess.run(cmd, input=json.dumps(values or {}), capture_output=True, text=True, timeout=60)
    if not check:
        return proc.stderr if proc.returncode else ""
    assert proc.returncode == 0, proc.stderr
    objects = {}
    for doc in yaml.safe_load_all(proc.stdout):
        if doc:
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"two objects named {key}"
            objects[key] = doc
    return objects


def kinds(objects) -> set[str]:
    return {kind for kind, _ in objects}


def one(objects, kind: str) -> dict:
    found = [o for (k, _), o in objects.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(objects) -> dict:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    return c


def arg_value(args: list[str], flag: str) -> str | None:
    for a in args:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


ALL_ON = [
    "keda.enabled=true",
    "serviceMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "grafanaDashboard.enabled=true",
    "ingress.enabled=true",
    "apiKey.existingSecret=llm-api-key",  # an Ingress needs a key
]


# --- The pod: probes, ports, drain --------------------------------------------------------------


@pytest.mark.parametrize("port", [8000, 9123])
def test_probes_point_at_health_and_ready_on_the_served_port(port):
    objects = render(f"server.port={port}")
    c = container(objects)
    (p,) = c["ports"]
    assert p == {"name": "http", "containerPort": port, "protocol": "TCP"}
    assert arg_value(c["args"], "--port") == str(port)
    assert arg_value(c["args"], "--host") == "0.0.0.0"
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    # Model download and load get at least ten minutes before liveness takes over.
    s = c["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= 600
    svc = one(objects, "Service")
    (sp,) = svc["spec"]["ports"]
    assert sp["targetPort"] == "http" and sp["name"] == "http"


@pytest.mark.parametrize(
    ("pre_stop", "shutdown", "margin"), [(10, 60, 15), (0, 30, 5), (30, 600, 20)]
)
def test_grace_period_covers_pre_stop_and_drain(pre_stop, shutdown, margin):
    objects = render(
        f"server.preStopSleepSeconds={pre_stop}",
        f"server.shutdownTimeout={shutdown}",
        f"server.terminationGraceMarginSeconds={margin}",
    )
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(pre_stop)]
    assert arg_value(c["args"], "--shutdown-timeout") == str(shutdown)
    assert pod["terminationGracePeriodSeconds"] == pre_stop + shutdown + margin
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + shutdown + 5


def test_grace_margin_below_five_seconds_is_rejected():
    err = render("server.terminationGraceMarginSeconds=1", check=False)
    assert "terminationGraceMarginSeconds" in err


def test_rendered_args_parse_with_the_real_cli():
    from server.cli import build_parser, split_args

    objects = render(
        values={
            "model": "Qwen/Qwen2.5-0.5B-Instruct",
            "revision": "abc123",
            "servedModelName": "qwen",
            "dtype": "bfloat16",
            "maxModelLen": 4096,
            "kvCacheMemory": 1.5,
            "maxNumSeqs": 32,
            "maxQueuedRequests": 100,
            "gpuMemoryUtilization": 0.8,
            "extraArgs": ["--enforce-eager", "--block-size=32"],
            "server": {"shutdownTimeout": 45, "logFormat": "json"},
        }
    )
    args = container(objects)["args"]
    assert args[0] == "Qwen/Qwen2.5-0.5B-Instruct"
    engine, server = split_args(build_parser().parse_args(["serve", *args]))
    assert engine.model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert engine.revision == "abc123"
    assert engine.served_names(engine.model) == ("qwen",)
    assert engine.dtype == "bfloat16"
    assert engine.max_model_len == 4096
    assert engine.kv_cache_memory == 1.5
    assert engine.max_num_seqs == 32
    assert engine.max_queued_requests == 100
    assert engine.gpu_memory_utilization == 0.8
    assert engine.enforce_eager is True and engine.block_size == 32
    assert server.host == "0.0.0.0" and server.port == 8000
    assert server.shutdown_timeout == 45 and server.log_format == "json"


def test_default_args_serve_the_demo_model_under_a_stable_name():
    from server.cli import build_parser, split_args

    args = container(render())["args"]
    engine, _ = split_args(build_parser().parse_args(["serve", *args]))
    assert engine.model is None  # the built-in demo model
    assert engine.served_model_name == ["pagedserve-demo"]


@pytest.mark.parametrize(("values", "bound"), [({}, 256), ({"maxNumSeqs": 16}, 32), ({"maxQueuedRequests": -1}, -1)])
def test_the_queue_is_bounded_unless_asked_otherwise(values, bound):
    """maxQueuedRequests null passes no flag: the server's default, 2 x --max-num-seqs; -1 is unbounded."""
    from server.cli import build_parser, split_args

    args = container(render(values=values))["args"]
    engine, _ = split_args(build_parser().parse_args(["serve", *args]))
    assert engine.max_queued_requests == bound


# --- Resources and scheduling -------------------------------------------------------------------


def test_gpu_limit_present_only_when_enabled():
    cpu = container(render())
    assert "nvidia.com/gpu" not in json.dumps(cpu["resources"])
    objects = render("gpu.enabled=true", "gpu.count=2")
    res = container(objects)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 2
    assert res["requests"]["nvidia.com/gpu"] == 2
    assert res["limits"]["memory"]  # the rest of resources is kept
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container(objects)["image"].endswith("-cuda")
    assert container(render())["image"].endswith("-cpu")


def test_scheduling_values_pass_through():
    objects = render(
        values={
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        }
    )
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeAffinity" in pod["affinity"]


def test_shm_is_memory_backed():
    objects = render("shm.sizeLimit=4Gi")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}


def test_pod_runs_as_non_root_with_writable_tmp():
    objects = render()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    if c["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}


# --- Cache volume and secrets -------------------------------------------------------------------


def test_pvc_claim_matches_the_cache_volume():
    objects = render()
    pvc = one(objects, "PersistentVolumeClaim")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    hf_home = next(e["value"] for e in c["env"] if e["name"] == "HF_HOME")
    assert vols[mounts[hf_home]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_existing_claim_and_no_persistence():
    objects = render("persistence.existingClaim=shared-cache")
    assert "PersistentVolumeClaim" not in kinds(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["shared-cache"]
    objects = render("persistence.enabled=false")
    assert "PersistentVolumeClaim" not in kinds(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])


def _env(c) -> dict[str, dict]:
    return {e["name"]: e for e in c["env"]}


def test_secrets_from_values():
    objects = render("hfToken.value=hf_abc", "apiKey.value=sk-123")
    secret = one(objects, "Secret")
    env = _env(container(objects))
    for name, value in (("HF_TOKEN", "hf_abc"), ("PAGEDSERVE_API_KEY", "sk-123")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        import base64

        assert base64.b64decode(secret["data"][ref["key"]]).decode() == value


def test_existing_secrets_and_none():
    objects = render(
        "hfToken.existingSecret=hf", "hfToken.existingSecretKey=token", "apiKey.existingSecret=keys"
    )
    assert "Secret" not in kinds(objects)
    env = _env(container(objects))
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["PAGEDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "api-key"}
    env = _env(container(render()))
    assert "HF_TOKEN" not in env and "PAGEDSERVE_API_KEY" not in env


# --- Service, monitoring ------------------------------------------------------------------------


def test_service_selects_the_pods_and_service_monitor_port_exists():
    objects = render(*ALL_ON)
    svc = one(objects, "Service")
    dep = one(objects, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    sm = one(objects, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports
        assert ep["path"] == "/metrics"
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ing = one(objects, "Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == svc["metadata"]["name"] and backend["port"]["name"] in svc_ports


def test_monitoring_objects_are_opt_in():
    assert kinds(render()) == {"Deployment", "Service", "ServiceAccount", "PersistentVolumeClaim", "PodDisruptionBudget"}
    objects = render("serviceMonitor.enabled=true", "prometheusRule.enabled=true", "grafanaDashboard.enabled=true")
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds(objects)


def test_grafana_dashboard_configmap():
    objects = render("grafanaDashboard.enabled=true")
    cm = one(objects, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["pagedserve.json"])
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in (
        "num_requests_waiting",
        "num_requests_running",
        "kv_cache_usage_perc",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "generation_tokens_total",
        "prompt_tokens_total",
        "request_success_total",
        "num_preemptions_total",
        "prefix_cache_hits_total",
        "prefix_cache_queries_total",
    ):
        assert f"pagedserve:{metric}" in exprs, metric
    assert re.search(r"histogram_quantile\(0\.99, .*time_to_first_token", exprs)
    assert re.search(r"histogram_quantile\(0\.5, .*e2e_request_latency", exprs)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_rule_alerts_select_this_model():
    objects = render("prometheusRule.enabled=true", "servedModelName=my-llm")
    rule = one(objects, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "PagedServeDown",
        "PagedServeQueueGrowing",
        "PagedServeKVCacheSaturated",
        "PagedServeHighTimeToFirstToken",
    }
    for name in ("PagedServeQueueGrowing", "PagedServeKVCacheSaturated", "PagedServeHighTimeToFirstToken"):
        assert 'model_name="my-llm"' in alerts[name]["expr"]
        assert f'namespace="{NAMESPACE}"' in alerts[name]["expr"]
    assert f'job="{FULLNAME}"' in alerts["PagedServeDown"]["expr"]


# --- Autoscaling --------------------------------------------------------------------------------

SELECTOR = re.compile(r"^sum\(pagedserve:num_requests_waiting\{(?P<m>[^}]*)\}\)$")


def _matchers(query: str) -> dict[str, str]:
    m = SELECTOR.match(query)
    assert m, query
    return dict(re.findall(r'(\w+)="([^"]*)"', m.group("m")))


@pytest.mark.parametrize(
    ("sets", "served"),
    [
        ([], "pagedserve-demo"),
        (["model=Qwen/Qwen2.5-0.5B-Instruct"], "Qwen/Qwen2.5-0.5B-Instruct"),
        (["model=Qwen/Qwen2.5-0.5B-Instruct", "servedModelName=qwen"], "qwen"),
    ],
)
def test_keda_trigger_selects_this_models_queue(sets, served):
    objects = render("keda.enabled=true", "keda.threshold=7", *sets)
    so = one(objects, "ScaledObject")
    assert "HorizontalPodAutoscaler" not in kinds(objects)
    assert so["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert meta["threshold"] == "7"
    assert _matchers(meta["query"]) == {"model_name": served, "namespace": NAMESPACE, "job": FULLNAME}
    # The model the server answers to is the one the trigger selects.
    assert arg_value(container(objects)["args"], "--served-model-name") == served
    # KEDA owns the replica count.
    assert "replicas" not in one(objects, "Deployment")["spec"]


def test_keda_selector_labels_follow_metrics_selector():
    objects = render(
        "keda.enabled=true", values={"metricsSelector": {"job": None, "cluster": "eu-1"}}
    )
    q = one(objects, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    assert _matchers(q) == {"model_name": "pagedserve-demo", "namespace": NAMESPACE, "cluster": "eu-1"}


def test_keda_object_fields_are_known_to_keda():
    objects = render(
        "keda.enabled=true",
        values={"keda": {"authenticationRef": {"name": "prom"},
                         "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}}}},
    )
    spec = one(objects, "ScaledObject")["spec"]
    assert set(spec) <= {
        "scaleTargetRef", "pollingInterval", "initialCooldownPeriod", "cooldownPeriod", "idleReplicaCount",
        "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
    }
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    for t in spec["triggers"]:
        assert set(t) <= {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
    assert spec["triggers"][0]["authenticationRef"] == {"name": "prom"}


def test_hpa_uses_the_adapter_pods_metric():
    objects = render("autoscaling.enabled=true", "autoscaling.targetAverageValue=3")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert "ScaledObject" not in kinds(objects)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "pagedserve_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "3"}
    assert "replicas" not in one(objects, "Deployment")["spec"]
    # The example adapter rule serves that very metric name.
    adapter = yaml.safe_load((CHART / "examples" / "prometheus-adapter.yaml").read_text())
    rule = adapter["rules"]["custom"][0]
    assert re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), "pagedserve:num_requests_waiting") == (
        "pagedserve_num_requests_waiting"
    )


def test_hpa_and_keda_are_mutually_exclusive():
    err = render("keda.enabled=true", "autoscaling.enabled=true", check=False)
    assert "mutually exclusive" in err
    assert "keda.enabled" in err and "autoscaling.enabled" in err


def test_replicas_without_autoscaling():
    assert one(render("replicaCount=3"), "Deployment")["spec"]["replicas"] == 3


@pytest.mark.parametrize(
    "bad",
    ["server.port=0", "dtype=int3", "keda.minReplicaCount=0", "probes.readiness.path=ready", "unknownKey=1",
     "maxQueuedRequests=0", "maxQueuedRequests=-2", "allowUnauthenticated=yes"],
)
def test_schema_rejects_bad_values(bad):
    assert render(bad, check=False), f"{bad} was accepted"


def test_an_ingress_without_an_api_key_is_refused():
    err = render("ingress.enabled=true", check=False)
    assert "without an API key" in err and "apiKey.existingSecret" in err and "allowUnauthenticated=true" in err


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
def test_an_exposed_service_without_an_api_key_is_refused(service_type):
    err = render(f"service.type={service_type}", check=False)
    assert f"service.type={service_type} without an API key" in err and "allowUnauthenticated=true" in err
    assert render(f"service.type={service_type}", "apiKey.existingSecret=llm-api-key")
    assert render(f"service.type={service_type}", "allowUnauthenticated=true")
    assert render("service.type=ClusterIP")  # in-cluster only: no key needed


@pytest.mark.parametrize(
    "sets", [["apiKey.existingSecret=llm-api-key"], ["apiKey.value=s3cret"], ["allowUnauthenticated=true"]]
)
def test_an_ingress_renders_with_a_key_or_when_allowed_unauthenticated(sets):
    objects = render("ingress.enabled=true", *sets)
    one(objects, "Ingress")
    env = {e["name"] for e in container(objects).get("env", [])}
    assert ("PAGEDSERVE_API_KEY" in env) == (sets[0] != "allowUnauthenticated=true")


def test_ci_values_files_render():
    for values in sorted((CHART / "ci").glob("*-values.yaml")):
        cmd = [HELM, "template", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(values)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{values.name}: {proc.stderr}"
