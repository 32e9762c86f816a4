"""The Dockerfile and .dockerignore, read as text: what the image promises without building it.

Building and running the image is .ci/image-checks.sh's job (it needs a container engine).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def last_stage() -> list[tuple[str, str]]:
    ins = instructions()
    start = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[start:]


def test_entrypoint_is_exec_form_so_the_server_gets_sigterm():
    (entry,) = [v for k, v in last_stage() if k == "ENTRYPOINT"]
    assert json.loads(entry) == ["pagedserve", "serve"]
    (cmd,) = [v for k, v in last_stage() if k == "CMD"]
    args = json.loads(cmd)
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == "8000"


def test_runs_as_a_numeric_non_root_user():
    users = [v for k, v in last_stage() if k == "USER"]
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it


def test_healthcheck_exposed_port_and_cache_volume():
    stage = last_stage()
    (health,) = [v for k, v in stage if k == "HEALTHCHECK"]
    assert "PAGEDSERVE_HEALTHCHECK_URL" in health and "curl" not in health
    assert "PAGEDSERVE_HEALTHCHECK_URL=http://127.0.0.1:8000/health" in " ".join(v for k, v in stage if k == "ENV")
    assert ("EXPOSE", "8000") in stage
    env = " ".join(v for k, v in stage if k == "ENV")
    assert "HF_HOME=/data/hf" in env
    assert any(k == "VOLUME" and "/data/hf" in v for k, v in stage)


def test_cpu_by_default_cuda_by_build_argument():
    ins = instructions()
    assert ins[0][0] == "ARG" and ins[0][1].startswith("BASE_IMAGE=python:3.11")
    args = {v.split("=")[0] for k, v in ins if k == "ARG"}
    assert {"BASE_IMAGE", "DEVICE", "TORCH_SPEC", "TORCH_INDEX_URL"} <= args
    assert len([1 for k, _ in ins if k == "FROM"]) >= 2  # multi-stage


def test_demo_model_is_baked_in():
    assert "pagedserve make-demo-model /opt/pagedserve/demo-model" in DOCKERFILE
    assert "chmod -R a+rX /opt/pagedserve" in DOCKERFILE  # built as root, read by uid 1000
    env = " ".join(v for k, v in last_stage() if k == "ENV")
    assert "PAGEDSERVE_HOME=/opt/pagedserve" in env  # where ensure_demo_model() looks


def test_builds_with_older_builders():
    # Features that the BuildKit-less builders (buildah 1.28, docker 20.10) reject.
    assert not DOCKERFILE.startswith("# syntax=")
    assert "<<" not in DOCKERFILE
    assert "--link" not in DOCKERFILE


def test_dockerignore_keeps_the_context_small():
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[0] == "*" or "*" in ignore
    for needed in ("!pyproject.toml", "!README.md", "!server/", "!kernels/"):
        assert needed in ignore


def test_cli_starts_with_runtime_dependencies_only():
    """The image installs `pip install .` (no extras): the CLI and the server must not import test or
    bench extras when they start, or `pagedserve make-demo-model` fails during the image build and
    `pagedserve serve` fails in the container."""
    import subprocess
    import sys
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {re.split(r"[<>=!~\[ ;]", d)[0].lower().replace("-", "_") for d in project["dependencies"]}
    extras = {
        re.split(r"[<>=!~\[ ;]", d)[0].lower().replace("-", "_")
        for deps in project.get("optional-dependencies", {}).values()
        for d in deps
    } - runtime
    code = (
        "import sys\n"
        f"for name in {sorted(extras)!r}: sys.modules[name] = None\n"
        "from server.cli import build_parser\n"
        "import server.api.serve, server.api.app\n"
        "build_parser().parse_args(['serve', '--help'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    # --help exits 0 after printing the serve flags
    assert proc.returncode == 0 and "--served-model-name" in proc.stdout, (
        f"`pagedserve serve --help` needs an optional extra ({sorted(extras)}):\n{proc.stderr[-2000:]}"
    )
