"""Regenerate tests/schemas/kuberay-<version>/ from a KubeRay git checkout.

tests/test_manifests.py validates the manifests against the CRDs of the KubeRay releases that
docs/scheduling.md names (the floor and the newest release). Only what validation needs is kept:
the `v1` openAPIV3Schema of each CRD without `status` and descriptions, so a file stays small and
loads fast.

    git clone https://github.com/ray-project/kuberay
    python tests/schemas/vendor_kuberay_crds.py kuberay v1.6.0:rayclusters,rayjobs v1.7.0:rayclusters,rayjobs,raycronjobs
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CRD_PATH = "ray-operator/config/crd/bases/ray.io_{plural}.yaml"
HERE = Path(__file__).resolve().parent


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def vendor(repo: Path, tag: str, plural: str) -> Path:
    path = CRD_PATH.format(plural=plural)
    text = subprocess.run(["git", "-C", str(repo), "show", f"{tag}:{path}"], check=True,
                          capture_output=True, text=True).stdout
    blob = subprocess.run(["git", "-C", str(repo), "rev-parse", f"{tag}:{path}"], check=True,
                          capture_output=True, text=True).stdout.strip()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    del schema["properties"]["status"]
    out = {"source": {"repository": "https://github.com/ray-project/kuberay", "tag": tag, "path": path,
                      "blob": blob},
           "kind": crd["spec"]["names"]["kind"],
           "openAPIV3Schema": schema}
    target = HERE / f"kuberay-{tag.removeprefix('v')}" / f"{plural}.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")
    return target


if __name__ == "__main__":
    checkout = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        tag, plurals = spec.split(":")
        for plural in plurals.split(","):
            print(vendor(checkout, tag, plural))
