//! A real Kubernetes control plane for tests: etcd plus kube-apiserver on free loopback
//! ports, with client-certificate auth, RBAC, service-account signing and the aggregation
//! layer configured, as envtest does it. Everything stops and is removed on drop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::certs::{self, Authority, CertError, CertPair, Usage};
use crate::process::{ManagedProcess, ProcessError, ScratchDir, free_port};
use crate::tools::{ToolError, Tools};

/// Errors starting or talking to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("no free loopback port")]
    Port(#[source] std::io::Error),
    #[error("invalid kubeconfig generated for {user}")]
    Kubeconfig {
        user: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a client for {user}")]
    Client {
        user: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Knobs for [`ControlPlane::start`].
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Used in directory and log names, to tell the infra and guest planes apart.
    pub name: String,
    /// How long to wait for `/readyz`.
    pub ready_timeout: Duration,
    /// Extra kube-apiserver flags (`--flag=value`).
    pub extra_apiserver_args: Vec<String>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            name: "infra".into(),
            ready_timeout: Duration::from_secs(60),
            extra_apiserver_args: Vec::new(),
        }
    }
}

/// A running etcd + kube-apiserver pair.
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: processes die before their directories go.
    apiserver: ManagedProcess,
    etcd: ManagedProcess,
    url: String,
    ca: Authority,
    front_proxy_ca_path: PathBuf,
    admin_kubeconfig_path: PathBuf,
    started_in: Duration,
    _etcd_dir: ScratchDir,
    dir: ScratchDir,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers ok.
    pub async fn start(opts: ControlPlaneOptions) -> Result<Self, ClusterError> {
        let started = Instant::now();
        let tools = Tools::locate()?;
        let dir = ScratchDir::new(&opts.name)?;
        let etcd_dir = ScratchDir::in_memory(&format!("{}-etcd", opts.name))?;
        let d = dir.path();

        let etcd_port = free_port().map_err(ClusterError::Port)?;
        let peer_port = free_port().map_err(ClusterError::Port)?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args: Vec<String> = vec![
            "--name=default".into(),
            format!("--data-dir={}", etcd_dir.path().join("data").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ];
        let etcd = ManagedProcess::spawn("etcd", &tools.etcd, &etcd_args, &d.join("etcd.log"))?;

        // Certificates: the cluster CA signs the serving cert and client certs; a separate
        // front-proxy CA signs the identity kube-apiserver presents to aggregated servers.
        let ca = Authority::new(&format!("kvcsi-{}-ca", opts.name))?;
        let front_proxy_ca = Authority::new(&format!("kvcsi-{}-front-proxy-ca", opts.name))?;
        let serving = ca.issue(
            "kube-apiserver",
            &[],
            // 10.0.2.2 is the host as a QEMU worker VM (user networking) reaches it.
            &[
                "127.0.0.1",
                "localhost",
                "kubernetes.default.svc",
                "10.0.2.2",
            ],
            Usage::Server,
        )?;
        let proxy_client = front_proxy_ca.issue("front-proxy-client", &[], &[], Usage::Client)?;
        let sa_key = certs::service_account_key()?;
        let ca_path = d.join("ca.crt");
        certs::write(&ca_path, &ca.cert_pem())?;
        let front_proxy_ca_path = d.join("front-proxy-ca.crt");
        certs::write(&front_proxy_ca_path, &front_proxy_ca.cert_pem())?;
        let (serving_crt, serving_key) = serving.write(d, "apiserver")?;
        let (proxy_crt, proxy_key) = proxy_client.write(d, "front-proxy-client")?;
        let (sa_pub, sa_priv) = sa_key.write(d, "service-account")?;

        let port = free_port().map_err(ClusterError::Port)?;
        let url = format!("https://127.0.0.1:{port}");
        let p = |x: &Path| x.display().to_string();
        let mut args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", p(&d.join("apiserver-certs"))),
            format!("--tls-cert-file={}", p(&serving_crt)),
            format!("--tls-private-key-file={}", p(&serving_key)),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=RBAC".into(),
            format!("--client-ca-file={}", p(&ca_path)),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p(&sa_pub)),
            format!("--service-account-signing-key-file={}", p(&sa_priv)),
            format!("--requestheader-client-ca-file={}", p(&front_proxy_ca_path)),
            "--requestheader-allowed-names=front-proxy-client".into(),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!("--proxy-client-cert-file={}", p(&proxy_crt)),
            format!("--proxy-client-key-file={}", p(&proxy_key)),
            // Nothing here can reach the Service network, and Endpoints may not point at
            // loopback; ExternalName services carry the aggregated backends instead.
            "--endpoint-reconciler-type=none".into(),
            "--allow-privileged=true".into(),
            "--v=1".into(),
        ];
        args.extend(opts.extra_apiserver_args.iter().cloned());
        let apiserver = ManagedProcess::spawn(
            "kube-apiserver",
            &tools.kube_apiserver,
            &args,
            &d.join("kube-apiserver.log"),
        )?;

        let admin = ca.issue("kvcsi-admin", &["system:masters"], &[], Usage::Client)?;
        let admin_kubeconfig_path = d.join("admin.kubeconfig");
        let kubeconfig = client_cert_kubeconfig(&url, &ca.cert_pem(), "kvcsi-admin", &admin);
        std::fs::write(&admin_kubeconfig_path, &kubeconfig).map_err(|source| {
            ClusterError::Write {
                path: admin_kubeconfig_path.clone(),
                source,
            }
        })?;

        let mut cp = Self {
            apiserver,
            etcd,
            url,
            ca,
            front_proxy_ca_path,
            admin_kubeconfig_path,
            started_in: Duration::ZERO,
            _etcd_dir: etcd_dir,
            dir,
        };
        cp.wait_ready(opts.ready_timeout).await?;
        cp.started_in = started.elapsed();
        tracing::info!(name = %opts.name, url = %cp.url, took = ?cp.started_in, "control plane ready");
        Ok(cp)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), ClusterError> {
        let client = self.client().await?;
        let deadline = Instant::now() + timeout;
        loop {
            self.etcd.check_running()?;
            self.apiserver.check_running()?;
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("static request is valid");
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ProcessError::NotReady {
                    name: "kube-apiserver".into(),
                    waited: timeout,
                    log_tail: self.apiserver.log_tail(30),
                }
                .into());
            }
            // The apiserver offers no readiness event to wait on; a short retry is the
            // only option for a process we did not write.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The apiserver URL, `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How long start-up took, to the first `/readyz` ok.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// Scratch directory holding certificates, kubeconfigs and logs; removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.admin_kubeconfig_path
    }

    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// The CA kube-apiserver's front-proxy client certificate chains to: aggregated API
    /// servers verify proxied requests against it.
    pub fn front_proxy_ca_path(&self) -> &Path {
        &self.front_proxy_ca_path
    }

    /// A serving certificate signed by the cluster CA (for aggregated API servers).
    pub fn issue_serving_cert(&self, sans: &[&str]) -> Result<CertPair, ClusterError> {
        Ok(self.ca.issue(
            sans.first().copied().unwrap_or("server"),
            &[],
            sans,
            Usage::Server,
        )?)
    }

    /// An administrator client (group `system:masters`).
    pub async fn client(&self) -> Result<kube::Client, ClusterError> {
        let yaml = std::fs::read_to_string(&self.admin_kubeconfig_path).map_err(|source| {
            ClusterError::Write {
                path: self.admin_kubeconfig_path.clone(),
                source,
            }
        })?;
        client_from_yaml("kvcsi-admin", &yaml).await
    }

    /// A kubeconfig that authenticates as `user` in `groups` with a client certificate;
    /// RBAC decides what it may do.
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> Result<String, ClusterError> {
        self.kubeconfig_for_server(&self.url, user, groups)
    }

    /// Like [`ControlPlane::kubeconfig_for`], reaching the apiserver at `server` instead
    /// (e.g. through a [`crate::proxy::TcpProxy`] on 127.0.0.1, which the serving
    /// certificate also covers).
    pub fn kubeconfig_for_server(
        &self,
        server: &str,
        user: &str,
        groups: &[&str],
    ) -> Result<String, ClusterError> {
        let pair = self.ca.issue(user, groups, &[], Usage::Client)?;
        Ok(client_cert_kubeconfig(
            server,
            &self.ca.cert_pem(),
            user,
            &pair,
        ))
    }

    /// The apiserver's loopback address, for a [`crate::proxy::TcpProxy`] target.
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        let port = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A kubeconfig that authenticates with a bearer token (e.g. a service-account token).
    pub fn kubeconfig_with_token(&self, user: &str, token: &str) -> String {
        self.kubeconfig_with_token_server(&self.url, user, token)
    }

    /// Like [`ControlPlane::kubeconfig_with_token`], reaching the apiserver at `server`.
    pub fn kubeconfig_with_token_server(&self, server: &str, user: &str, token: &str) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kvcsi\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: kvcsi\n  context:\n    cluster: kvcsi\n    user: {user}\ncurrent-context: kvcsi\n",
            b64.encode(self.ca.cert_pem()),
        )
    }

    /// A client built from a kubeconfig made by [`ControlPlane::kubeconfig_for`] or
    /// [`ControlPlane::kubeconfig_with_token`].
    pub async fn client_from_kubeconfig(
        &self,
        user: &str,
        yaml: &str,
    ) -> Result<kube::Client, ClusterError> {
        client_from_yaml(user, yaml).await
    }

    /// Last lines of the apiserver log, for assertion messages.
    pub fn apiserver_log_tail(&self, lines: usize) -> String {
        self.apiserver.log_tail(lines)
    }
}

fn client_cert_kubeconfig(url: &str, ca_pem: &str, user: &str, pair: &CertPair) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kvcsi\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\nusers:\n- name: {user}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: kvcsi\n  context:\n    cluster: kvcsi\n    user: {user}\ncurrent-context: kvcsi\n",
        b64.encode(ca_pem),
        b64.encode(&pair.cert_pem),
        b64.encode(&pair.key_pem),
    )
}

async fn client_from_yaml(user: &str, yaml: &str) -> Result<kube::Client, ClusterError> {
    let kc = Kubeconfig::from_yaml(yaml).map_err(|source| ClusterError::Kubeconfig {
        user: user.to_string(),
        source,
    })?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|source| ClusterError::Kubeconfig {
            user: user.to_string(),
            source,
        })?;
    kube::Client::try_from(config).map_err(|source| ClusterError::Client {
        user: user.to_string(),
        source,
    })
}
