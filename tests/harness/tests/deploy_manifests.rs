//! The deploy/ manifests: every kustomization renders with the pinned kubectl, every
//! rendered object passes a real kube-apiserver's validation and admission (server-side
//! dry run, with the KubeVirt, CDI and snapshot CRDs installed), the flags they pass are
//! accepted by the binaries they start, and the controller's waits stay inside the
//! sidecars' deadlines. A missing tool or binary fails the test; nothing is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};

use kubevirt_csi_harness::cluster::ControlPlane;
use kubevirt_csi_harness::crds;
use kubevirt_csi_harness::tools::{Tools, repo_root, script_env, workspace_bin};

/// Every kustomization someone applies, relative to the repository root.
const KUSTOMIZATIONS: &[&str] = &[
    "deploy/base",
    "deploy/overlays/split/guest",
    "deploy/overlays/split/infra",
    "deploy/overlays/tenant",
    "deploy/overlays/tenant/infra",
    "deploy/example",
];

/// What the controller needs after its own wait ends: one API round trip to clean up or
/// read the final state, and the answer to the sidecar.
const ANSWER_MARGIN: Duration = Duration::from_secs(5);

struct Rendered {
    dir: &'static str,
    yaml: String,
    objects: Vec<Value>,
}

impl Rendered {
    fn find(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{} renders no {kind} {name}", self.dir))
    }

    fn kinds(&self) -> BTreeSet<String> {
        self.objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

fn kubectl() -> PathBuf {
    Tools::locate().unwrap_or_else(|e| panic!("{e}")).kubectl
}

fn render(kubectl: &Path, dir: &'static str) -> Rendered {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(repo_root().join(dir))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", kubectl.display()));
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("kustomize output is UTF-8");
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{dir} renders invalid YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect();
    assert!(!objects.is_empty(), "{dir} renders no objects");
    Rendered { dir, yaml, objects }
}

fn render_all() -> Vec<Rendered> {
    let kubectl = kubectl();
    KUSTOMIZATIONS.iter().map(|d| render(&kubectl, d)).collect()
}

fn rendered<'a>(all: &'a [Rendered], dir: &str) -> &'a Rendered {
    all.iter()
        .find(|r| r.dir == dir)
        .expect("listed in KUSTOMIZATIONS")
}

fn containers(workload: &Value) -> &Vec<Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("a pod template with containers")
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    containers(workload)
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {}", workload["metadata"]["name"]))
}

fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// `--flag=value` → value, for the one occurrence of `--flag`.
fn flag(c: &Value, name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    let mut found = args(c)
        .into_iter()
        .filter_map(|a| a.strip_prefix(&prefix).map(str::to_string));
    let first = found.next();
    assert!(
        found.next().is_none(),
        "--{name} given twice to {}",
        c["name"]
    );
    first
}

fn duration(s: &str) -> Duration {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split]
        .parse()
        .unwrap_or_else(|_| panic!("{s:?} is no duration"));
    match &s[split..] {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        unit => panic!("{s:?}: unexpected unit {unit:?}"),
    }
}

/// The image's tag: `registry/name:tag` → `tag`.
fn tag(c: &Value) -> &str {
    let image = c["image"].as_str().expect("an image");
    image
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("{image} has no tag"))
}

/// A pinned version from hack/lib.sh (`NAME="${NAME:-vX.Y.Z}"`).
fn lib_sh_pin(name: &str) -> String {
    let text = std::fs::read_to_string(repo_root().join("hack/lib.sh")).expect("hack/lib.sh");
    let prefix = format!("{name}=\"${{{name}:-");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&prefix)?
                .strip_suffix("}\"")
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("hack/lib.sh pins no {name}"))
}

#[test]
fn every_kustomization_renders_what_its_layout_needs() {
    let all = render_all();

    // Guest side: the driver, the node plugin, and the sidecars' guest identity.
    for dir in [
        "deploy/base",
        "deploy/overlays/split/guest",
        "deploy/overlays/tenant",
    ] {
        let r = rendered(&all, dir);
        let driver = &r.find("CSIDriver", "csi.kubevirt.io")["spec"];
        assert_eq!(driver["attachRequired"], true, "{dir}");
        assert_eq!(driver["podInfoOnMount"], true, "{dir}");
        assert_eq!(driver["fsGroupPolicy"], "File", "{dir}");

        let ds = r.find("DaemonSet", "kubevirt-csi-node");
        let pod = &ds["spec"]["template"]["spec"];
        let node = container(ds, "kubevirt-csi-node");
        assert_eq!(node["securityContext"]["privileged"], true);
        assert!(args(node).contains(&"--endpoint=unix:///csi/csi.sock".to_string()));
        assert_eq!(flag(node, "node-name").as_deref(), Some("$(NODE_NAME)"));
        let env = node["env"].as_array().expect("node env");
        assert!(
            env.iter().any(|e| e["name"] == "NODE_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
            "NODE_NAME must come from the downward API"
        );
        let mounts = node["volumeMounts"].as_array().expect("mounts");
        let kubelet = mounts
            .iter()
            .find(|m| m["mountPath"] == "/var/lib/kubelet")
            .expect("the kubelet dir is mounted");
        assert_eq!(kubelet["mountPropagation"], "Bidirectional");
        let host_path = |vol: &str| {
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == vol)
                .and_then(|v| v["hostPath"]["path"].as_str())
                .unwrap_or_else(|| panic!("no hostPath volume {vol}"))
                .to_string()
        };
        let mounted = |path: &str| {
            mounts
                .iter()
                .find(|m| m["mountPath"] == path)
                .and_then(|m| m["name"].as_str())
                .unwrap_or_else(|| panic!("nothing mounted at {path}"))
        };
        assert_eq!(host_path(mounted("/dev")), "/dev");
        assert_eq!(
            host_path(mounted("/csi")),
            "/var/lib/kubelet/plugins/csi.kubevirt.io"
        );
        let registrar = container(ds, "node-driver-registrar");
        assert_eq!(
            flag(registrar, "kubelet-registration-path").as_deref(),
            Some("/var/lib/kubelet/plugins/csi.kubevirt.io/csi.sock")
        );
        container(ds, "liveness-probe");

        r.find("ServiceAccount", "kubevirt-csi-controller");
        for sidecar in ["provisioner", "attacher", "resizer", "snapshotter"] {
            r.find("ClusterRole", &format!("kubevirt-csi-{sidecar}"));
            let binding = r.find("ClusterRoleBinding", &format!("kubevirt-csi-{sidecar}"));
            assert_eq!(
                binding["subjects"][0],
                json!({"kind": "ServiceAccount", "name": "kubevirt-csi-controller", "namespace": "kubevirt-csi"})
            );
        }
        let node_role = r.find("ClusterRole", "kubevirt-csi-node");
        assert_eq!(
            node_role["rules"],
            json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]),
            "the node plugin reads its own Node and nothing else"
        );
    }

    // Infra side: exactly the Role in deploy/infra/role.yaml (the one the tests run the
    // controller with), bound in the tenant's infra namespace only.
    let role_yaml: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/infra/role.yaml")).unwrap(),
    )
    .unwrap();
    for (dir, ns) in [
        ("deploy/overlays/split/infra", "clusters-example"),
        ("deploy/overlays/tenant/infra", "tenant-example"),
    ] {
        let r = rendered(&all, dir);
        let role = r.find("Role", "kubevirt-csi-controller");
        assert_eq!(
            role["rules"], role_yaml["rules"],
            "{dir}: the infra Role drifted"
        );
        assert_eq!(role["metadata"]["namespace"], ns);
        let binding = r.find("RoleBinding", "kubevirt-csi-controller");
        assert_eq!(
            binding["subjects"][0],
            json!({"kind": "ServiceAccount", "name": "kubevirt-csi-controller", "namespace": ns})
        );
        assert!(
            !r.kinds().contains("ClusterRoleBinding"),
            "{dir}: infra access is namespaced"
        );
    }

    // Split: the plugin uses the pod's infra identity; every guest-facing sidecar gets
    // the guest kubeconfig.
    let split = rendered(&all, "deploy/overlays/split/infra");
    let deploy = split.find("Deployment", "kubevirt-csi-controller");
    assert_eq!(deploy["metadata"]["namespace"], "clusters-example");
    let plugin = container(deploy, "kubevirt-csi-controller");
    assert_eq!(flag(plugin, "infra-kubeconfig"), None);
    assert!(
        plugin["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "INFRA_NAMESPACE"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"),
        "split: the infra namespace is the pod's own"
    );
    for sidecar in [
        "csi-provisioner",
        "csi-attacher",
        "csi-resizer",
        "csi-snapshotter",
    ] {
        let c = container(deploy, sidecar);
        assert_eq!(
            flag(c, "kubeconfig").as_deref(),
            Some("/etc/kubevirt-csi/guest/kubeconfig"),
            "split: {sidecar} must talk to the guest"
        );
        assert_eq!(
            flag(c, "leader-election-namespace").as_deref(),
            Some("kubevirt-csi")
        );
    }

    // Tenant: the plugin gets the infra kubeconfig; the sidecars use in-cluster config.
    let tenant = rendered(&all, "deploy/overlays/tenant");
    let deploy = tenant.find("Deployment", "kubevirt-csi-controller");
    assert_eq!(deploy["metadata"]["namespace"], "kubevirt-csi");
    let plugin = container(deploy, "kubevirt-csi-controller");
    assert_eq!(
        flag(plugin, "infra-kubeconfig").as_deref(),
        Some("/etc/kubevirt-csi/infra/kubeconfig")
    );
    for sidecar in [
        "csi-provisioner",
        "csi-attacher",
        "csi-resizer",
        "csi-snapshotter",
    ] {
        assert_eq!(
            flag(container(deploy, sidecar), "kubeconfig"),
            None,
            "tenant: {sidecar}"
        );
    }

    // Both: the config file parses as the controller's (camelCase, no unknown keys).
    for r in [split, tenant] {
        let cm = r
            .objects
            .iter()
            .find(|o| {
                o["kind"] == "ConfigMap"
                    && o["metadata"]["name"]
                        .as_str()
                        .unwrap()
                        .starts_with("kubevirt-csi-controller-config")
            })
            .expect("the controller ConfigMap");
        let cfg: Value = serde_yaml::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
        let keys: BTreeSet<&str> = cfg
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["snapshotClasses", "storageClassEnforcement"])
        );
        assert!(
            flag(
                container(
                    r.find("Deployment", "kubevirt-csi-controller"),
                    "kubevirt-csi-controller"
                ),
                "tenant-label"
            )
            .is_some()
        );
    }

    // Probes reach a port that some container of the pod serves; a named port resolves
    // only among the probed container's own ports (kubelet fails the probe otherwise).
    for r in &all {
        for w in r
            .objects
            .iter()
            .filter(|o| o["kind"] == "Deployment" || o["kind"] == "DaemonSet")
        {
            let served: Vec<&Value> = containers(w)
                .iter()
                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                .collect();
            for c in containers(w) {
                let Some(port) = c["livenessProbe"]["httpGet"].get("port") else {
                    continue;
                };
                let ok = match port {
                    Value::String(name) => c["ports"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["name"] == *name)),
                    n => served.iter().any(|p| p["containerPort"] == *n),
                };
                assert!(
                    ok,
                    "{}: {}'s probe port {port} is served by nobody",
                    r.dir, c["name"]
                );
            }
        }
    }

    let example = rendered(&all, "deploy/example");
    let sc = example.find("StorageClass", "kubevirt-standard");
    assert_eq!(sc["provisioner"], "csi.kubevirt.io");
    assert_eq!(sc["allowVolumeExpansion"], true);
    assert!(sc["parameters"]["infraStorageClassName"].is_string());
    assert!(sc["parameters"]["bus"].is_string());
    assert_eq!(
        example.find("VolumeSnapshotClass", "kubevirt-snapshots")["driver"],
        "csi.kubevirt.io"
    );
    let pvc = example.find("PersistentVolumeClaim", "kubevirt-csi-example");
    assert_eq!(pvc["spec"]["storageClassName"], "kubevirt-standard");
    let pod = example.find("Pod", "kubevirt-csi-example");
    assert_eq!(
        pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "kubevirt-csi-example"
    );
}

#[test]
fn controller_waits_stay_inside_sidecar_timeouts() {
    let all = render_all();
    for dir in ["deploy/overlays/split/infra", "deploy/overlays/tenant"] {
        let deploy = rendered(&all, dir).find("Deployment", "kubevirt-csi-controller");
        let plugin = container(deploy, "kubevirt-csi-controller");
        let wait = |name: &str| {
            duration(
                &flag(plugin, &format!("{name}-timeout"))
                    .unwrap_or_else(|| panic!("{dir}: set --{name}-timeout explicitly")),
            )
        };
        for (sidecar, waits) in [
            ("csi-provisioner", &["create", "delete"][..]),
            ("csi-attacher", &["attach", "detach"][..]),
            ("csi-resizer", &["expand"][..]),
            ("csi-snapshotter", &["snapshot", "delete"][..]),
        ] {
            let timeout = duration(
                &flag(container(deploy, sidecar), "timeout")
                    .unwrap_or_else(|| panic!("{dir}: set {sidecar} --timeout explicitly")),
            );
            for w in waits {
                assert!(
                    wait(w) + ANSWER_MARGIN <= timeout,
                    "{dir}: --{w}-timeout {:?} leaves the controller less than {ANSWER_MARGIN:?} \
                     to answer before {sidecar} gives up after {timeout:?}",
                    wait(w)
                );
            }
        }
    }
}

/// Images are pinned at the versions hack/tools.sh builds, and every flag the manifests
/// pass is accepted by the binary it goes to: the binary is run with the manifest's args
/// and `--help`, so an unknown flag or a malformed value fails while parsing and `--help`
/// stops it before it would start serving. The node-driver-registrar and livenessprobe
/// are not buildable from the module proxy (see hack/lib.sh), so only their tags are
/// checked against the pins.
#[test]
fn manifest_flags_are_accepted_by_the_binaries_they_start() {
    let all = render_all();
    let env: BTreeMap<String, String> = script_env("tools.sh", "--env")
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .collect();
    let sidecar = |var: &str, name: &str, tag: &str| -> PathBuf {
        let path = PathBuf::from(
            env.get(var)
                .unwrap_or_else(|| panic!("tools.sh --env has no {var}")),
        );
        assert_eq!(
            path.parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str()),
            Some(format!("{name}-{tag}").as_str()),
            "the {name} image tag {tag} differs from the version hack/tools.sh builds ({})",
            path.display()
        );
        assert!(
            path.is_file(),
            "{name} not found at {}: run hack/tools.sh sidecars",
            path.display()
        );
        path
    };
    let mut checked = 0;
    for r in &all {
        for w in r
            .objects
            .iter()
            .filter(|o| o["kind"] == "Deployment" || o["kind"] == "DaemonSet")
        {
            for c in containers(w) {
                let image = c["image"].as_str().unwrap();
                let t = tag(c);
                let binary = if image.starts_with("quay.io/kubevirt-csi/kubevirt-csi:") {
                    let cmd = c["command"][0]
                        .as_str()
                        .expect("our image runs an explicit command");
                    workspace_bin(cmd).unwrap_or_else(|e| panic!("{e}"))
                } else if let Some(name) = image
                    .strip_prefix("registry.k8s.io/sig-storage/")
                    .and_then(|n| n.split_once(':'))
                    .map(|(n, _)| n)
                {
                    match name {
                        "csi-provisioner" => sidecar("CSI_PROVISIONER", name, t),
                        "csi-attacher" => sidecar("CSI_ATTACHER", name, t),
                        "csi-resizer" => sidecar("CSI_RESIZER", name, t),
                        "csi-snapshotter" => sidecar("CSI_SNAPSHOTTER", name, t),
                        "csi-node-driver-registrar" => {
                            assert_eq!(t, lib_sh_pin("CSI_NODE_DRIVER_REGISTRAR_VERSION"));
                            continue;
                        }
                        "livenessprobe" => {
                            assert_eq!(t, lib_sh_pin("CSI_LIVENESSPROBE_VERSION"));
                            continue;
                        }
                        other => panic!("{}: unexpected sidecar image {other}", r.dir),
                    }
                } else {
                    panic!("{}: unexpected image {image}", r.dir)
                };
                // Kubernetes expands $(VAR) from the container's env; any value will do to
                // check the flag names and value syntax.
                let args: Vec<String> = args(c)
                    .into_iter()
                    .map(|a| match a.split_once("=$(") {
                        Some((f, _)) => format!("{f}=placeholder=value"),
                        None => a,
                    })
                    .collect();
                let out = Command::new(&binary)
                    .args(&args)
                    .arg("--help")
                    .stdin(Stdio::null())
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
                assert!(
                    out.status.success(),
                    "{}: {} rejects the container {}'s args {args:?}:\n{}",
                    r.dir,
                    binary.display(),
                    c["name"],
                    String::from_utf8_lossy(&out.stderr)
                );
                checked += 1;
            }
        }
    }
    // The node plugin in base and the two guest overlays; the controller and its four
    // sidecars in split/infra and tenant.
    assert_eq!(checked, 3 + 2 * 5, "containers checked");
}

#[tokio::test]
async fn rendered_objects_pass_server_side_dry_run() {
    let all = render_all();
    let kubectl = kubectl();
    let cp = ControlPlane::start(Default::default())
        .await
        .unwrap_or_else(|e| panic!("control plane: {e}"));
    let client = cp.client().await.unwrap_or_else(|e| panic!("{e}"));
    crds::install(&client)
        .await
        .unwrap_or_else(|e| panic!("installing CRDs: {e}"));

    // The namespaces the objects go to must exist before a dry run (a Namespace object
    // applied in the same dry run is not persisted). The infra namespaces are the
    // tenant's, which the manifests expect to exist.
    let mut namespaces = BTreeSet::new();
    for o in all.iter().flat_map(|r| &r.objects) {
        if let Some(ns) = o["metadata"]["namespace"].as_str() {
            namespaces.insert(ns.to_string());
        }
        if o["kind"] == "Namespace" {
            namespaces.insert(o["metadata"]["name"].as_str().unwrap().to_string());
        }
    }
    assert!(namespaces.contains("kubevirt-csi"), "{namespaces:?}");
    // Pods are admitted only with their ServiceAccount present; without a controller
    // manager nobody creates the `default` ones, so do what it would.
    namespaces.insert("default".to_string());
    let api: Api<Namespace> = Api::all(client.clone());
    for ns in &namespaces {
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("creating namespace {ns}: {e}"),
        }
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
        Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &sa)
            .await
            .unwrap_or_else(|e| panic!("creating {ns}/default ServiceAccount: {e}"));
    }

    for r in &all {
        let mut child = Command::new(&kubectl)
            .args([
                "apply",
                "--server-side",
                "--dry-run=server",
                "-f",
                "-",
                "--kubeconfig",
            ])
            .arg(cp.kubeconfig_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", kubectl.display()));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(r.yaml.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "server-side dry run of {} failed:\n{}\n{stdout}",
            r.dir,
            String::from_utf8_lossy(&out.stderr)
        );
        let applied = stdout
            .lines()
            .filter(|l| l.ends_with("serverside-applied (server dry run)"))
            .count();
        assert_eq!(
            applied,
            r.objects.len(),
            "{}: every object is applied:\n{stdout}",
            r.dir
        );
        eprintln!("{}: {applied} objects pass the server-side dry run", r.dir);
    }
}
