"""Renders deploy/kubernetes (its kustomization's resources) and checks that
the pieces fit: selectors match pod labels, services reach named ports,
probes hit the gateway's health routes, every `serve` flag exists (checked
against `gigafactory serve --help`), every secret key is one the
kustomization documents, every volume mount has a volume, GPU nodes ask for
GPUs, and pods may drain before they are killed.

Usage: check_manifests.py DIR SERVE_HELP_FILE. Prints a JSON summary;
exits non-zero with every problem found."""

import json
import re
import sys
from pathlib import Path

import yaml

SECRET = "gigafactory"
SECRET_KEYS = {"store-url", "admin-token", "cluster-secret"}


def main():
    root, help_file = Path(sys.argv[1]), Path(sys.argv[2])
    flags = set(re.findall(r"--([a-z][a-z0-9-]*)", help_file.read_text()))
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((root / resource).read_text()) if d]
    problems = []
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for secret_key in SECRET_KEYS:
        if f"--from-literal={secret_key}=" not in (root / "kustomization.yaml").read_text():
            problems.append(f"the kustomization does not document secret key {secret_key}")

    for w in workloads:
        name = f'{w["kind"]} {w["metadata"]["name"]}'
        spec, pod = w["spec"], w["spec"]["template"]
        labels = pod["metadata"]["labels"]
        for k, v in spec["selector"]["matchLabels"].items():
            if labels.get(k) != v:
                problems.append(f"{name}: selector {k}={v} does not match its pods")
        if w["kind"] == "StatefulSet":
            if spec["serviceName"] not in services:
                problems.append(f"{name}: serviceName {spec['serviceName']} is no Service")
            resources = pod["spec"]["containers"][0].get("resources", {})
            if "nvidia.com/gpu" not in resources.get("limits", {}):
                problems.append(f"{name}: GPU nodes must request nvidia.com/gpu")
            if not pod["spec"].get("nodeSelector"):
                problems.append(f"{name}: GPU nodes need a node selector")
        volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
        volumes |= {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
        grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        for c in pod["spec"]["containers"]:
            args = c.get("args", [])
            if args[:1] != ["serve"]:
                problems.append(f"{name}: the container does not run `serve`")
            env = {e["name"]: e for e in c.get("env", [])}
            for arg in args[1:]:
                flag = re.match(r"--([a-z0-9-]+)", arg)
                if not flag or flag.group(1) not in flags:
                    problems.append(f"{name}: `{arg}` is not a `gigafactory serve` flag")
                for var in re.findall(r"\$\((\w+)\)", arg):
                    if var not in env:
                        problems.append(f"{name}: `{arg}` uses $({var}), which is not set")
                drain = re.match(r"--drain-secs=(\d+)", arg)
                if drain and int(drain.group(1)) >= grace:
                    problems.append(f"{name}: --drain-secs {drain.group(1)} is not under the grace period {grace}")
            for e in env.values():
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and (ref["name"] != SECRET or ref["key"] not in SECRET_KEYS):
                    problems.append(f"{name}: env {e['name']} reads {ref}, not a documented secret key")
                if e["name"].startswith("GIGAFACTORY_"):
                    flag = e["name"][len("GIGAFACTORY_"):].lower().replace("_", "-")
                    if flag not in flags:
                        problems.append(f"{name}: {e['name']} matches no `serve` flag")
            ports = {p["name"] for p in c.get("ports", [])}
            for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                got = c.get(probe, {}).get("httpGet", {})
                if got.get("path") != path or got.get("port") not in ports:
                    problems.append(f"{name}: {probe} must GET {path} on a named port")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{name}: mount {m['name']} has no volume")

    for s in services.values():
        selector = s["spec"]["selector"]
        matched = [
            w for w in workloads
            if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())
        ]
        if not matched:
            problems.append(f"Service {s['metadata']['name']} selects no pods")
        for p in s["spec"]["ports"]:
            for w in matched:
                names = {q["name"] for c in w["spec"]["template"]["spec"]["containers"] for q in c.get("ports", [])}
                if p["targetPort"] not in names:
                    problems.append(f"Service {s['metadata']['name']}: no port {p['targetPort']} in {w['metadata']['name']}")

    print(json.dumps({"resources": len(docs), "workloads": len(workloads), "services": len(services), "problems": problems}))
    sys.exit(1 if problems else 0)


main()
