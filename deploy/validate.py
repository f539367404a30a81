"""Validates deploy/ offline; run by tests/deploy.rs with the project venv's Python.

- Kubernetes core resources: kubernetes-validate (bundled schemas), strict (no unknown fields).
- Custom resources (KEDA ScaledObject, ServiceMonitor): JSON Schemas of the CRD fields in deploy/schemas.
- docker-compose.yml: the compose-spec JSON Schema (deploy/schemas/compose-spec.json).
- nats/helm-values.yaml: the keys it sets of the official NATS chart, closed (a misspelt key fails).
- The ConfigMap's model configs: printed as `model-config <key> <JSON text>` for tests/deploy.rs.
- Prometheus and Grafana provisioning: YAML structure; the dashboard: JSON with a query per panel.
Prints the jetbatch_* metric names the dashboard queries, one per line after "metrics:".
"""
import json
import pathlib
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

deploy = pathlib.Path(__file__).resolve().parent
schemas = deploy / "schemas"
failures = []


def check(what, fn):
    try:
        fn()
        print(f"ok {what}")
    except Exception as e:  # noqa: BLE001 - report every failure, not just the first
        failures.append(f"{what}: {str(e).splitlines()[0]}")


def load_schema(name):
    return json.loads((schemas / name).read_text())


crd_schemas = {
    "ScaledObject": load_schema("keda-scaledobject.schema.json"),
    "ServiceMonitor": load_schema("servicemonitor.schema.json"),
}

for path in sorted((deploy / "k8s").glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        kind = doc["kind"]
        if kind in crd_schemas:
            check(f"{path.name} {kind}", lambda d=doc, k=kind: jsonschema.validate(d, crd_schemas[k]))
        else:
            check(f"{path.name} {kind}", lambda d=doc: kubernetes_validate.validate(d, "1.37.0", strict=True))

helm_values = yaml.safe_load((deploy / "nats" / "helm-values.yaml").read_text())
check("nats/helm-values.yaml", lambda: jsonschema.validate(helm_values, load_schema("nats-helm-values.schema.json")))

# The model configs the ConfigMap carries (`<name>.jetbatch.toml` keys): tests/deploy.rs parses each
# as the worker does.
model_configs = {}
for doc in yaml.safe_load_all((deploy / "k8s" / "configmap.yaml").read_text()):
    model_configs.update({k: v for k, v in doc.get("data", {}).items() if k.endswith(".jetbatch.toml")})

compose = yaml.safe_load((deploy / "compose" / "docker-compose.yml").read_text())
check("docker-compose.yml", lambda: jsonschema.validate(compose, load_schema("compose-spec.json")))

prom = yaml.safe_load((deploy / "compose" / "prometheus.yml").read_text())
check("prometheus.yml", lambda: [c["static_configs"][0]["targets"] for c in prom["scrape_configs"]])
for p in sorted((deploy / "compose" / "grafana-provisioning").rglob("*.yml")):
    check(p.name, lambda p=p: yaml.safe_load(p.read_text())["apiVersion"])

dashboard = json.loads((deploy / "grafana" / "jetbatch-dashboard.json").read_text())
exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def queries_present():
    for panel in dashboard["panels"]:
        if not panel["targets"] or not all(t["expr"].strip() for t in panel["targets"]):
            raise ValueError(f"panel '{panel['title']}' has no query")


check("dashboard queries", queries_present)
names = sorted({re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bjetbatch_[a-z_]+", e)})

for key, text in sorted(model_configs.items()):
    print(f"model-config {key} {json.dumps(text)}")
print("metrics:")
for n in names:
    print(n)
if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
