//! Installs the upstream KubeVirt, CDI and snapshot CRDs that `hack/crds.sh` assembles from
//! the published Go modules, and waits (on a watch) until the apiserver serves them.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};

use crate::tools::{ToolError, run_script};

/// Errors installing CRDs.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("cannot read CRD directory {dir}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} is not a CustomResourceDefinition")]
    Parse {
        file: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("no CRDs in {dir}: run hack/crds.sh")]
    Empty { dir: PathBuf },
    #[error("apiserver refused CRD {name}")]
    Apply {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("CRD {name} not established after {waited:?}")]
    NotEstablished { name: String, waited: Duration },
}

/// The directory `hack/crds.sh` fills; running the script first assembles it on a cold
/// cache (seconds) and only checks it on a warm one (milliseconds).
pub fn crd_dir() -> Result<PathBuf, ToolError> {
    run_script("crds.sh", &[])?;
    run_script("crds.sh", &["--dir"]).map(|out| PathBuf::from(out.trim()))
}

/// Reads every `*.yaml` CRD in [`crd_dir`].
pub fn load() -> Result<Vec<CustomResourceDefinition>, CrdError> {
    let dir = crd_dir()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|source| CrdError::ReadDir {
            dir: dir.clone(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CrdError::Empty { dir });
    }
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).map_err(|source| CrdError::ReadDir {
                dir: file.clone(),
                source,
            })?;
            serde_yaml::from_str(&text).map_err(|source| CrdError::Parse { file, source })
        })
        .collect()
}

/// Applies the CRDs (server-side apply, so a second install is a no-op) and waits until
/// each is Established.
pub async fn install(client: &kube::Client) -> Result<Vec<String>, CrdError> {
    install_where(client, |_| true).await
}

/// The CDI and snapshot CRDs only, for the KubeVirt bed: there KubeVirt's own CRDs come from
/// its manifests (see [`crate::kubevirt`]), and applying ours too would fight over fields.
pub async fn install_beside_kubevirt(client: &kube::Client) -> Result<Vec<String>, CrdError> {
    install_where(client, |crd| crd.spec.group != "kubevirt.io").await
}

async fn install_where(
    client: &kube::Client,
    keep: impl Fn(&CustomResourceDefinition) -> bool,
) -> Result<Vec<String>, CrdError> {
    let crds = load()?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("kvcsi-harness").force();
    let mut names = Vec::new();
    for crd in crds.into_iter().filter(|c| keep(c)) {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &pp, &Patch::Apply(&crd))
            .await
            .map_err(|source| CrdError::Apply {
                name: name.clone(),
                source,
            })?;
        names.push(name);
    }
    let waited = Duration::from_secs(30);
    for name in &names {
        let established = await_condition(api.clone(), name, conditions::is_crd_established());
        match tokio::time::timeout(waited, established).await {
            Ok(Ok(_)) => {}
            _ => {
                return Err(CrdError::NotEstablished {
                    name: name.clone(),
                    waited,
                });
            }
        }
    }
    Ok(names)
}
