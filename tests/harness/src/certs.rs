//! A throw-away PKI for one control plane: a cluster CA (serving and client certificates),
//! a front-proxy CA for the aggregation layer, and a service-account signing key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// Errors making or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot generate certificate for {subject}")]
    Generate {
        subject: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A PEM certificate with its PEM private key.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertPair {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir` and returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), CertError> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write(&cert, &self.cert_pem)?;
        write(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A certificate authority that can issue leaves.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

impl Authority {
    /// A new self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> Result<Self, CertError> {
        let err = |source| CertError::Generate {
            subject: common_name.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.distinguished_name = name(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(err)?;
        Ok(Self { issuer })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a leaf for `common_name` in the given organisations (Kubernetes groups for
    /// client certificates), valid for `sans` (DNS names or IP addresses).
    pub fn issue(
        &self,
        common_name: &str,
        organisations: &[&str],
        sans: &[&str],
        usage: Usage,
    ) -> Result<CertPair, CertError> {
        let err = |source| CertError::Generate {
            subject: common_name.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).map_err(err)?;
        params.distinguished_name = name(common_name, organisations);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn name(common_name: &str, organisations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    for o in organisations {
        dn.push(DnType::OrganizationName, *o);
    }
    dn
}

/// An ECDSA P-256 key for signing service-account tokens (kube-apiserver accepts ES256).
pub fn service_account_key() -> Result<CertPair, CertError> {
    let key = KeyPair::generate().map_err(|source| CertError::Generate {
        subject: "service-account key".into(),
        source,
    })?;
    // The "certificate" half holds the public key: --service-account-key-file reads it.
    Ok(CertPair {
        cert_pem: key.public_key_pem(),
        key_pem: key.serialize_pem(),
    })
}

pub(crate) fn write(path: &Path, contents: &str) -> Result<(), CertError> {
    std::fs::write(path, contents).map_err(|source| CertError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_pem_leaves_from_a_ca() {
        let ca = Authority::new("test-ca").unwrap();
        let leaf = ca
            .issue(
                "admin",
                &["system:masters"],
                &["127.0.0.1", "localhost"],
                Usage::Client,
            )
            .unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.key_pem.contains("PRIVATE KEY"));
        assert_ne!(leaf.cert_pem, ca.cert_pem());
    }
}
