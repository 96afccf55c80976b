//! The serving certificate and the rustls configuration of the aggregated API server.

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {message}")]
    Pem {
        what: &'static str,
        path: String,
        message: String,
    },
    /// Generating the self-signed serving certificate failed.
    #[error("cannot generate a serving certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("invalid tls configuration: {0}")]
    Config(String),
}

/// PEM serving material plus the CA that signed it (for the APIService's caBundle).
pub struct Serving {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

fn read(path: &Path, what: &'static str) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::Pem {
        what,
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Loads `--tls-cert/--tls-key` and the CA bundle; the CA defaults to the certificate itself.
pub fn load(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<Serving, TlsError> {
    let cert_pem = read(cert, "certificate")?;
    let key_pem = read(key, "private key")?;
    let ca_pem = match ca {
        Some(p) => read(p, "ca bundle")?,
        None => cert_pem.clone(),
    };
    Ok(Serving {
        cert_pem,
        key_pem,
        ca_pem,
    })
}

/// A throwaway CA and a serving certificate for `names` signed by it.
pub fn generate(names: &[String]) -> Result<Serving, TlsError> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubevirt-standin-ca");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubevirt-standin");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Serving {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_pem: ca_cert.pem(),
    })
}

/// The server configuration; with `client_ca`, client certificates are verified against it
/// (they stay optional at the TLS level so `/healthz` works without one; the API handlers
/// require a verified one).
pub fn server_config(
    s: &Serving,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(s.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what: "certificate",
            path: "serving certificate".into(),
            message: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_slice(s.key_pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: "private key",
        path: "serving key".into(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let pem = read(path, "client ca")?;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let c = c.map_err(|e| TlsError::Pem {
                    what: "client ca",
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_material_makes_a_config() {
        let s = generate(&[
            "localhost".into(),
            "127.0.0.1".into(),
            "virt-api.kubevirt.svc".into(),
        ])
        .unwrap();
        assert!(s.ca_pem.contains("BEGIN CERTIFICATE"));
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &s.ca_pem).unwrap();
        server_config(&s, None).unwrap();
        server_config(&s, Some(&ca)).unwrap();
        assert!(server_config(&s, Some(&dir.path().join("missing.pem"))).is_err());
    }
}
