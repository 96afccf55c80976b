//! Launches the `kubevirt-standin` binary against a [`ControlPlane`] and waits for its
//! `STANDIN READY <addr>` line; the process is killed when the [`Standin`] is dropped.
//!
//! The stand-in serves `subresources.kubevirt.io/v1` behind the aggregation layer with a
//! serving certificate from the cluster CA (covering `virt-api.<ns>.svc`, the name the
//! aggregator verifies) and checks the front-proxy client certificate.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::cluster::{ClusterError, ControlPlane};
use crate::process::{ManagedProcess, ProcessError, log_tail};
use crate::tools::{ToolError, workspace_bin};

/// Namespace, ConfigMap and key of the stand-in's fault knobs.
pub const FAULTS_NAMESPACE: &str = "kubevirt";
pub const FAULTS_CONFIGMAP: &str = "kubevirt-standin-faults";
pub const FAULTS_KEY: &str = "faults.json";
/// Annotation the stand-in sets to the `faults.json` it has applied.
pub const FAULTS_APPLIED_ANNOTATION: &str = "standin.kubevirt-csi.io/applied-faults";
/// Annotation the stand-in sets when `faults.json` is invalid.
pub const FAULTS_ERROR_ANNOTATION: &str = "standin.kubevirt-csi.io/faults-error";

#[derive(Debug, thiserror::Error)]
pub enum StandinError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot prepare the stand-in's files in {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the stand-in printed an unexpected ready line {0:?}")]
    BadReadyLine(String),
    #[error("cannot set the stand-in's faults: {0}")]
    Faults(String),
}

/// Knobs for [`Standin::start`].
#[derive(Clone, Debug)]
pub struct StandinOptions {
    /// Where the sparse files go; default `<control plane dir>/standin-data`.
    pub data_dir: Option<PathBuf>,
    /// Namespace for the ExternalName Service and the faults ConfigMap.
    pub namespace: String,
    /// How long to wait for `STANDIN READY`.
    pub ready_timeout: Duration,
    /// Extra command-line arguments.
    pub extra_args: Vec<String>,
    /// `RUST_LOG` for the stand-in (its log is `<control plane dir>/standin.log`).
    pub rust_log: String,
}

impl Default for StandinOptions {
    fn default() -> Self {
        Self {
            data_dir: None,
            namespace: FAULTS_NAMESPACE.into(),
            ready_timeout: Duration::from_secs(60),
            extra_args: Vec::new(),
            rust_log: "info,kubevirt_standin=debug,kube_runtime=warn,kube_client=warn".into(),
        }
    }
}

/// A running stand-in.
#[derive(Debug)]
pub struct Standin {
    process: ManagedProcess,
    addr: String,
    data_dir: PathBuf,
    started_in: Duration,
}

impl Standin {
    /// Starts the stand-in and waits until it prints `STANDIN READY <addr>` (its watches run
    /// and the APIService is Available).
    pub async fn start(cp: &ControlPlane, opts: StandinOptions) -> Result<Self, StandinError> {
        let started = Instant::now();
        let bin = workspace_bin("kubevirt-standin")?;
        let dir = cp.dir().join("standin");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StandinError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| cp.dir().join("standin-data"));
        let svc = format!("virt-api.{}.svc", opts.namespace);
        let pair = cp.issue_serving_cert(&["localhost", "127.0.0.1", &svc])?;
        let (cert, key) = (dir.join("serving.crt"), dir.join("serving.key"));
        let ca = dir.join("ca.crt");
        std::fs::write(&cert, &pair.cert_pem).map_err(io(&cert))?;
        std::fs::write(&key, &pair.key_pem).map_err(io(&key))?;
        std::fs::write(&ca, cp.ca_pem()).map_err(io(&ca))?;
        let mut args: Vec<String> = vec![
            format!("--kubeconfig={}", cp.kubeconfig_path().display()),
            format!("--data-dir={}", data_dir.display()),
            "--listen=127.0.0.1:0".into(),
            format!("--tls-cert={}", cert.display()),
            format!("--tls-key={}", key.display()),
            format!("--ca-bundle={}", ca.display()),
            format!("--client-ca={}", cp.front_proxy_ca_path().display()),
            format!("--namespace={}", opts.namespace),
            format!(
                "--ready-timeout-secs={}",
                opts.ready_timeout.as_secs().max(1)
            ),
        ];
        args.extend(opts.extra_args.iter().cloned());
        let log = cp.dir().join("standin.log");
        let rust_log = opts.rust_log.clone();
        let mut process =
            ManagedProcess::spawn_with("kubevirt-standin", &bin, &args, &log, |cmd| {
                cmd.stdout(Stdio::piped()).env("RUST_LOG", rust_log);
            })?;
        let stdout = process.child_mut().stdout.take();
        let ready = async {
            let Some(stdout) = stdout else {
                return Ok(None);
            };
            let mut lines = BufReader::new(stdout).lines();
            while let Some(line) = lines.next_line().await.ok().flatten() {
                if let Some(rest) = line.strip_prefix("STANDIN READY ") {
                    return Ok(Some(rest.trim().to_string()));
                }
                if !line.trim().is_empty() {
                    return Err(StandinError::BadReadyLine(line));
                }
            }
            Ok(None)
        };
        let waited = tokio::time::timeout(opts.ready_timeout + Duration::from_secs(5), ready).await;
        let addr = match waited {
            Ok(Ok(Some(addr))) => addr,
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => {
                // stdout closed: the process is gone; report how it ended.
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), process.child_mut().wait()).await;
                process.check_running()?;
                return Err(ProcessError::NotReady {
                    name: "kubevirt-standin".into(),
                    waited: started.elapsed(),
                    log_tail: log_tail(&log, 40),
                }
                .into());
            }
            Err(_) => {
                process.check_running()?;
                return Err(ProcessError::NotReady {
                    name: "kubevirt-standin".into(),
                    waited: started.elapsed(),
                    log_tail: log_tail(&log, 40),
                }
                .into());
            }
        };
        Ok(Self {
            process,
            addr,
            data_dir,
            started_in: started.elapsed(),
        })
    }

    /// The HTTPS address the stand-in serves on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Where the volumes' sparse files live.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Time from spawn to `STANDIN READY`.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Fails with the log's tail if the stand-in has exited.
    pub fn check_running(&mut self) -> Result<(), ProcessError> {
        self.process.check_running()
    }

    /// SIGTERM, then wait up to `grace` for a clean exit (then SIGKILL).
    pub async fn stop(self, grace: Duration) {
        self.process.stop(grace).await;
    }
}

/// Writes `faults` as the stand-in's `faults.json` and waits (watch, bounded by `timeout`)
/// until the stand-in reports it applied. Any change re-arms the "fail next N" counters.
pub async fn set_faults(
    client: &kube::Client,
    faults: &serde_json::Value,
    timeout: Duration,
) -> Result<(), StandinError> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), FAULTS_NAMESPACE);
    let text = faults.to_string();
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": FAULTS_CONFIGMAP, "namespace": FAULTS_NAMESPACE},
        "data": {FAULTS_KEY: text}
    }))
    .map_err(|e| StandinError::Faults(e.to_string()))?;
    cms.patch(
        FAULTS_CONFIGMAP,
        &PatchParams::apply("kvcsi-harness").force(),
        &Patch::Apply(&cm),
    )
    .await
    .map_err(|e| StandinError::Faults(e.to_string()))?;
    let cfg = watcher::Config::default().fields(&format!("metadata.name={FAULTS_CONFIGMAP}"));
    let wait = async {
        let mut w = watcher::watcher(cms.clone(), cfg).boxed();
        while let Some(ev) = w.next().await {
            let cm = match ev {
                Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => cm,
                Ok(_) => continue,
                Err(e) => return Err(StandinError::Faults(format!("watch failed: {e}"))),
            };
            let ann = cm.metadata.annotations.unwrap_or_default();
            let current = cm
                .data
                .unwrap_or_default()
                .get(FAULTS_KEY)
                .cloned()
                .unwrap_or_default();
            if current != text {
                continue;
            }
            if ann.get(FAULTS_APPLIED_ANNOTATION) == Some(&text) {
                return Ok(());
            }
            if let Some(err) = ann.get(FAULTS_ERROR_ANNOTATION) {
                return Err(StandinError::Faults(format!(
                    "the stand-in rejected the faults: {err}"
                )));
            }
        }
        Err(StandinError::Faults("watch ended".into()))
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| StandinError::Faults(format!("not applied within {timeout:?}")))?
}
