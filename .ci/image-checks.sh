#!/usr/bin/env bash
# Image tier: build the CPU image and run it the way the Helm chart runs it, on 127.0.0.1 only.
#
#   1. podman + buildah (runc, lowered ulimits, overlay storage), with a Debian bookworm stand-in
#      for the base image, imported under the Dockerfile's FROM name (no registry is reachable).
#   2. podman build of the CPU image (torch from the local CPU wheel).
#   3. podman run WITHOUT --init (kubelet adds none: the server is PID 1), with the container args
#      the chart renders, a read-only root and tmpfs /tmp as in the chart: stopped while the model
#      loads it must exit 0 within 5 s; then /health, /ready, HEALTHCHECK, a chat completion, a
#      streamed one.
#   4. /metrics through `promtool check metrics`; every pagedserve metric that the chart's KEDA
#      query, alerts and dashboard use must be in the scrape.
#   5. A real Prometheus on 127.0.0.1 scraping it with the labels a ServiceMonitor gives, loading
#      the chart's alert rules; the ScaledObject's query evaluated exactly as KEDA does, under a
#      small bounded load (it must rise above the threshold) and after it (it must fall back).
#   6. `podman stop -t <grace>` with a request in flight: /ready turns 503, the request finishes,
#      the container exits 0 well within the grace period (measured, not killed).
#
# Needs root (apt-get, podman). Caches the stand-in base and the container storage under
# ${PAGEDSERVE_CI_CACHE:-~/.cache/pagedserve-ci}; remove that directory to start from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=$ROOT/.tools
WORK=$TOOLS/image-checks
CACHE=${PAGEDSERVE_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pagedserve-ci}
IMAGE=localhost/pagedserve:ci-cpu
CONTAINER=pagedserve-image-checks
PORT=${PAGEDSERVE_CI_PORT:-18765}
PROM_PORT=${PAGEDSERVE_CI_PROM_PORT:-19091}
RELEASE=ci
NAMESPACE=ci
started=$(date +%s)
step() { printf '\n==> [%3ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }
rm -rf "$WORK" && mkdir -p "$WORK" "$CACHE"

# ------------------------------------------------------------------------------------------------
step "tools"
need=()
for cmd in podman buildah runc mmdebstrap promtool prometheus; do command -v "$cmd" >/dev/null || need+=("$cmd"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: podman buildah runc fuse-overlayfs uidmap mmdebstrap prometheus (missing: ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman buildah runc fuse-overlayfs uidmap mmdebstrap prometheus >/dev/null
fi
[ -x "$TOOLS/bin/helm" ] || bash .ci/k8s-checks.sh >/dev/null
HELM=$TOOLS/bin/helm
echo "$(podman --version) | $(buildah --version | cut -d' ' -f1-3) | $(runc --version | head -1) | $($HELM version --short)"

# crun cannot run here (hybrid cgroups, no CAP_SYS_RESOURCE): runc with lowered rlimits, cgroupfs.
mkdir -p "$CACHE/storage" "$CACHE/run"
cat > "$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat > "$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "$CACHE/run"
EOF
export CONTAINERS_CONF=$WORK/containers.conf CONTAINERS_STORAGE_CONF=$WORK/storage.conf

PROM_PID=""
cleanup() {
  [ -n "$PROM_PID" ] && kill "$PROM_PID" 2>/dev/null && wait "$PROM_PID" 2>/dev/null
  podman rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------------
BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -1)
case $BASE in */*) ;; *) BASE=docker.io/library/$BASE ;; esac
if podman image exists "$BASE"; then
  step "stand-in base $BASE: cached"
else
  step "stand-in base $BASE: Debian bookworm rootfs with python3 (mmdebstrap)"
  if [ ! -s "$CACHE/base-bookworm.tar" ]; then
    mmdebstrap --quiet --format=tar --variant=apt --include=python3,python3-venv,ca-certificates \
      --customize-hook='upload /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt' \
      bookworm "$CACHE/base-bookworm.tmp.tar"
    mv "$CACHE/base-bookworm.tmp.tar" "$CACHE/base-bookworm.tar"
  fi
  podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' \
    "$CACHE/base-bookworm.tar" "$BASE" >/dev/null
fi

# ------------------------------------------------------------------------------------------------
step "torch CPU wheel for the build"
mkdir -p "$CACHE/wheels"
python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
  -d "$CACHE/wheels" "torch==2.13.0"
WHEEL=$(cd "$CACHE/wheels" && ls -t torch-2.13.0*.whl | head -1)
echo "$WHEEL"

step "podman build (CPU image)"
build_started=$(date +%s)
podman build --pull=never --network host --format docker --layers \
  -v "$CACHE/wheels:/wheels:ro" --build-arg "TORCH_SPEC=/wheels/$WHEEL" \
  -t "$IMAGE" . > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
echo "built in $(( $(date +%s) - build_started )) s: $(podman image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

# ------------------------------------------------------------------------------------------------
step "render the chart (KEDA on, low threshold, small batch so a queue forms, short drain)"
"$HELM" template "$RELEASE" helm --namespace "$NAMESPACE" \
  --set keda.enabled=true --set keda.threshold=1 --set maxNumSeqs=2 --set maxQueuedRequests=64 \
  --set server.shutdownTimeout=20 --set prometheusRule.enabled=true --set serviceMonitor.enabled=true \
  --set grafanaDashboard.enabled=true > "$WORK/chart.yaml"

python3 - "$WORK/chart.yaml" "$WORK" "$PORT" <<'PY'
"""From the rendered chart: the container args (on loopback), the grace period, the KEDA trigger,
the alert rules, and every pagedserve metric name the chart uses."""
import json, re, sys
import yaml

chart, work, port = sys.argv[1], sys.argv[2], sys.argv[3]
docs = [d for d in yaml.safe_load_all(open(chart)) if d]
by_kind = {d["kind"]: d for d in docs}
dep = by_kind["Deployment"]
pod = dep["spec"]["template"]["spec"]
(c,) = pod["containers"]
args = [a for a in c["args"] if not a.startswith(("--host=", "--port="))] + ["--host=127.0.0.1", f"--port={port}"]
pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
(trigger,) = by_kind["ScaledObject"]["spec"]["triggers"]
svc = by_kind["Service"]["metadata"]["name"]
names = set()
text = json.dumps(docs)
for m in re.finditer(r"pagedserve:([a-z_][a-zA-Z0-9_]*)", text):
    names.add("pagedserve:" + m.group(1))
with open(f"{work}/args", "w") as f:
    f.write("\n".join(args) + "\n")
with open(f"{work}/rules.yaml", "w") as f:
    yaml.safe_dump(by_kind["PrometheusRule"]["spec"], f)
json.dump({
    "grace": pod["terminationGracePeriodSeconds"] - pre_stop,  # podman runs no preStop hook
    "env": {e["name"]: e["value"] for e in c["env"] if "value" in e},
    "query": trigger["metadata"]["query"],
    "threshold": float(trigger["metadata"]["threshold"]),
    "activation": float(trigger["metadata"]["activationThreshold"]),
    "max_replicas": by_kind["ScaledObject"]["spec"]["maxReplicaCount"],
    "job": svc,
    "served": next(a.split("=", 1)[1] for a in args if a.startswith("--served-model-name=")),
    "metrics": sorted(names),
}, open(f"{work}/chart.json", "w"), indent=1)
print("args:", " ".join(args))
print("KEDA query:", trigger["metadata"]["query"], "threshold", trigger["metadata"]["threshold"])
PY
mapfile -t ARGS < "$WORK/args"
GRACE=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["grace"])' "$WORK/chart.json")
JOB=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["job"])' "$WORK/chart.json")
ENV_ARGS=()
ENV_ARGS+=(-e "PAGEDSERVE_HEALTHCHECK_URL=http://127.0.0.1:$PORT/health")
while IFS= read -r kv; do ENV_ARGS+=(-e "$kv"); done < <(python3 -c 'import json,sys; [print(f"{k}={v}") for k,v in json.load(open(sys.argv[1]))["env"].items()]' "$WORK/chart.json")

# ------------------------------------------------------------------------------------------------
step "SIGTERM while the model loads: exit 0 at once (PID 1 drops signals it has no handler for)"
podman rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
podman run -d --name "$CONTAINER" --network host --read-only --tmpfs /tmp --shm-size 1g "${ENV_ARGS[@]}" \
  "$IMAGE" "${ARGS[@]}" 2>&1 >/dev/null | grep -v 'systemd' || true
sleep 1
t0=$(date +%s%N)
podman stop -t 10 "$CONTAINER" >/dev/null
t1=$(date +%s%N)
code=$(podman inspect -f '{{.State.ExitCode}}' "$CONTAINER")
stop_ms=$(( (t1 - t0) / 1000000 ))
echo "stopped during start-up in $stop_ms ms, exit code $code"
if [ "$code" != 0 ] || [ "$stop_ms" -ge 5000 ]; then
  echo "FAILED: a stop during start-up must exit 0 within 5 s (137: SIGKILLed after the grace period, the SIGTERM was ignored)"
  podman logs --tail 30 "$CONTAINER"
  exit 1
fi
podman rm -f -t 0 "$CONTAINER" >/dev/null

step "podman run (no --init; chart args on 127.0.0.1:$PORT)"
podman run -d --name "$CONTAINER" --network host --read-only --tmpfs /tmp --shm-size 1g "${ENV_ARGS[@]}" \
  "$IMAGE" "${ARGS[@]}" 2>&1 >/dev/null | grep -v 'systemd' || true
run_started=$(date +%s)
for _ in $(seq 300); do
  if curl -fsS -m 2 "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; then break; fi
  if [ "$(podman inspect -f '{{.State.Running}}' "$CONTAINER")" != true ]; then podman logs "$CONTAINER" | tail -30; exit 1; fi
  sleep 1
done
curl -fsS -m 2 "http://127.0.0.1:$PORT/ready" >/dev/null || { podman logs "$CONTAINER" | tail -30; exit 1; }
echo "ready $(( $(date +%s) - run_started )) s after start; PID 1: $(tr '\0' ' ' < "/proc/$(podman inspect -f '{{.State.Pid}}' "$CONTAINER")/cmdline")"
podman healthcheck run "$CONTAINER" 2>/dev/null || { echo "HEALTHCHECK failed"; exit 1; }
echo "HEALTHCHECK: healthy"

# ------------------------------------------------------------------------------------------------
step "Prometheus on 127.0.0.1:$PROM_PORT (job=$JOB, namespace=$NAMESPACE, as a ServiceMonitor labels it)"
cat > "$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [rules.yaml]
scrape_configs:
  - job_name: $JOB
    static_configs:
      - targets: ["127.0.0.1:$PORT"]
        labels: {namespace: $NAMESPACE, pod: $JOB-0, service: $JOB}
EOF
promtool check config "$WORK/prometheus.yml" >/dev/null
prometheus --config.file="$WORK/prometheus.yml" --web.listen-address="127.0.0.1:$PROM_PORT" \
  --storage.tsdb.path="$WORK/prom-data" --log.level=warn > "$WORK/prometheus.log" 2>&1 &
PROM_PID=$!

step "HTTP, metrics, KEDA query under load, drain"
python3 - "$WORK/chart.json" "$PORT" "$PROM_PORT" "$CONTAINER" "$GRACE" <<'PY'
import json, math, subprocess, sys, threading, time, urllib.error, urllib.parse, urllib.request

cfg = json.load(open(sys.argv[1]))
port, prom_port, container, grace = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
base = f"http://127.0.0.1:{port}"
prom = f"http://127.0.0.1:{prom_port}"
served = cfg["served"]


def request(path, body=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def chat(max_tokens, stream=False, timeout=120):
    return request("/v1/chat/completions", {
        "model": served, "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream}, timeout)


def check(cond, msg):
    if not cond:
        print("FAILED:", msg)
        print(subprocess.run(["podman", "logs", "--tail", "30", container], capture_output=True, text=True).stderr)
        sys.exit(1)
    print("ok:", msg)


# --- HTTP -------------------------------------------------------------------------------------
status, body = request("/health")
check(status == 200, f"/health {status}")
status, body = request("/v1/models")
check(status == 200 and json.loads(body)["data"][0]["id"] == served, f"/v1/models lists {served}")
status, body = chat(16)
out = json.loads(body)
check(status == 200 and out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 16,
      f"chat completion: {out['usage']}")
status, body = chat(8, stream=True)
lines = [l for l in body.decode().splitlines() if l.startswith("data: ")]
finish = [c.get("finish_reason") for l in lines[:-1] for c in json.loads(l[6:]).get("choices", [])]
check(status == 200 and lines[-1] == "data: [DONE]" and "length" in finish,
      f"streamed chat: {len(lines)} events, finish_reason length, ending in [DONE]")

# --- /metrics -----------------------------------------------------------------------------------
status, metrics = request("/metrics")
check(status == 200, "/metrics 200")
lint = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True)
problems = [l for l in lint.stdout.decode().splitlines() + lint.stderr.decode().splitlines() if l.strip()]
# By design (the vLLM-compatible names dashboards and autoscalers already use): colons in names,
# and iteration_tokens_total, a histogram, as vLLM's. Anything else fails.
accepted = [p for p in problems if "should not contain ':'" in p
            or p.startswith('pagedserve:iteration_tokens_total non-counter metrics should not have "_total" suffix')]
unexpected = [p for p in problems if p not in accepted]
check(not unexpected and lint.returncode in (0, 3),
      f"promtool check metrics: {len(accepted)} accepted lint notes (vLLM-style names), no other problem {unexpected[:5]}")
exposed = set()
for line in metrics.decode().splitlines():
    if line and not line.startswith("#"):
        exposed.add(line.split("{")[0].split(" ")[0])
missing = [m for m in cfg["metrics"] if m not in exposed]
check(not missing, f"all {len(cfg['metrics'])} pagedserve metrics the chart uses are exposed (missing: {missing})")
check(f'pagedserve:num_requests_waiting{{model_name="{served}"}}' in metrics.decode(),
      "num_requests_waiting carries this model's model_name")

# --- Prometheus and the KEDA query --------------------------------------------------------------
def prom_query(q):
    # What KEDA's prometheus scaler sends: GET /api/v1/query?query=...&time=<now>.
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def keda_value():
    """The metric value exactly as KEDA's prometheus scaler derives it (ignoreNullValues: true)."""
    out = prom_query(cfg["query"])
    assert out["status"] == "success", out
    result = out["data"]["result"]
    if out["data"]["resultType"] == "scalar":
        return float(result[1])
    if len(result) == 0:
        return 0.0  # ignoreNullValues
    if len(result) > 1:
        raise RuntimeError(f"KEDA would fail: the query returned {len(result)} elements")
    return float(result[0]["value"][1])


deadline = time.time() + 60
up = None
while time.time() < deadline:
    try:
        res = prom_query(f'up{{job="{cfg["job"]}"}}')["data"]["result"]
        if res and res[0]["value"][1] == "1" and prom_query(cfg["query"])["data"]["result"]:
            up = True
            break
    except (urllib.error.URLError, ConnectionError, KeyError, IndexError):
        pass
    time.sleep(0.5)
check(up, "Prometheus scrapes the server and the KEDA query has a series")
idle = keda_value()
check(idle == 0 and idle <= cfg["activation"], f"idle: KEDA query = {idle} (not active)")
with urllib.request.urlopen(f"{prom}/api/v1/rules", timeout=5) as r:
    rules = [rule for g in json.load(r)["data"]["groups"] for rule in g["rules"]]
check(len(rules) == 4 and all(r["health"] == "ok" for r in rules) and not any(r["state"] == "firing" for r in rules),
      f"Prometheus evaluates the chart's {len(rules)} alert rules, none firing: {[(r['name'], r['state']) for r in rules]}")

N, TOKENS = 12, 192  # bounded: 12 requests, each at most 120 s
results = []
threads = [threading.Thread(target=lambda: results.append(chat(TOKENS, timeout=120)[0])) for _ in range(N)]
t_load = time.time()
for t in threads:
    t.start()
peak, samples = 0.0, []
while any(t.is_alive() for t in threads) and time.time() - t_load < 150:
    v = keda_value()
    samples.append(v)
    peak = max(peak, v)
    time.sleep(0.5)
for t in threads:
    t.join(timeout=5)
load_s = time.time() - t_load
check(results.count(200) == N, f"{N} concurrent requests of {TOKENS} tokens all succeeded in {load_s:.1f} s")
replicas = min(cfg["max_replicas"], math.ceil(peak / cfg["threshold"]))
check(peak > cfg["threshold"],
      f"under load the KEDA query peaked at {peak:g} > threshold {cfg['threshold']:g} (KEDA would ask for {replicas} replicas)")
fell = None
for _ in range(40):
    v = keda_value()
    if v <= cfg["activation"]:
        fell = v
        break
    time.sleep(0.5)
check(fell is not None, f"after the load the KEDA query fell back to {fell}")

# --- Drain: SIGTERM with a request in flight ----------------------------------------------------
stream_result = {}


def long_stream():
    req = urllib.request.Request(base + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": served, "messages": [{"role": "user", "content": "Go on."}],
                                                  "max_tokens": 640, "ignore_eos": True, "stream": True}).encode())
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 1:
                    stream_result["first"] = time.time()
    stream_result["events"] = events


streamer = threading.Thread(target=long_stream)
streamer.start()
while "first" not in stream_result and streamer.is_alive():
    time.sleep(0.02)
t_stop = time.time()
stopper = subprocess.Popen(["podman", "stop", "-t", str(grace), container], stdout=subprocess.DEVNULL)
ready_codes, new_request = set(), None
while stopper.poll() is None:
    try:
        ready_codes.add(request("/ready", timeout=2)[0])
        if new_request is None and 503 in ready_codes:
            new_request = chat(4, timeout=10)[0]
    except (urllib.error.URLError, ConnectionError, OSError):
        pass
    time.sleep(0.05)
stop_s = time.time() - t_stop
streamer.join(timeout=30)
exit_code = subprocess.run(["podman", "inspect", "-f", "{{.State.ExitCode}}", container], capture_output=True, text=True).stdout.strip()
events = stream_result.get("events", [])
finish = None
for e in events:
    if e != "data: [DONE]":
        for ch in json.loads(e[6:]).get("choices", []):
            finish = ch.get("finish_reason") or finish
check(503 in ready_codes, f"/ready answered 503 while draining (saw {sorted(ready_codes)})")
check(new_request == 503, f"a new request while draining got {new_request}")
check(events and events[-1] == "data: [DONE]" and finish == "length",
      f"the in-flight request finished during the drain ({len(events)} events, finish_reason={finish})")
check(exit_code == "0" and stop_s < grace,
      f"podman stop -t {grace}: exited {exit_code} after {stop_s:.1f} s (< {grace} s grace, not killed)")
PY

step "image checks passed"
echo "total $(( $(date +%s) - started )) s"
