#!/usr/bin/env python3
"""Assemble CustomResourceDefinition manifests from unpacked upstream Go modules.

Called by hack/crds.sh, which downloads the modules through the Go module proxy and passes
their directories here. Nothing from upstream is committed in this repo: this script only
reads the module sources (Go string literals holding YAML, and a few struct literals whose
values we pick out with regular expressions) and writes one CRD manifest per kind.

Any upstream layout change makes this script fail loudly rather than guess.
"""

import argparse
import os
import re
import sys

import yaml

# Where each input lives inside its module. Keep in sync with hack/crds-README.md.
KUBEVIRT_VALIDATIONS = "pkg/virt-operator/resource/generate/components/validations_generated.go"
KUBEVIRT_CRDS_GO = "pkg/virt-operator/resource/generate/components/crds.go"
KUBEVIRT_API_GROUP = "core/register.go"
KUBEVIRT_API_REGISTER = "core/v1/register.go"
KUBEVIRT_API_TYPES = "core/v1/types.go"
CDI_CRDS = "pkg/operator/resources/crds_generated.go"
SNAPSHOT_CRD_DIR = "config/crd"

# (output file, Go constructor in crds.go, key in CRDsValidation)
KUBEVIRT_KINDS = [
    ("virtualmachines.kubevirt.io.yaml", "NewVirtualMachineCrd", "virtualmachine"),
    ("virtualmachineinstances.kubevirt.io.yaml", "NewVirtualMachineInstanceCrd", "virtualmachineinstance"),
]
# (output file, key in CDICRDs, expected metadata.name)
CDI_KINDS = [
    ("datavolumes.cdi.kubevirt.io.yaml", "datavolume", "datavolumes.cdi.kubevirt.io"),
]
# (output file = upstream file name, expected metadata.name)
SNAPSHOT_KINDS = [
    ("snapshot.storage.k8s.io_volumesnapshots.yaml", "volumesnapshots.snapshot.storage.k8s.io"),
    ("snapshot.storage.k8s.io_volumesnapshotcontents.yaml", "volumesnapshotcontents.snapshot.storage.k8s.io"),
    ("snapshot.storage.k8s.io_volumesnapshotclasses.yaml", "volumesnapshotclasses.snapshot.storage.k8s.io"),
]

SOURCE_ANNOTATION = "kubevirt-csi/schema-source"


class GenError(Exception):
    pass


def read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise GenError(f"cannot read {path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Go source helpers

_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                   "v": "\v", "\\": "\\", "'": "'", '"': '"'}


def _interpreted(src, i):
    """Parse a Go "..." literal starting at src[i] == '"'. Returns (value, next index)."""
    assert src[i] == '"'
    out = []
    i += 1
    while True:
        if i >= len(src):
            raise GenError("unterminated Go string literal")
        c = src[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\n":
            raise GenError("newline in Go interpreted string literal")
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = src[i + 1]
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
            i += 2
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            out.append(chr(int(src[i + 2:i + 2 + n], 16)))
            i += 2 + n
        elif e in "01234567":
            out.append(chr(int(src[i + 1:i + 4], 8)))
            i += 4
        else:
            raise GenError(f"unknown escape \\{e} in Go string literal")


def go_string_expr(src, i):
    """Parse a Go string expression: literals (raw or interpreted) joined with '+'.

    Generated files write a backtick inside a raw string as `...` + "`" + `...`.
    Returns (value, index after the expression)."""
    parts = []
    while True:
        while src[i] in " \t\r\n":
            i += 1
        if src[i] == "`":
            end = src.index("`", i + 1)
            parts.append(src[i + 1:end])
            i = end + 1
        elif src[i] == '"':
            s, i = _interpreted(src, i)
            parts.append(s)
        else:
            raise GenError(f"expected a Go string literal, found {src[i:i + 20]!r}")
        j = i
        while src[j] in " \t\r\n":
            j += 1
        if src[j] != "+":
            return "".join(parts), i
        i = j + 1


def go_map_string_value(src, key, what):
    """Value of `"key": <string expr>` in a generated map[string]string literal."""
    m = re.search(r'^\s*"' + re.escape(key) + r'":\s*', src, re.MULTILINE)
    if not m:
        raise GenError(f"{what}: no entry {key!r}")
    value, _ = go_string_expr(src, m.end())
    return value


def go_func_body(src, name, what):
    m = re.search(r"^func " + re.escape(name) + r"\(\)[^{]*\{\n", src, re.MULTILINE)
    if not m:
        raise GenError(f"{what}: no func {name}")
    end = src.find("\n}\n", m.end())
    if end < 0:
        raise GenError(f"{what}: cannot find the end of func {name}")
    return src[m.end():end]


def go_string_list(body, field, what):
    m = re.search(field + r":\s*\[\]string\{([^}]*)\}", body)
    if not m:
        raise GenError(f"{what}: no {field} list")
    return [_interpreted(s, 0)[0] for s in re.findall(r'"(?:[^"\\]|\\.)*"', m.group(1))]


def go_one(pattern, body, what, group=1, flags=0):
    m = re.search(pattern, body, flags)
    if not m:
        raise GenError(f"{what}: pattern {pattern!r} not found")
    return m.group(group)


_FIELD = re.compile(r'(\w+):\s*("(?:[^"\\]|\\.)*"|[\w.]+(?:\("(?:[^"\\]|\\.)*"\))?)')


def go_struct_fields(text, consts, what):
    """Fields of a flat Go struct literal: strings, bools, ints, named string constants and
    pointer.P("...")/pointer.String("...")."""
    out = {}
    for name, raw in _FIELD.findall(text):
        if raw.startswith('"'):
            out[name] = _interpreted(raw, 0)[0]
        elif raw in ("true", "false"):
            out[name] = raw == "true"
        elif raw.isdigit():
            out[name] = int(raw)
        elif raw.endswith('")') and "(" in raw:
            out[name] = _interpreted(raw[raw.index("(") + 1:-1], 0)[0]
        elif raw in consts:
            out[name] = consts[raw]
        else:
            raise GenError(f"{what}: cannot evaluate {name}: {raw}")
    return out


def go_brace_items(text):
    """Top-level {...} groups inside text (no nesting expected)."""
    return re.findall(r"\{([^{}]*)\}", text)


# ---------------------------------------------------------------------------------------------
# KubeVirt

def kubevirt_crds(kv_dir, api_dir, kv_ref, api_ref):
    validations = read(os.path.join(kv_dir, KUBEVIRT_VALIDATIONS))
    crds_go = read(os.path.join(kv_dir, KUBEVIRT_CRDS_GO))
    group = go_one(r'const GroupName\s*=\s*"([^"]+)"', read(os.path.join(api_dir, KUBEVIRT_API_GROUP)),
                   KUBEVIRT_API_GROUP)
    register = read(os.path.join(api_dir, KUBEVIRT_API_REGISTER))

    # crds.go's string constants (JSONPaths of printer columns).
    const_block = go_one(r"\nconst \(\n(.*?)\n\)", crds_go, KUBEVIRT_CRDS_GO, flags=re.DOTALL)
    consts = {k: _interpreted(v, 0)[0]
              for k, v in re.findall(r'^\s*(\w+)\s*=\s*("(?:[^"\\]|\\.)*")', const_block, re.MULTILINE)}

    # Versions: newCRDVersions() copies virtv1.ApiSupportedVersions.
    if "copy(versions, virtv1.ApiSupportedVersions)" not in crds_go:
        raise GenError(f"{KUBEVIRT_CRDS_GO}: newCRDVersions no longer copies ApiSupportedVersions")
    sv = go_one(r"ApiSupportedVersions\s*=\s*\[\]extv1\.CustomResourceDefinitionVersion\{(.*?)\n\t\}",
                register, KUBEVIRT_API_REGISTER, flags=re.DOTALL)
    versions = []
    for item in go_brace_items(sv):
        f = go_struct_fields(item, {}, "ApiSupportedVersions")
        v = {"name": f["Name"], "served": f["Served"], "storage": f["Storage"]}
        if f.get("Deprecated"):
            v["deprecated"] = True
            if "DeprecationWarning" in f:
                v["deprecationWarning"] = f["DeprecationWarning"]
        versions.append(v)
    storage = [v["name"] for v in versions if v["storage"]]
    if storage != ["v1"] or not any(v["name"] == "v1" and v["served"] for v in versions):
        raise GenError(f"{KUBEVIRT_API_REGISTER}: expected v1 to be the served storage version, got {versions}")

    app_label = go_one(r'AppLabel\s*(?:string\s*)?=\s*"([^"]+)"', read(os.path.join(api_dir, KUBEVIRT_API_TYPES)),
                       KUBEVIRT_API_TYPES)

    out = {}
    for fname, func, key in KUBEVIRT_KINDS:
        what = f"{KUBEVIRT_CRDS_GO}:{func}"
        body = go_func_body(crds_go, func, KUBEVIRT_CRDS_GO)
        if not re.search(r"Versions:\s*newCRDVersions\(\)", body):
            raise GenError(f"{what}: versions are not newCRDVersions()")
        if not re.search(r"patchValidationForAllVersions\(crd\)", body):
            raise GenError(f"{what}: validation is not applied to all versions")
        gvk = go_one(r"Kind:\s*virtv1\.(\w+)GroupVersionKind\.Kind", body, what)
        kind = go_one(r"\b" + re.escape(gvk) + r'GroupVersionKind\s*=\s*schema\.GroupVersionKind\{[^}]*Kind:\s*"(\w+)"',
                      register, KUBEVIRT_API_REGISTER)
        plural = go_one(r'Plural:\s*"([^"]+)"', body, what)
        singular = go_one(r'Singular:\s*"([^"]+)"', body, what)
        if singular != key:
            raise GenError(f"{what}: singular {singular!r} is not the validation key {key!r}")
        scope = go_one(r'Scope:\s*"([^"]+)"', body, what)
        names = {"kind": kind, "listKind": kind + "List", "plural": plural, "singular": singular}
        if "ShortNames:" in body:
            names["shortNames"] = go_string_list(body, "ShortNames", what)
        if "Categories:" in body:
            names["categories"] = go_string_list(body, "Categories", what)

        columns = []
        cm = re.search(r"\[\]extv1\.CustomResourceColumnDefinition\{(.*?)\n\t\}", body, re.DOTALL)
        if cm:
            for item in go_brace_items(cm.group(1)):
                f = go_struct_fields(item, consts, what + " printer columns")
                col = {"name": f["Name"], "type": f["Type"], "jsonPath": f["JSONPath"]}
                if "Description" in f:
                    col["description"] = f["Description"]
                if f.get("Priority"):
                    col["priority"] = f["Priority"]
                columns.append(col)
        subresources = {}
        if re.search(r"Status:\s*&extv1\.CustomResourceSubresourceStatus\{\}", body):
            subresources["status"] = {}
        if "CustomResourceSubresourceScale" in body:
            raise GenError(f"{what}: scale subresource is not handled")

        schema = yaml.safe_load(go_map_string_value(validations, key, KUBEVIRT_VALIDATIONS))
        if not isinstance(schema, dict) or "openAPIV3Schema" not in schema:
            raise GenError(f"{KUBEVIRT_VALIDATIONS}: {key} is not a CustomResourceValidation")

        crd_versions = []
        for v in versions:
            cv = {"name": v["name"], "served": v["served"], "storage": v["storage"]}
            for k in ("deprecated", "deprecationWarning"):
                if k in v:
                    cv[k] = v[k]
            if columns:
                cv["additionalPrinterColumns"] = columns
            cv["schema"] = schema
            if subresources:
                cv["subresources"] = subresources
            crd_versions.append(cv)

        out[fname] = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {
                "name": f"{plural}.{group}",
                "labels": {app_label: ""},
                "annotations": {SOURCE_ANNOTATION: f"{kv_ref} {KUBEVIRT_VALIDATIONS} + {KUBEVIRT_CRDS_GO}; "
                                                   f"{api_ref} {KUBEVIRT_API_REGISTER}"},
            },
            "spec": {"group": group, "names": names, "scope": scope, "versions": crd_versions},
        }
    return out


# ---------------------------------------------------------------------------------------------
# CDI and external-snapshotter: upstream already has whole CRD documents.

def _clean(crd, expected_name, what, source):
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise GenError(f"{what}: not a CustomResourceDefinition")
    if crd.get("apiVersion") != "apiextensions.k8s.io/v1":
        raise GenError(f"{what}: apiVersion {crd.get('apiVersion')}")
    md = crd.get("metadata") or {}
    if md.get("name") != expected_name:
        raise GenError(f"{what}: metadata.name {md.get('name')!r}, expected {expected_name!r}")
    crd.pop("status", None)  # server-owned; upstream writes an empty one
    if md.get("creationTimestamp") is None:
        md.pop("creationTimestamp", None)
    md.setdefault("annotations", {})[SOURCE_ANNOTATION] = source
    if not any(v.get("storage") for v in crd["spec"]["versions"]):
        raise GenError(f"{what}: no storage version")
    return crd


def cdi_crds(cdi_dir, cdi_ref):
    src = read(os.path.join(cdi_dir, CDI_CRDS))
    out = {}
    for fname, key, name in CDI_KINDS:
        what = f"{CDI_CRDS}:{key}"
        out[fname] = _clean(yaml.safe_load(go_map_string_value(src, key, CDI_CRDS)), name, what,
                            f"{cdi_ref} {CDI_CRDS}")
    return out


def snapshot_crds(snap_dir, snap_ref):
    out = {}
    for fname, name in SNAPSHOT_KINDS:
        rel = f"{SNAPSHOT_CRD_DIR}/{fname}"
        docs = [d for d in yaml.safe_load_all(read(os.path.join(snap_dir, rel))) if d]
        if len(docs) != 1:
            raise GenError(f"{rel}: expected one document, found {len(docs)}")
        out[fname] = _clean(docs[0], name, rel, f"{snap_ref} {rel}")
    return out


# ---------------------------------------------------------------------------------------------
# Output

class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, s):
    # Multi-line descriptions read better as literal blocks; PyYAML falls back to quoting when a
    # string cannot be a block scalar.
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)
_Dumper.ignore_aliases = lambda self, data: True  # versions share one schema dict: write it out each time


def dump(crd, header):
    return header + yaml.dump(crd, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                              width=1 << 30, allow_unicode=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kubevirt", required=True, help="dir of kubevirt.io/kubevirt")
    ap.add_argument("--kubevirt-ref", required=True)
    ap.add_argument("--kubevirt-api", required=True, help="dir of kubevirt.io/api")
    ap.add_argument("--kubevirt-api-ref", required=True)
    ap.add_argument("--cdi", required=True, help="dir of kubevirt.io/containerized-data-importer")
    ap.add_argument("--cdi-ref", required=True)
    ap.add_argument("--snapshotter", required=True, help="dir of external-snapshotter/client/v8")
    ap.add_argument("--snapshotter-ref", required=True)
    a = ap.parse_args()

    try:
        crds = {}
        crds.update(kubevirt_crds(a.kubevirt, a.kubevirt_api, a.kubevirt_ref, a.kubevirt_api_ref))
        crds.update(cdi_crds(a.cdi, a.cdi_ref))
        crds.update(snapshot_crds(a.snapshotter, a.snapshotter_ref))
    except GenError as e:
        print(f"crds_gen.py: {e}", file=sys.stderr)
        return 1

    os.makedirs(a.out, exist_ok=True)
    for fname, crd in crds.items():
        header = (f"# Generated by hack/crds.sh from {crd['metadata']['annotations'][SOURCE_ANNOTATION]}.\n"
                  "# Not committed: regenerate instead of editing.\n")
        text = dump(crd, header)
        # Round-trip check: what we wrote parses back to the same object.
        if yaml.safe_load(text) != crd:
            print(f"crds_gen.py: {fname} does not round-trip", file=sys.stderr)
            return 1
        with open(os.path.join(a.out, fname), "w", encoding="utf-8") as f:
            f.write(text)
        print(fname)
    return 0


if __name__ == "__main__":
    sys.exit(main())
