#!/usr/bin/env python3
"""Real Helm (the Helm v4 Go SDK through helm-python-sdk) for the tests.

  helm.py render CHART NAME NAMESPACE KUBE_VERSION
                                        values as JSON on stdin; prints {template: manifest},
                                        rendered for that Kubernetes version (as `helm template
                                        --kube-version` does)
  helm.py lint CHART                    values as JSON on stdin; prints the lint report
  helm.py validate CHART                values as JSON on stdin; exit 1 with the message on failure
  helm.py install CHART NAME NAMESPACE KUBECONFIG
  helm.py upgrade CHART NAME NAMESPACE KUBECONFIG
                                        values as JSON on stdin; installs (creating the namespace)
                                        or upgrades the release on that cluster as `helm install`
                                        / `helm upgrade` do, prints the release summary as JSON
  helm.py uninstall NAME NAMESPACE KUBECONFIG
"""
import json
import sys

from helm_python import _native
from helm_python.chart import Chart, lint
from helm_python.config import Config


def release(cmd: str) -> int:
    """install / upgrade / uninstall against a cluster."""
    if cmd == "uninstall":
        name, namespace, kubeconfig = sys.argv[2:5]
        with Config(kubeconfig_path=kubeconfig, namespace=namespace) as cfg:
            print(json.dumps(cfg.uninstall(name)))
        return 0
    chart, name, namespace, kubeconfig = sys.argv[2:6]
    values = json.loads(sys.stdin.read() or "{}")
    with Config(kubeconfig_path=kubeconfig, namespace=namespace) as cfg:
        if cmd == "install":
            out = cfg.install(chart, name, values, namespace=namespace, create_namespace=True, timeout=120)
        else:
            out = cfg.upgrade(chart, name, values, namespace=namespace, timeout=120)
    print(json.dumps(out))
    return 0


def main() -> int:
    if sys.argv[1] in ("install", "upgrade", "uninstall"):
        return release(sys.argv[1])
    cmd, chart = sys.argv[1], sys.argv[2]
    values = json.loads(sys.stdin.read() or "{}")
    if cmd == "render":
        name, namespace, kube_version = sys.argv[3], sys.argv[4], sys.argv[5]
        loaded = Chart.load(chart)
        # Chart.render() has no kube_version keyword; the native call takes it.
        opts = {"name": name, "namespace": namespace, "is_install": True, "kube_version": kube_version}
        out = json.loads(_native.call_string("helm_render", loaded._raw(), json.dumps(values), json.dumps(opts)))
        # Helm installs crds/ itself before the templates; include them as it would apply them.
        for crd in loaded.crds:
            out[crd["filename"]] = crd["data"]
        print(json.dumps(out))
    elif cmd == "lint":
        # The Kubernetes release to lint for (the chart's kubeVersion must admit it).
        kube_version = sys.argv[3] if len(sys.argv) > 3 else "v1.37.2"
        print(json.dumps(lint(chart, values, strict=True, kube_version=kube_version)))
    elif cmd == "validate":
        try:
            Chart.load(chart).validate_schema(values)
        except Exception as e:  # the SDK's HelmValuesError names the key and constraint
            print(str(e))
            return 1
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
