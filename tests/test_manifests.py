"""manifests/: every kustomization renders with ``kubectl kustomize``, validates
against the Kubernetes schemas (kubernetes-validate, offline), and keeps the
contracts the CLI and the compiled pipelines rely on: object names and keys,
the placement ConfigMap, RBAC consistency, labels, no credentials committed.

Overlays are discovered by listing ``manifests/overlays``: a new overlay is
tested without editing this file.
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the `test` extra installs kubernetes-validate")

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
BASE = MANIFESTS / "base"
CREDENTIALS = MANIFESTS / "credentials"
EXAMPLES = MANIFESTS / "examples"
OVERLAYS = sorted(p for p in (MANIFESTS / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KUSTOMIZATIONS = [BASE, *OVERLAYS]
#: the newest Kubernetes version kubernetes-validate ships schemas for
K8S_VERSION = kubernetes_validate.latest_version()

PART_OF = ("app.kubernetes.io/part-of", "lm-compose")
SUBMITTER = "lmcompose-submitter"
PLACEHOLDER = "REPLACE_ME"
#: overlays that pin GPU tasks to particular nodes, and the selector they must produce
GPU_SELECTORS = {
    "gke-a100": {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"},
    "nvidia-gpu-operator": {"nvidia.com/gpu.present": "true"},
}
AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}(?![A-Z0-9])")
AWS_SECRET = re.compile(r"(?i)aws_secret_access_key\W{0,3}[=:]\s*['\"]?(?!REPLACE_ME)[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])")


def _id(path: Path) -> str:
    return f"{path.relative_to(MANIFESTS)}@k8s-{K8S_VERSION}"


def _kubectl() -> str:
    exe = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
    if exe is None:
        pytest.fail("kubectl is not installed: these tests render manifests/ with `kubectl kustomize` "
                    "(the project's machines have it at /usr/bin/kubectl)")
    return exe


@functools.lru_cache(maxsize=None)
def _render_text(path: str) -> str:
    proc = subprocess.run([_kubectl(), "kustomize", path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return proc.stdout


def render(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render_text(str(path))) if d is not None]


def find(objects: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


def validate(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')} "
                    f"is not valid Kubernetes {K8S_VERSION}: {exc.message}")


@pytest.fixture(scope="module")
def credentials_render(tmp_path_factory) -> list[dict]:
    """manifests/credentials rendered the way a user does: the example copied to s3-credentials.env."""
    work = tmp_path_factory.mktemp("credentials") / "credentials"
    shutil.copytree(CREDENTIALS, work, ignore=shutil.ignore_patterns("s3-credentials.env"))
    shutil.copy(work / "s3-credentials.env.example", work / "s3-credentials.env")
    return [d for d in yaml.safe_load_all(_render_text(str(work))) if d is not None]


def test_overlays_present_and_built_on_base():
    assert len(OVERLAYS) >= 3, f"expected at least 3 overlays, found {[p.name for p in OVERLAYS]}"
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        assert "../../base" in kustomization.get("resources", []), f"{overlay.name} does not build on ../../base"
    assert set(GPU_SELECTORS) <= {p.name for p in OVERLAYS}


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=_id)
def test_renders_and_validates(path):
    objects = render(path)
    kinds = {o["kind"] for o in objects}
    assert {"ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= kinds, kinds
    namespaces = {o["metadata"].get("namespace") for o in objects}
    assert len(namespaces) == 1 and None not in namespaces, f"objects must share one namespace, got {namespaces}"
    for obj in objects:
        validate(obj)


def test_validation_rejects_a_broken_object():
    """The schema check is real: a ConfigMap with a misspelt field fails strict validation."""
    obj = dict(find(render(BASE), "ConfigMap", "lmcompose-store"))
    obj["datta"] = obj.pop("data")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=_id)
def test_every_object_carries_the_project_label(path):
    for obj in render(path):
        labels = obj["metadata"].get("labels") or {}
        assert labels.get(PART_OF[0]) == PART_OF[1], f"{obj['kind']}/{obj['metadata']['name']} lacks {PART_OF[0]}"


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=_id)
def test_no_secret_in_a_rendered_overlay(path):
    """A rendered overlay doubles as the CLI's --placement file: it must never hold credentials."""
    assert not [o for o in render(path) if o["kind"] == "Secret"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=_id)
def test_store_config_map(path, tmp_path):
    from pipelines.builder import STORE_CONFIG_KEYS
    from shared.cluster import STORE_CONFIG_MAP, STORE_KEY, load_store_uri

    store = find(render(path), "ConfigMap", STORE_CONFIG_MAP)
    data = store["data"]
    assert set(STORE_CONFIG_KEYS) | {STORE_KEY} <= set(data), sorted(data)
    assert re.fullmatch(r"s3://[^/]+/\S+", data[STORE_KEY]), data[STORE_KEY]
    assert re.fullmatch(r"https?://[a-z0-9.-]+(:\d+)?/?", data["AWS_ENDPOINT_URL"]), data["AWS_ENDPOINT_URL"]
    assert data["AWS_REGION"]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(_render_text(str(path)))
    assert load_store_uri(rendered) == data[STORE_KEY]


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=_id)
def test_placement_loads_and_validates(path, tmp_path):
    """`kubectl kustomize <overlay> > placement.yaml` is a valid --placement file for the CLI."""
    from shared.cluster import PLACEMENT_CONFIG_MAP, PLACEMENT_KEY, load_placement, merge_cluster

    objects = render(path)
    assert PLACEMENT_KEY in find(objects, "ConfigMap", PLACEMENT_CONFIG_MAP)["data"]
    rendered = tmp_path / "placement.yaml"
    rendered.write_text(_render_text(str(path)))
    block = load_placement(rendered)
    assert isinstance(block, dict) and "tolerations" in block
    cluster = merge_cluster(block)
    # the objects the placement names are the ones the manifests provide
    find(objects, "ConfigMap", cluster.store_config_map)
    assert cluster.s3_secret == "lmcompose-s3-credentials"
    # GPU tasks tolerate the usual GPU taint
    assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in cluster.tolerations)
    expected = GPU_SELECTORS.get(path.name, {})
    assert cluster.node_selector == expected


def test_gpu_overlay_placement_reaches_the_compiled_pipeline(tmp_path):
    """End to end: an overlay's node selector and the manifests' object names land on the compiled tasks.

    One overlay only (a compile takes seconds); test_placement_loads_and_validates covers the others.
    """
    name = "gke-a100"
    from pipelines.builder import S3_SECRET_KEYS, STORE_CONFIG_KEYS
    from pipelines.cli import main
    from shared.cluster import load_store_uri

    overlay = MANIFESTS / "overlays" / name
    rendered = tmp_path / "placement.yaml"
    rendered.write_text(_render_text(str(overlay)))
    store_cm = find(render(overlay), "ConfigMap", "lmcompose-store")
    out = tmp_path / "pipeline.yaml"
    # the demo's 135M model runs on CPU nodes by default; ask for GPUs so the GPU overlay applies
    raw = yaml.safe_load((ROOT / "pipelines" / "experiments" / "demo.yaml").read_text())
    spec = tmp_path / "demo-gpu.yaml"
    spec.write_text(yaml.safe_dump({**raw, "cluster": {**(raw.get("cluster") or {}), "accelerator": "gpu"}}))
    assert main(["compile", str(spec), "--placement", str(rendered), "--store", load_store_uri(rendered),
                 "-o", str(out)]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    selectors = [e["nodeSelector"]["labels"] for e in executors.values() if "nodeSelector" in e]
    assert selectors, "no task got the overlay's node selector"
    assert all(s == GPU_SELECTORS[name] for s in selectors), selectors
    for executor in executors.values():
        (secret,) = executor["secretAsEnv"]
        assert secret["secretNameParameter"]["runtimeValue"]["constant"] == "lmcompose-s3-credentials"
        assert {k["secretKey"] for k in secret["keyToEnv"]} == set(S3_SECRET_KEYS)
        (config_map,) = executor["configMapAsEnv"]
        assert config_map["configMapNameParameter"]["runtimeValue"]["constant"] == store_cm["metadata"]["name"]
        assert {k["configMapKey"] for k in config_map["keyToEnv"]} == set(STORE_CONFIG_KEYS) <= set(store_cm["data"])


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=_id)
def test_rbac_is_consistent(path):
    objects = render(path)
    account = find(objects, "ServiceAccount", SUBMITTER)
    role = find(objects, "Role", SUBMITTER)
    binding = find(objects, "RoleBinding", SUBMITTER)
    namespace = account["metadata"]["namespace"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    for subject in binding["subjects"]:
        assert subject["kind"] == "ServiceAccount"
        # the subject is the account of this render, in its namespace (kustomize must rewrite it per overlay)
        find(objects, "ServiceAccount", subject["name"])
        assert subject["namespace"] == namespace, f"RoleBinding names {subject['namespace']}, account is in {namespace}"
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    for needed in [("experiments", "create"), ("experiments", "list"), ("runs", "create"), ("runs", "get")]:
        assert ("pipelines.kubeflow.org", *needed) in granted, f"submitter cannot {needed[1]} {needed[0]}"
    # least privilege: no wildcards, no Secrets, no pods or workflows
    assert not any("*" in part for grant in granted for part in grant), granted
    assert not any(r in {"secrets", "pods", "workflows"} for _, r, _ in granted), granted
    for rule in role["rules"]:
        if "" in rule["apiGroups"]:
            assert rule.get("resourceNames"), "core-group access must be limited to named objects"


def test_credentials_render_placeholders_only(credentials_render):
    from pipelines.builder import S3_SECRET_KEYS
    from shared.cluster import ClusterConfig

    (secret,) = credentials_render
    validate(secret)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == ClusterConfig().s3_secret
    assert secret["metadata"]["labels"].get(PART_OF[0]) == PART_OF[1]
    assert "namespace" not in secret["metadata"], "the credentials go to the overlay's namespace with -n"
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(values) == set(S3_SECRET_KEYS)
    assert all(v == PLACEHOLDER for v in values.values()), "the committed template must hold placeholders only"


def test_credentials_come_from_the_local_env_file(tmp_path):
    """The real keys are read from s3-credentials.env; without that file nothing renders."""
    work = tmp_path / "credentials"
    shutil.copytree(CREDENTIALS, work, ignore=shutil.ignore_patterns("s3-credentials.env"))
    proc = subprocess.run([_kubectl(), "kustomize", str(work)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "s3-credentials.env" in proc.stderr
    (work / "s3-credentials.env").write_text("AWS_ACCESS_KEY_ID=test-key-id\nAWS_SECRET_ACCESS_KEY=test-secret\n")
    (secret,) = [d for d in yaml.safe_load_all(_render_text(str(work))) if d]
    assert secret["metadata"]["name"] == "lmcompose-s3-credentials", "no hash suffix: tasks reference the name"
    assert base64.b64decode(secret["data"]["AWS_SECRET_ACCESS_KEY"]).decode() == "test-secret"


def _committed_files() -> list[Path]:
    proc = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "manifests"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:  # not a git checkout: every file but the local credentials
        return [p for p in MANIFESTS.rglob("*") if p.is_file() and p.name != "s3-credentials.env"]
    return [ROOT / line for line in proc.stdout.splitlines() if (ROOT / line).is_file()]


def test_no_aws_key_in_committed_files():
    files = _committed_files()
    assert MANIFESTS / "credentials" / "s3-credentials.env.example" in files
    assert not [f for f in files if f.name == "s3-credentials.env"], "the real credentials file must never be committed"
    for path in files:
        text = path.read_text(errors="replace")
        assert not AWS_KEY_ID.search(text), f"{path}: looks like an AWS access key id"
        assert not AWS_SECRET.search(text), f"{path}: looks like an AWS secret access key"
    # the patterns do catch keys (AWS's documented example key)
    assert AWS_KEY_ID.search("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE")
    assert AWS_SECRET.search("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


def test_example_submit_job_matches_the_manifests():
    from shared.cluster import PLACEMENT_CONFIG_MAP, STORE_CONFIG_MAP, ClusterConfig

    (job,) = [d for d in yaml.safe_load_all((EXAMPLES / "submit-job.yaml").read_text()) if d]
    validate(job)
    pod = job["spec"]["template"]["spec"]
    base = render(BASE)
    find(base, "ServiceAccount", pod["serviceAccountName"])
    (container,) = pod["containers"]
    refs = {(k, v["name"]) for src in container["envFrom"] for k, v in src.items()}
    # the store (URI, endpoint, region) and its credentials: submit writes the study's plan there for the report
    assert refs == {("configMapRef", STORE_CONFIG_MAP), ("secretRef", ClusterConfig().s3_secret)}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["placement"]["configMap"]["name"] == PLACEMENT_CONFIG_MAP
    find(base, "ConfigMap", PLACEMENT_CONFIG_MAP)
    (token,) = volumes["kfp-token"]["projected"]["sources"]
    assert token["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["kfp-token"]
    assert env["KF_PIPELINES_SA_TOKEN_PATH"] == f"{mount}/{token['serviceAccountToken']['path']}"
