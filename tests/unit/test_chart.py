"""The Helm chart rendered by the real `helm` (lint, template) for the main value combinations, the
rendered objects checked: least-privilege RBAC, the webhook configuration agreeing with
webhook/registration.py, every component's arguments accepted by that component's own settings."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagewarm.config import add_arguments, from_arguments
from localcluster import binaries
from localcluster.chart import CHART, NAMESPACE, RELEASE, HelmError, harness_values, template
from proxy.config import ProxyConfig
from webhook.config import WebhookConfig
from webhook.registration import mutating_webhook_configuration

Objects = list[dict[str, Any]]
HARNESS = harness_values(
    image="docker.io/library/imagewarm:0.1.0",
    certs_root=Path("/tmp/iwk-x/certs.d"),
    cache_root=Path("/tmp/iwk-x/imagewarm-cache"),
    insecure_upstreams=["127.0.0.1:5000", "127.0.0.1:5001"],
)


def render(values: dict[str, Any] | None = None, *args: str) -> Objects:
    return [o for o in yaml.safe_load_all(template(values or {}, *args)) if o]


def one(objects: Objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {[o['kind'] for o in objects]}"
    return found[0]


def kinds(objects: Objects) -> set[str]:
    return {o["kind"] for o in objects}


def container(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = one(objects, kind, name)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def flags(args: list[str], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]


def parse_args(config_class: type[Any], args: list[str], environment: dict[str, str]) -> Any:
    """The container's arguments (after its subcommand) as the program parses them, with the
    kubelet's `$(VAR)` expansion."""
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: environment[m.group(1)], a) for a in args[1:]]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, config_class)
    return from_arguments(config_class, parser.parse_args(expanded), environ={})


def test_helm_lint_passes(tmp_path: Path):
    binaries.ensure((binaries.HELM,))
    for i, values in enumerate(({}, {"mode": "both", "certManager": {"enabled": True}}, HARNESS)):
        path = tmp_path / f"values-{i}.json"
        path.write_text(json.dumps(values))
        argv = [str(binaries.HELM.path("helm")), "lint", "--strict", str(CHART), "--values", str(path)]
        proc = subprocess.run(
            [*argv, "--kube-version", binaries.KUBERNETES_VERSION], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_defaults_install_the_proxy_the_webhook_and_the_controller():
    objects = render()
    assert kinds(objects) == {
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "DaemonSet",
        "Deployment", "Service", "PodDisruptionBudget", "MutatingWebhookConfiguration",
    }  # fmt: skip
    assert not any(o["kind"] == "CustomResourceDefinition" for o in objects)  # crds/ only, never templated
    for o in objects:
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "imagewarm", o["metadata"]["name"]
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"):
            assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]["name"]
        template_labels = ((o.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels")
        if o["kind"] in ("DaemonSet", "Deployment"):
            # The webhook's objectSelector skips pods carrying this label: imagewarm is never rewritten.
            assert template_labels["app.kubernetes.io/part-of"] == "imagewarm"

    webhook = one(objects, "Deployment", "imagewarm-webhook")
    assert webhook["spec"]["replicas"] == 2
    assert webhook["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    spread = webhook["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["maxSkew"] == 1
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == webhook["spec"]["selector"]["matchLabels"]
    service = one(objects, "Service", "imagewarm-webhook")
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}
    ]
    args = container(objects, "Deployment", "imagewarm-webhook")["args"]
    assert not flags(args, "--tls-dir")  # self-managed TLS
    settings = parse_args(WebhookConfig, args, {})
    assert (settings.namespace, settings.service_name) == (NAMESPACE, "imagewarm-webhook")
    assert settings.webhook_config_name == one(objects, "MutatingWebhookConfiguration")["metadata"]["name"]
    assert settings.proxy_prefix == "localhost:7439"
    # Only the registries the proxy serves are rewritten: the others' pods pull from them directly.
    proxy_settings = parse_args(
        ProxyConfig,
        container(objects, "DaemonSet", "imagewarm-proxy")["args"],
        {"HOST_IP": "10.0.0.1", "NODE_NAME": "n1"},
    )
    assert settings.only_registries == {*proxy_settings.upstream, *proxy_settings.insecure_upstream}
    assert settings.only_registries == {"docker.io", "ghcr.io", "quay.io", "registry.k8s.io"}
    assert not flags(container(render({"webhook": {"onlyUpstreams": False}}), "Deployment",
                               "imagewarm-webhook")["args"], "--only-registry")  # fmt: skip
    probe = container(objects, "Deployment", "imagewarm-webhook")["readinessProbe"]["httpGet"]
    assert probe["scheme"] == "HTTPS" and probe["path"] == "/healthz"

    controller = one(objects, "Deployment", "imagewarm-controller")
    assert controller["spec"]["replicas"] == 2
    args = container(objects, "Deployment", "imagewarm-controller")["args"]
    assert args[0] == "controller" and "--leader-elect=true" in args
    assert flags(args, "--leader-election-namespace") == [NAMESPACE] == flags(args, "--namespace")
    assert flags(args, "--metrics-listen") == ["0.0.0.0:8080"]
    # CachedImage sizes: manifests read through the proxies' Service.
    assert flags(args, "--image-proxy") == [f"http://imagewarm-proxy.{NAMESPACE}.svc:7439"]
    off = container(render({"controller": {"imageProxy": "none"}}), "Deployment", "imagewarm-controller")
    assert not flags(off["args"], "--image-proxy")


def test_the_proxy_daemonset_on_real_nodes():
    objects = render()
    daemonset = one(objects, "DaemonSet", "imagewarm-proxy")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]  # every taint, the startup taint too
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }  # fmt: skip
    proxy = container(objects, "DaemonSet", "imagewarm-proxy")
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert proxy["resources"]["requests"]["cpu"] and proxy["resources"]["requests"]["memory"]
    assert proxy["securityContext"]["runAsUser"] == 0
    settings = parse_args(ProxyConfig, proxy["args"], {"NODE_NAME": "node-a", "HOST_IP": "10.0.0.7"})
    assert settings.listen == ("0.0.0.0", 7439)
    assert settings.runtime_name == "localhost:7439"
    assert settings.max_cache_bytes == 20 * 1024**3
    assert settings.node_name == "node-a"
    assert settings.upstream == ("docker.io", "ghcr.io", "quay.io", "registry.k8s.io")
    assert settings.mirror_registry == ()  # rewrite mode
    # The peers' Service: headless, selecting the proxies, its port named `proxy`.
    namespace, name = settings.peers_from
    peers = one(objects, "Service", name)
    assert namespace == NAMESPACE and peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["ports"][0]["name"] == "proxy"
    assert peers["spec"]["selector"] == daemonset["spec"]["selector"]["matchLabels"]
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["cache"]["mountPath"] == str(settings.cache_dir)
    assert volumes["cache"]["hostPath"]["path"] == "/var/lib/imagewarm/cache"
    assert mounts["containerd-hosts"]["mountPath"] == settings.containerd_hosts_dir
    assert volumes["containerd-hosts"]["hostPath"]["path"] == "/etc/containerd/certs.d"
    assert not any("subPathExpr" in m for m in proxy["volumeMounts"])


def test_the_harness_values_give_each_local_node_its_own_address_and_directories():
    objects = render(HARNESS)
    proxy = container(objects, "DaemonSet", "imagewarm-proxy")
    settings = parse_args(ProxyConfig, proxy["args"], {"NODE_NAME": "iw-node-2", "HOST_IP": "10.244.2.1"})
    assert settings.listen == ("10.244.2.1", 7439)
    assert settings.insecure_upstream == ("127.0.0.1:5000", "127.0.0.1:5001") and settings.upstream == ()
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in proxy["env"] if "valueFrom" in e}
    assert env == {"NODE_NAME": "spec.nodeName", "HOST_IP": "status.hostIP"}
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert mounts["cache"]["subPathExpr"] == mounts["containerd-hosts"]["subPathExpr"] == "$(NODE_NAME)"
    volumes = {
        v["name"]: v["hostPath"]["path"]
        for v in one(objects, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
        if "hostPath" in v
    }
    assert volumes == {"cache": "/tmp/iwk-x/imagewarm-cache", "containerd-hosts": "/tmp/iwk-x/certs.d"}
    for kind, name in (("DaemonSet", "imagewarm-proxy"), ("Deployment", "imagewarm-webhook")):
        assert container(objects, kind, name)["image"] == "docker.io/library/imagewarm:0.1.0"
        assert container(objects, kind, name)["imagePullPolicy"] == "Never"


def test_opt_in_rewrites_only_namespaces_labelled_true():
    expressions = one(render({"optIn": True}), "MutatingWebhookConfiguration")["webhooks"][0][
        "namespaceSelector"
    ]["matchExpressions"]
    assert {"key": "imagewarm.io/enabled", "operator": "In", "values": ["true"]} in expressions
    default = one(render(), "MutatingWebhookConfiguration")["webhooks"][0]["namespaceSelector"]
    assert {"key": "imagewarm.io/enabled", "operator": "NotIn", "values": ["false"]} in default[
        "matchExpressions"
    ]


@pytest.mark.parametrize("opt_in", [False, True])
@pytest.mark.parametrize("namespace", [NAMESPACE, "kube-system"])
def test_the_chart_registers_the_webhook_registration_py_builds(opt_in: bool, namespace: str):
    chart = one(render({"optIn": opt_in}, "--namespace", namespace), "MutatingWebhookConfiguration")
    python = mutating_webhook_configuration(
        name=RELEASE, service_name="imagewarm-webhook", namespace=namespace, opt_in=opt_in
    )
    assert chart["webhooks"] == python["webhooks"]
    assert chart["metadata"]["name"] == python["metadata"]["name"]
    assert python["metadata"]["labels"].items() <= chart["metadata"]["labels"].items()
    webhook = chart["webhooks"][0]
    assert (webhook["failurePolicy"], webhook["sideEffects"], webhook["timeoutSeconds"]) == (
        "Ignore",
        "None",
        3,
    )
    assert (webhook["reinvocationPolicy"], webhook["matchPolicy"]) == ("IfNeeded", "Equivalent")
    skipped = webhook["namespaceSelector"]["matchExpressions"][0]
    assert skipped["operator"] == "NotIn" and {"kube-system", namespace} == set(skipped["values"])


def test_mirror_mode_installs_no_webhook_and_mirrors_every_upstream():
    objects = render({"mode": "mirror", "insecureUpstreams": ["registry.corp:5000"]})
    assert not [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "webhook"]
    assert "MutatingWebhookConfiguration" not in kinds(objects)
    assert "PodDisruptionBudget" not in kinds(objects)
    settings = parse_args(
        ProxyConfig,
        container(objects, "DaemonSet", "imagewarm-proxy")["args"],
        {"NODE_NAME": "n", "HOST_IP": "1.2.3.4"},
    )
    assert settings.mirror_registry == (
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "registry.corp:5000",
    )
    assert settings.containerd_hosts_dir == "/etc/containerd/certs.d"


def test_both_modes_install_the_webhook_and_mirror_the_registries_given():
    objects = render({"mode": "both", "mirror": {"registries": ["docker.io"]}})
    assert "MutatingWebhookConfiguration" in kinds(objects)
    args = container(objects, "DaemonSet", "imagewarm-proxy")["args"]
    assert flags(args, "--mirror-registry") == ["docker.io"]


def test_cert_manager_issues_the_webhook_certificate_and_injects_its_ca():
    objects = render({"certManager": {"enabled": True}})
    configuration = one(objects, "MutatingWebhookConfiguration")
    certificate = one(objects, "Certificate")
    assert configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/{certificate['metadata']['name']}"
    )
    assert "caBundle" not in configuration["webhooks"][0]["clientConfig"]
    issuer = one(objects, "Issuer")
    assert issuer["spec"] == {"selfSigned": {}}
    assert certificate["spec"]["issuerRef"] == {"kind": "Issuer", "name": issuer["metadata"]["name"]}
    assert f"imagewarm-webhook.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    webhook = one(objects, "Deployment", "imagewarm-webhook")["spec"]["template"]["spec"]
    [tls_dir] = flags(webhook["containers"][0]["args"], "--tls-dir")
    mount = next(m for m in webhook["containers"][0]["volumeMounts"] if m["mountPath"] == tls_dir)
    volume = next(v for v in webhook["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    # No self-managed TLS: the webhook may neither touch Secrets nor its configuration.
    assert not [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "imagewarm-webhook"]
    webhook_rules = one(objects, "ClusterRole", "imagewarm-webhook")["rules"]
    assert all("mutatingwebhookconfigurations" not in r["resources"] for r in webhook_rules)

    given = render(
        {"certManager": {"enabled": True, "issuerRef": {"kind": "ClusterIssuer", "name": "corp-ca"}}}
    )
    assert "Issuer" not in kinds(given)
    assert one(given, "Certificate")["spec"]["issuerRef"] == {"kind": "ClusterIssuer", "name": "corp-ca"}


def test_service_monitors_and_the_dashboard_only_when_asked():
    assert not {"ServiceMonitor", "ConfigMap"} & kinds(render())
    objects = render({"metrics": {"serviceMonitor": {"enabled": True}, "dashboard": {"enabled": True}}})
    monitors = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"imagewarm-proxy", "imagewarm-webhook", "imagewarm-controller"}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for name, spec in monitors.items():
        ports = [p["name"] for p in services[name]["spec"]["ports"]]
        assert spec["endpoints"][0]["port"] in ports
        assert spec["selector"]["matchLabels"] == services[name]["spec"]["selector"]
    assert monitors["imagewarm-webhook"]["endpoints"][0]["scheme"] == "https"
    mirror = render({"mode": "mirror", "metrics": {"serviceMonitor": {"enabled": True}}})
    assert {o["metadata"]["name"] for o in mirror if o["kind"] == "ServiceMonitor"} == {
        "imagewarm-proxy", "imagewarm-controller",
    }  # fmt: skip
    dashboard = json.loads(one(objects, "ConfigMap")["data"]["imagewarm.json"])
    titles = [p["title"] for p in dashboard["panels"]]
    for wanted in ("hit ratio", "by source", "upstream errors", "webhook decisions", "webhook latency",
                   "reconciles", "queue depth", "agent tasks"):  # fmt: skip
        assert any(wanted in t.lower() for t in titles), (wanted, titles)


def test_every_role_lists_its_verbs_and_none_is_a_wildcard():
    objects = render({"mode": "both", "metrics": {"serviceMonitor": {"enabled": True}}})
    roles = [o for o in objects if o["kind"] in ("Role", "ClusterRole")]
    assert {r["metadata"]["name"] for r in roles} == {
        "imagewarm-proxy",
        "imagewarm-webhook",
        "imagewarm-controller",
    }
    listing = []
    for role in roles:
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                assert "*" not in rule.get(field, []), (role["kind"], role["metadata"]["name"], rule)
            listing.append(f"{role['kind']} {role['metadata']['name']}: {rule['resources']} {rule['verbs']}")
    print("\n".join(listing))  # shown with -s: the chart's whole RBAC, one rule per line

    def rules(kind: str, name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = one(objects, kind, name)["rules"]
        return result

    def verbs(kind: str, name: str, resource: str) -> set[str]:
        return {v for r in rules(kind, name) if resource in r["resources"] for v in r["verbs"]}

    # Nodes read Secrets only in the release namespace, and never list them.
    assert verbs("ClusterRole", "imagewarm-proxy", "secrets") == set()
    assert verbs("Role", "imagewarm-proxy", "secrets") == {"get"}
    assert verbs("ClusterRole", "imagewarm-proxy", "nodes") == {"get", "patch"}
    assert verbs("ClusterRole", "imagewarm-proxy", "nodeimages/status") == {"patch"}
    # The controller gets Secrets jobs name anywhere, but lists and writes only in its namespace.
    assert verbs("ClusterRole", "imagewarm-controller", "secrets") == {"get"}
    assert {"create", "delete"} <= verbs("Role", "imagewarm-controller", "secrets")
    # Self-managed TLS reads and renews one named Secret and its own webhook configuration only.
    named = [r for r in rules("Role", "imagewarm-webhook") if "get" in r["verbs"]]
    assert [r["resourceNames"] for r in named] == [["imagewarm-webhook-tls"]]
    configuration = [
        r
        for r in rules("ClusterRole", "imagewarm-webhook")
        if "mutatingwebhookconfigurations" in r["resources"]
    ]
    assert [r["resourceNames"] for r in configuration] == [["imagewarm"]]
    assert not any(v in verbs("ClusterRole", "imagewarm-webhook", "pods") for v in ("get", "list"))


def test_the_schema_rejects_a_misspelt_key_at_install():
    with pytest.raises(HelmError, match="additional properties 'prxy' not allowed"):
        template({}, "--set", "prxy.x=1")
    with pytest.raises(HelmError, match="maxbytes"):
        template({}, "--set", "proxy.cache.maxbytes=1Gi")
    with pytest.raises(HelmError, match="mode"):
        template({"mode": "mirrors"})
    with pytest.raises(HelmError, match="tagTTL"):
        template({"proxy": {"tagTTL": "five minutes"}})


def test_the_dashboard_queries_only_metrics_the_components_declare():
    import importlib

    from prometheus_client import REGISTRY

    for module in ("proxy.metrics", "webhook.metrics", "controller.metrics"):
        importlib.import_module(module)
    declared = set(REGISTRY._names_to_collectors)  # every sample name: x_total, x_bucket, ...
    dashboard = (CHART / "dashboards" / "imagewarm.json").read_text()
    queried = set(re.findall(r"\bimagewarm_[a-z_]+", dashboard))
    assert queried and queried <= declared, sorted(queried - declared)


def test_a_stopping_webhook_replica_drains_before_it_closes_its_listener():
    deployment = one(render(), "Deployment", f"{RELEASE}-webhook")
    pod = deployment["spec"]["template"]["spec"]
    [webhook] = pod["containers"]
    assert webhook["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    # The grace period covers the drain and gunicorn's 5 s graceful stop.
    assert pod["terminationGracePeriodSeconds"] >= 5 + 5
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    undrained = one(render({"webhook": {"drainSeconds": 0}}), "Deployment", f"{RELEASE}-webhook")
    assert "lifecycle" not in undrained["spec"]["template"]["spec"]["containers"][0]
