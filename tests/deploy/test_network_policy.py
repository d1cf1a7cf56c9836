"""Who can reach which port of the guard's pods, read from the rendered NetworkPolicy with
Kubernetes' own peer semantics (`Peer.admits`): the clients `from` names, the scraper and the
`helm test` pod, and nobody else; the sidecar's classifier port from nowhere.

Before issue 32: setting `networkPolicy.from` (as ci/standalone-operator-values.yaml does) locked
Prometheus and `helm test` out of the guard's port, where /metrics was served by default, so
GuardDown fired on a healthy guard. Now /metrics has a port of its own by default (metricsPort),
which only the scraper reaches; `metricsPort: null` puts it back on the guard's port.
"""

from __future__ import annotations

from dataclasses import dataclass

import helm_python as helm
import kubernetes_validate
import pytest

from tests.deploy import chart

CASES = chart.ci_values()
PORT = chart.chart().values["port"]
METRICS_PORT = chart.chart().values["metricsPort"]
ON_THE_GUARDS_PORT = {"metricsPort": None}
UPSTREAM_PORT = CASES["sidecar-url"]["sidecar"]["upstreamPort"]


@dataclass(frozen=True)
class Pod:
    """A client pod: its namespace (with the label Kubernetes gives every namespace) and labels."""

    namespace: str
    labels: dict[str, str]

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels, and matchExpressions with In/NotIn/Exists/DoesNotExist."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def _peer_admits(peer: dict, pod: Pod, policy_namespace: str) -> bool:
    """A NetworkPolicyPeer: a podSelector alone means the policy's namespace; a namespaceSelector
    alone, every pod there; both, the selected pods of the selected namespaces."""
    assert "ipBlock" not in peer, "pod-to-pod checks only"
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], pod.namespace_labels)
    else:
        in_namespace = pod.namespace == policy_namespace
    return in_namespace and _selects(peer.get("podSelector", {}), pod.labels)


def reachable(manifests: chart.Manifests, pod: Pod) -> set[int]:
    """The ports of the guard's pods that `pod` may connect to (every rule names its ports)."""
    (policy,) = manifests.of_kind("NetworkPolicy")
    namespace = chart.NAMESPACE
    ports: set[int] = set()
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from")
        if not peers or any(_peer_admits(p, pod, namespace) for p in peers):
            ports |= {p["port"] for p in rule["ports"]}
    return ports


def helm_test_pod(manifests: chart.Manifests) -> Pod:
    hook = manifests.one("Pod")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    return Pod(chart.NAMESPACE, hook["metadata"]["labels"])


INGRESS = Pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus-stack"})
NEIGHBOUR = Pod(chart.NAMESPACE, {"app": "batch-job"})
ELSEWHERE = Pod("team-b", {"app": "notebook"})


def render(values: dict) -> chart.Manifests:
    manifests = chart.render(values, "v1.31.0")
    kubernetes_validate.validate(manifests.one("NetworkPolicy"), "1.31.0", strict=True)
    return manifests


def test_with_metrics_on_the_guards_port_the_scraper_and_helm_test_still_reach_it() -> None:
    """ci/standalone-operator-values.yaml (clients from the ingress controller's namespace only),
    with /metrics on the guard's port."""
    manifests = render({**CASES["standalone-operator"], **ON_THE_GUARDS_PORT})
    assert reachable(manifests, INGRESS) == {PORT}
    assert reachable(manifests, PROMETHEUS) == {PORT}  # /metrics is on the guard's port
    assert reachable(manifests, helm_test_pod(manifests)) == {PORT}
    assert reachable(manifests, NEIGHBOUR) == set()
    assert reachable(manifests, ELSEWHERE) == set()


def test_by_default_the_scraper_reaches_only_the_metrics_port_and_clients_only_the_guards() -> None:
    manifests = render(CASES["standalone-operator"])
    assert METRICS_PORT != PORT
    assert reachable(manifests, INGRESS) == {PORT}
    assert reachable(manifests, PROMETHEUS) == {METRICS_PORT}
    assert reachable(manifests, helm_test_pod(manifests)) == {PORT}
    assert reachable(manifests, NEIGHBOUR) == set()
    assert reachable(manifests, ELSEWHERE) == set()


def test_sidecar_defaults_keep_the_classifier_port_closed_and_metrics_to_prometheus() -> None:
    """The sidecar default (no `from`): any client on the guard's port, never the classifier's."""
    shared = render({**CASES["sidecar-url"], **ON_THE_GUARDS_PORT})
    for pod in (INGRESS, PROMETHEUS, NEIGHBOUR, ELSEWHERE, helm_test_pod(shared)):
        assert reachable(shared, pod) == {PORT}, pod
    separate = render(CASES["sidecar-url"])
    assert reachable(separate, PROMETHEUS) == {PORT, METRICS_PORT}
    assert reachable(separate, ELSEWHERE) == {PORT}  # not the metrics port
    assert all(UPSTREAM_PORT not in reachable(separate, p) for p in (INGRESS, PROMETHEUS, NEIGHBOUR, ELSEWHERE))


def test_an_operators_own_prometheus_selector_replaces_the_default() -> None:
    ours = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]
    policy = {**CASES["standalone-operator"]["networkPolicy"], "metricsFrom": ours}
    manifests = render({**CASES["standalone-operator"], "networkPolicy": policy})
    assert reachable(manifests, Pod("observability", {"app": "vmagent"})) == {METRICS_PORT}
    assert reachable(manifests, PROMETHEUS) == set()
    shared = render({**CASES["standalone-operator"], "networkPolicy": policy, **ON_THE_GUARDS_PORT})
    assert reachable(shared, Pod("observability", {"app": "vmagent"})) == {PORT}


def test_a_policy_that_would_open_the_guards_port_to_any_scraper_is_refused() -> None:
    """metricsFrom: [] means any source; with /metrics on a port `from` restricts, that would undo `from`."""
    policy = {**CASES["standalone-operator"]["networkPolicy"], "metricsFrom": []}
    values = {**CASES["standalone-operator"], "networkPolicy": policy}
    with pytest.raises(helm.HelmError, match="networkPolicy.metricsFrom is empty"):
        chart.render({**values, **ON_THE_GUARDS_PORT}, "v1.31.0")
    assert reachable(render(values), ELSEWHERE) == {METRICS_PORT}


def test_the_helm_test_pod_is_not_one_of_the_guards_endpoints() -> None:
    """It carries the release's labels but not the pods' selector, so the Service never routes to it."""
    manifests = render(CASES["standalone-operator"])
    selector = manifests.one("Service")["spec"]["selector"]
    assert not _selects({"matchLabels": selector}, helm_test_pod(manifests).labels)
    pdb = manifests.one("PodDisruptionBudget")["spec"]["selector"]
    assert not _selects(pdb, helm_test_pod(manifests).labels)
