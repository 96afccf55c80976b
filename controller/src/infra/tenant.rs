//! Tenant isolation: the one place that decides whether an infra object is ours.
//!
//! Every object we create carries the tenant labels, and every object we read is checked
//! for them and for the tenant's namespace; a foreign object is treated as absent, so a
//! tenant cannot learn about, attach, or delete another tenant's volumes by guessing ids.

use std::collections::BTreeMap;

use kube::ResourceExt;

/// The labels and namespace that identify one tenant's infra objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// Tenant labels given on the command line could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TenantError {
    #[error("tenant labels are required (--tenant-label key=value, repeatable)")]
    NoLabels,
    #[error("tenant label {0:?} is not key=value")]
    Malformed(String),
}

impl Tenant {
    pub fn new(namespace: &str, labels: &[String]) -> Result<Self, TenantError> {
        if labels.is_empty() {
            return Err(TenantError::NoLabels);
        }
        let labels = labels
            .iter()
            .map(|l| match l.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(TenantError::Malformed(l.clone())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            namespace: namespace.to_string(),
            labels,
        })
    }

    /// `k1=v1,k2=v2`, for list and watch label selectors.
    pub fn selector(&self) -> String {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether `obj` lives in the tenant's namespace and carries every tenant label.
    pub fn owns<K: ResourceExt>(&self, obj: &K) -> bool {
        obj.namespace().as_deref() == Some(self.namespace.as_str())
            && self
                .labels
                .iter()
                .all(|(k, v)| obj.labels().get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(ns: &str, labels: &[(&str, &str)]) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.namespace = Some(ns.into());
        c.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        c
    }

    #[test]
    fn owns_only_labelled_objects_in_the_namespace() {
        let t = Tenant::new("tenant-a", &["cluster=a".into(), "team=x".into()]).unwrap();
        assert!(t.owns(&cm(
            "tenant-a",
            &[("cluster", "a"), ("team", "x"), ("extra", "1")]
        )));
        assert!(!t.owns(&cm("tenant-a", &[("cluster", "a")])));
        assert!(!t.owns(&cm("tenant-a", &[("cluster", "b"), ("team", "x")])));
        assert!(!t.owns(&cm("tenant-b", &[("cluster", "a"), ("team", "x")])));
        assert_eq!(t.selector(), "cluster=a,team=x");
    }

    #[test]
    fn labels_are_required_and_parsed() {
        assert_eq!(Tenant::new("ns", &[]), Err(TenantError::NoLabels));
        assert_eq!(
            Tenant::new("ns", &["nolabel".into()]),
            Err(TenantError::Malformed("nolabel".into()))
        );
        assert_eq!(
            Tenant::new("ns", &["=v".into()]),
            Err(TenantError::Malformed("=v".into()))
        );
        assert!(Tenant::new("ns", &["k=".into()]).is_ok());
    }
}
