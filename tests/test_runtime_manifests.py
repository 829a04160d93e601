"""The runtime's manifests: ClusterServingRuntimes (launcher in `command`, flags only in `args`, probes on
the health endpoint, KServe's environment), the example LocalModelCache + InferenceService, the
kustomization (rendered with `kubectl kustomize` where kubectl is on PATH), and Dockerfile.runtime."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from localmodel.layout import storage_key
from runtime import args as vargs
from tests.test_crds import validate

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "manifests" / "runtime"
SINGLE = FOLDER / "clusterservingruntime.yaml"
MULTI = FOLDER / "clusterservingruntime-multinode.yaml"
EXAMPLE = FOLDER / "example.yaml"


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(path: Path) -> dict[str, Any]:
    (doc,) = load(path)
    return doc


def container(doc: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any]
    (c,) = doc["spec"]["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


@pytest.mark.parametrize("path", [SINGLE, MULTI])
def test_runtime_is_a_cluster_serving_runtime_with_the_launcher_as_command(path: Path) -> None:
    doc = one(path)
    assert doc["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert doc["kind"] == "ClusterServingRuntime"
    assert {"name": "huggingface", "version": "1"}.items() <= doc["spec"]["supportedModelFormats"][0].items()
    c = container(doc)
    assert c["name"] == "kserve-container"
    assert c["command"] == ["modelcache", "serve"]
    # args are flags only (no script): the InferenceService's args append and merge with them
    parsed = vargs.parse(c["args"])
    assert parsed.positionals == ()
    keys = [f.key for f in parsed.flags]
    assert keys == ["--served-model-name", "--model-dir", "--port"]
    assert vargs.value(parsed.flags, "--model_dir") == "/mnt/models"
    assert vargs.value(parsed.flags, "--model_name") == "{{.Name}}"
    port = int(vargs.value(parsed.flags, "--http_port") or 0)
    assert port == 8080
    assert [p["containerPort"] for p in c["ports"]] == [port]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": port}, probe
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1800
    assert env_of(c)["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", c["image"]) and not c["image"].endswith(":latest")


def test_user_args_merge_with_the_runtime_args() -> None:
    runtime_args = container(one(SINGLE))["args"]
    service = load(EXAMPLE)[1]
    user = service["spec"]["predictor"]["model"]["args"]
    merged = vargs.merge_argv(runtime_args, user, ["--http_port", "9000"])
    assert merged.count("--port") == 1 and merged[merged.index("--port") + 1] == "9000"
    assert merged[merged.index("--max-model-len") + 1] == "8192"


def test_multinode_runtime_has_a_worker_that_joins_the_head() -> None:
    doc = one(MULTI)
    worker = doc["spec"]["workerSpec"]
    assert worker["pipelineParallelSize"] >= 1 and worker["tensorParallelSize"] >= 1
    (w,) = worker["containers"]
    assert w["command"] == ["modelcache", "serve", "--worker"]
    assert vargs.parse(w["args"]).positionals == ()
    assert vargs.value(vargs.parse(w["args"]).flags, "--model-dir") == "/mnt/models"
    env = env_of(w)
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # KServe's controller sets these; the manifest must not pin them
    for name in ("HEAD_SVC", "RAY_NODE_COUNT", "TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE"):
        assert name not in env and name not in env_of(container(doc))
    # a worker serves no HTTP: no probes that would read /health
    assert not {"readinessProbe", "livenessProbe"} & set(w)
    assert w["image"] == container(doc)["image"]


def test_runtimes_share_one_image() -> None:
    images = {container(one(p))["image"] for p in (SINGLE, MULTI)}
    assert len(images) == 1
    kustomization = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
    (image,) = images
    name, tag = image.rsplit(":", 1)
    assert kustomization["images"] == [{"name": name, "newTag": tag}]


def test_example_cache_and_inference_service() -> None:
    docs = load(EXAMPLE)
    caches = [d for d in docs if d["kind"] == "LocalModelCache"]
    services = [d for d in docs if d["kind"] == "InferenceService"]
    assert len(caches) == len(services) == 2
    for cache, svc in zip(caches, services, strict=True):
        assert validate(cache) == []  # the project's own CRD schema and CEL rules
        assert svc["apiVersion"] == "serving.kserve.io/v1beta1"
        group = svc["metadata"]["annotations"]["serving.kserve.io/nodegroup"]
        assert group in cache["spec"]["nodeGroups"]
        model = svc["spec"]["predictor"]["model"]
        if "workerSpec" in svc["spec"]["predictor"]:
            # the cache's claim for the group, at the model's folder in it (docs/commands.md: Serving)
            key = storage_key(cache["spec"]["sourceModelUri"])
            assert model["storageUri"] == f"pvc://{cache['metadata']['name']}-{group}/models/{key}"
        else:
            assert model["storageUri"] == cache["spec"]["sourceModelUri"]
        assert model["runtime"] in {one(SINGLE)["metadata"]["name"], one(MULTI)["metadata"]["name"]}
        assert vargs.parse(model["args"]).positionals == ()
    multi = services[1]
    assert multi["spec"]["predictor"]["model"]["runtime"] == one(MULTI)["metadata"]["name"]
    assert multi["spec"]["predictor"]["workerSpec"]["tensorParallelSize"] == 8


def test_kustomization_lists_the_runtimes() -> None:
    k = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted([SINGLE.name, MULTI.name])
    for name in k["resources"]:
        assert (FOLDER / name).is_file()


def test_kubectl_kustomize_renders() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    done = subprocess.run([kubectl, "kustomize", str(FOLDER)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert sorted(d["metadata"]["name"] for d in docs) == ["modelcache-vllm", "modelcache-vllm-multinode"]
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/name"] == "modelcache"
        assert container(d)["command"] == ["modelcache", "serve"]


# -- Dockerfile.runtime -------------------------------------------------------------------------


def test_dockerfile_pins_vllm_and_has_no_entrypoint() -> None:
    text = (ROOT / "Dockerfile.runtime").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms, "no FROM"
    base = froms[-1]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", base), base
    assert not re.search(r"^\s*ENTRYPOINT", text, re.MULTILINE) or re.search(
        r"^\s*ENTRYPOINT\s+\[\]", text, re.MULTILINE
    )
    assert "--no-deps" in text
    # the image tag of the runtimes names the same vLLM release
    version = base.split(":v", 1)[1].split("@")[0]
    assert container(one(SINGLE))["image"].endswith(f"-vllm{version}")


# -- opt-in by default (issue 17 §1) ------------------------------------------------------------

# KServe's own Hugging Face runtimes, as config/runtimes/kserve-huggingfaceserver.yaml (priority 1) and
# kserve-huggingfaceserver-multinode.yaml (priority 2) declare them, both autoSelect: true
# (kserve/kserve aaac4e294dae, lines 12-15 of each file).
KSERVE_PRIORITY = {"kserve-huggingfaceserver": 1, "kserve-huggingfaceserver-multinode": 2}
DEFAULT_COMPONENT = FOLDER / "as-default"


def _format(doc: dict[str, Any]) -> dict[str, Any]:
    fmt: dict[str, Any]
    (fmt,) = [f for f in doc["spec"]["supportedModelFormats"] if f["name"] == "huggingface"]
    return fmt


@pytest.mark.parametrize("path", [SINGLE, MULTI])
def test_runtime_is_opt_in_so_it_takes_no_inference_service_over(path: Path) -> None:
    # KServe picks the runtime for an InferenceService without `runtime:` among the auto-selected ones
    # only (predictor_model.go GetSupportingRuntimes): with autoSelect off, only a service naming ours
    # reaches it.
    assert _format(one(path))["autoSelect"] is False


def test_priorities_are_ready_to_be_the_default_without_colliding() -> None:
    # servingruntime_webhook.go validateServingRuntimePriority refuses two auto-selected runtimes of
    # one format with the same priority; ours are above KServe's and apart from each other.
    ours = [_format(one(p))["priority"] for p in (SINGLE, MULTI)]
    assert len(set(ours) | set(KSERVE_PRIORITY.values())) == 4
    assert ours[0] > KSERVE_PRIORITY["kserve-huggingfaceserver"]
    assert ours[1] > KSERVE_PRIORITY["kserve-huggingfaceserver-multinode"]


def test_as_default_component_turns_auto_select_on(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    # kustomize wants relative paths and refuses a root inside a visited one: a folder of its own.
    here = tmp_path / "site"
    here.mkdir()
    (here / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(FOLDER, here)],
                "components": [os.path.relpath(DEFAULT_COMPONENT, here)],
            }
        )
    )
    done = subprocess.run([kubectl, "kustomize", str(here)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(done.stdout) if d}
    assert {n: (_format(d)["autoSelect"], _format(d)["priority"]) for n, d in docs.items()} == {
        "modelcache-vllm": (True, _format(one(SINGLE))["priority"]),
        "modelcache-vllm-multinode": (True, _format(one(MULTI))["priority"]),
    }


def test_dockerfile_runs_as_a_numeric_non_root_user_with_a_writable_home() -> None:
    from tests.test_dockerfiles import parse

    steps = parse(ROOT / "Dockerfile.runtime")
    users = [s.args for s in steps if s.op == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0))
    last_user = max(i for i, s in enumerate(steps) if s.op == "USER")
    assert not [s for s in steps[last_user:] if s.op == "RUN"]  # nothing after USER needs root
    # caches go under HOME, which any user can write (the model folder is read-only)
    home = next(s.args for s in steps if s.op == "ENV" and "HOME=" in s.args)
    assert re.search(r"\bHOME=(\S+)", home)[1] == "/tmp"  # type: ignore[index]
    # the runtimes run as the image's user
    for path in (SINGLE, MULTI):
        context = container(one(path)).get("securityContext", {})
        assert str(context.get("runAsUser", uid)) == uid, path.name


# -- KServe's InferenceService validation (issue 17 §5) -----------------------------------------

# kserve/kserve aaac4e294dae pkg/apis/serving/v1beta1/inference_service_validation.go, and the constants it
# reads (pkg/constants/constants.go, pkg/validation/env_policy.go).
ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # IsvcNameFmt, line 46; matched at 469-474
AUTOSCALER_CLASSES = {"hpa", "external", "keda", "none"}  # AutoscalerAllowedClassList, constants.go:279-284
GPU_TYPES = {
    "nvidia.com/gpu",
    "amd.com/gpu",
    "intel.com/gpu",
    "habana.ai/gaudi",
}  # DefaultGPUResourceTypeList
BLOCKED_ENV = {"PYTHONPATH"}  # DefaultBlockedEnvVars, env_policy.go:25-27


def _unknown_gpu(resources: dict[str, Any]) -> bool:
    names = {*resources.get("limits", {}), *resources.get("requests", {})}
    return any("gpu" in n and n not in GPU_TYPES and not n.startswith("nvidia.com/mig") for n in names)


def kserve_isvc_errors(isvc: dict[str, Any]) -> list[str]:
    """What KServe's validating webhook refuses an InferenceService for, as validateInferenceService
    (lines 119-181) checks it: the name (469-474), the autoscaler class (477-491), blocked variables
    (302-354) and, with a workerSpec, validateMultiNodeVariables (386-443)."""
    errors = []
    name = isvc["metadata"]["name"]
    annotations = isvc["metadata"].get("annotations", {})
    predictor = isvc["spec"]["predictor"]
    model = predictor.get("model", {})
    if not ISVC_NAME.fullmatch(name):
        errors.append("name")
    autoscaler = annotations.get("serving.kserve.io/autoscalerClass")
    if autoscaler is not None and autoscaler not in AUTOSCALER_CLASSES:
        errors.append("autoscaler class")
    for c in [
        model,
        *predictor.get("containers", []),
        *predictor.get("workerSpec", {}).get("containers", []),
    ]:
        if {e["name"] for e in c.get("env", [])} & BLOCKED_ENV:
            errors.append("blocked env")
    worker = predictor.get("workerSpec")
    if worker is not None:
        if len(worker.get("containers", [])) > 1:  # 388-390
            errors.append("several worker containers")
        env = {e["name"] for e in model.get("env", [])}
        if {"PIPELINE_PARALLEL_SIZE", "TENSOR_PARALLEL_SIZE"} & env:  # 392-397
            errors.append("parallel sizes in env")
        if _unknown_gpu(model.get("resources", {})):  # 399-405
            errors.append("unknown GPU type")
        uri = model.get("storageUri")
        if uri is None:  # 406-407 MissingStorageURI
            errors.append("no storageUri")
        elif uri.split("://")[0] not in ("pvc", "oci"):  # 409-412
            errors.append(f"storage protocol {uri.split('://')[0]}")
        if annotations.get("serving.kserve.io/autoscalerClass") != "none":  # 415-417
            errors.append("autoscaler not none")
        for size in ("pipelineParallelSize", "tensorParallelSize"):  # 420-428
            if size in worker and worker[size] < 1:
                errors.append(size)
        if any(_unknown_gpu(c.get("resources", {})) for c in worker.get("containers", [])):  # 430-440
            errors.append("unknown worker GPU type")
        if _unknown_gpu(worker.get("resources", {})):
            errors.append("unknown worker GPU type")
    return errors


def test_example_passes_kserves_inference_service_validation() -> None:
    services = [d for d in load(EXAMPLE) if d["kind"] == "InferenceService"]
    assert [kserve_isvc_errors(s) for s in services] == [[], []]
    assert any("workerSpec" in s["spec"]["predictor"] for s in services)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            lambda s: s["spec"]["predictor"]["model"].update(
                storageUri="hf://meta-llama/Llama-3.1-70B-Instruct"
            ),
            "storage protocol hf",
        ),
        (
            lambda s: s["metadata"]["annotations"].pop("serving.kserve.io/autoscalerClass"),
            "autoscaler not none",
        ),
        (
            lambda s: s["spec"]["predictor"]["model"].update(
                env=[{"name": "TENSOR_PARALLEL_SIZE", "value": "8"}]
            ),
            "parallel sizes in env",
        ),
        (
            lambda s: s["spec"]["predictor"]["workerSpec"].update(pipelineParallelSize=0),
            "pipelineParallelSize",
        ),
    ],
)
def test_the_validation_rules_refuse_what_kserve_refuses(change: Any, error: str) -> None:
    # the example as it was (hf:// with a workerSpec, no autoscalerClass) is refused by the same rules
    import copy

    multi = copy.deepcopy(
        next(d for d in load(EXAMPLE) if "workerSpec" in d.get("spec", {}).get("predictor", {}))
    )
    change(multi)
    assert error in kserve_isvc_errors(multi)


def test_multinode_example_plans_with_kserves_environment(tmp_path: Path) -> None:
    """The multi-node example's numbers, through the launcher with the environment KServe's
    controller computes for them (computeRayNodeAndGPUs: 16 GPUs, workers of 8, so 2 nodes and a head
    of 8): TP 8 x PP 2 over 2 nodes, one stage per node."""
    from runtime.cli import build
    from tests.test_runtime_kserve import make

    multi = next(d for d in load(EXAMPLE) if "workerSpec" in d.get("spec", {}).get("predictor", {}))
    worker = multi["spec"]["predictor"]["workerSpec"]
    tp, pp = worker["tensorParallelSize"], worker["pipelineParallelSize"]
    per_node = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    nodes = (tp * pp + per_node - 1) // per_node
    env = {
        "PATH": "/nonexistent",
        "TENSOR_PARALLEL_SIZE": str(tp),
        "PIPELINE_PARALLEL_SIZE": str(pp),
        "RAY_NODE_COUNT": str(nodes),
        "REQUEST_GPU_COUNT": str(tp * pp - per_node * (nodes - 1)),
        "MODEL_NAME": multi["metadata"]["name"],
    }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "num_hidden_layers": 80,
    }
    folder = make(tmp_path / "mnt" / "models", config)
    runtime_args = container(one(MULTI))["args"]
    argv = [
        a.replace("{{.Name}}", multi["metadata"]["name"]).replace("/mnt/models", str(folder))
        for a in runtime_args
    ]
    launch = build(
        [*argv, *multi["spec"]["predictor"]["model"]["args"], "--dry-run"],
        env,
        gpus=lambda _e: None,
        vllm_here=lambda: False,
    )
    assert (launch.plan.tensor_parallel_size, launch.plan.pipeline_parallel_size, launch.plan.nodes) == (
        8,
        2,
        2,
    )
    assert launch.role == "head" and launch.plan.executor == "ray"
    assert vargs.value(vargs.parse(list(launch.command[3:])).flags, "--served-model-name") == "llama-3-1-70b"


def _kserve_pod(svc: dict[str, Any], role: str) -> dict[str, Any]:
    """A pod of the multi-node example as KServe makes it: the service's annotations copied, the
    pvc:// storageUri's claim mounted read-only at /mnt/models with the path after the claim as subPath
    (storage_initializer_injector.go), in the service's namespace, created by a ReplicaSet."""
    uri = svc["spec"]["predictor"]["model"]["storageUri"]
    claim, _, sub = uri.removeprefix("pvc://").partition("/")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{svc['metadata']['name']}-predictor-{role}-abc",
            "namespace": svc["metadata"]["namespace"],
            "annotations": dict(svc["metadata"]["annotations"]),
            "labels": {"serving.kserve.io/inferenceservice": svc["metadata"]["name"]},
        },
        "spec": {
            "containers": [
                {
                    "name": "kserve-container" if role == "head" else "worker-container",
                    "image": "modelcache-vllm",
                    "volumeMounts": [
                        {
                            "name": "kserve-pvc-source",
                            "mountPath": "/mnt/models",
                            "subPath": sub,
                            "readOnly": True,
                        }
                    ],
                }
            ],
            "volumes": [
                {"name": "kserve-pvc-source", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
            ],
        },
    }


def _apply(doc: dict[str, Any], patch: Any) -> dict[str, Any]:
    """RFC 6902 add/remove on object keys and list indexes (what the pod webhook emits)."""
    import copy

    out = copy.deepcopy(doc)
    for op in patch:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        at: Any = out
        for part in parents:
            at = at[int(part)] if isinstance(at, list) else at[part]
        key: Any = int(last) if isinstance(at, list) else last
        if op["op"] == "remove":
            del at[key]
        else:
            assert op["op"] == "add", op
            at[key] = op["value"]
    return out


def test_multinode_example_pods_pass_the_pod_webhook_and_the_serving_mounts_policy() -> None:
    """The example's head and worker pods, through the pod webhook's decision (controller.admission)
    and then, patched, through the rendered modelcache-serving-mounts policy, as the API server runs
    them (mutating webhooks before validating policies)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (it renders the policy)")
    import copy

    from controller.admission import place_pod, pod_ask
    from controller.labels import model_label
    from controller.serving import claim_body
    from localmodel.resources import LocalModelCache, LocalModelNodeGroup, Node
    from tests.test_admission_policies import admit, policies
    from tests.test_admission_policies import request as admission_request
    from tests.test_controller_reconcile import group as group_doc

    docs = load(EXAMPLE)
    svc = next(d for d in docs if "workerSpec" in d.get("spec", {}).get("predictor", {}))
    cache = LocalModelCache.from_json(
        next(d for d in docs if d["kind"] == "LocalModelCache" and d["metadata"]["name"] in str(svc))
    )
    group = LocalModelNodeGroup.from_json(group_doc("gpu-nvme", "2Ti"))
    ready = [Node("gpu-1", {"gpu": "gpu-nvme", model_label(cache.spec.storage_key): "ready"})]
    policy = policies()["modelcache-serving-mounts"]

    def admitted(pod: dict[str, Any]) -> tuple[bool, list[str]]:
        # the webhook looks the cache up only when the pod names one (controller.webhook)
        named = cache if pod_ask(pod).cache == cache.name else None
        verdict = place_pod(pod, cache=named, group=group, ready_nodes=ready)
        if not verdict.allowed:
            return False, [verdict.message]
        patched = _apply(pod, verdict.patch)
        user = "system:serviceaccount:kube-system:replicaset-controller"
        denied = admit(
            policy,
            admission_request(
                "CREATE", "pods", user=user, name=pod["metadata"]["name"], namespace="default", obj=patched
            ),
            params=[claim_body(cache, group, "default")],  # our claims in the pod's namespace
        )
        return not denied, denied

    for role in ("head", "worker"):
        pod = _kserve_pod(svc, role)
        ok, why = admitted(pod)
        assert ok, (role, why)
        # the check can fail: the same pod without the model annotation is denied by the policy
        bare = copy.deepcopy(pod)
        del bare["metadata"]["annotations"]["modelcache.io/model"]
        ok, why = admitted(bare)
        assert not ok and any("subPath" in w for w in why), why
