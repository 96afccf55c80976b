//! Tenant isolation: the one place that decides whether an infra object is ours.
//!
//! Three rules, applied to every read and every write:
//! - a **worker** (VM, VMI) is the tenant's if it lives in the tenant's namespace and carries
//!   every tenant label;
//! - an object the driver **created** (DataVolume, VolumeSnapshot) must in addition carry the
//!   driver's marker: the `csi.kubevirt.io/csi-name` annotation, and a name that is exactly
//!   what [`names::infra_name`] derives from it with our prefix. A tenant-labelled object the
//!   driver did not make (a worker's root disk stamped with the operator's labels) is foreign;
//! - a **claim** is ours only if it is the claim CDI made for one of our DataVolumes: same
//!   name, tenant labels, and a controller reference to that DataVolume's UID.
//! - a **hotplugged VM volume** is ours only if it is hotpluggable, named after one of our
//!   volume ids, backed by the object of that name, and its disk carries the serial we derive.
//!
//! A foreign object is treated as absent: a tenant cannot learn about, attach, or delete
//! another tenant's (or the operator's) objects by guessing ids.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;

use super::types::{DataVolume, Disk, Volume};
use crate::driver::ANN_CSI_NAME;
use crate::names;

/// The labels, namespace and name prefix that identify one tenant's infra objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Prefix of every infra object name the driver makes (`--volume-prefix`).
    pub prefix: String,
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
            prefix: String::new(),
        })
    }

    /// The same tenant, with the prefix its object names carry.
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// `k1=v1,k2=v2`, for list and watch label selectors.
    pub fn selector(&self) -> String {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether `obj` lives in the tenant's namespace and carries every tenant label: the rule
    /// for workers (VMs and VMIs), which the driver does not create.
    pub fn owns<K: ResourceExt>(&self, obj: &K) -> bool {
        obj.namespace().as_deref() == Some(self.namespace.as_str())
            && self
                .labels
                .iter()
                .all(|(k, v)| obj.labels().get(k) == Some(v))
    }

    /// Whether an id from the CO can name an object this driver made (see
    /// [`names::has_infra_shape`]). Checked before any request, so no other string reaches a
    /// URL path or a field selector.
    pub fn is_our_id(&self, id: &str) -> bool {
        names::has_infra_shape(&self.prefix, id)
    }

    /// Whether `obj` is a DataVolume or VolumeSnapshot this driver created for this tenant:
    /// labelled, in the namespace, and named exactly after its recorded CSI name.
    pub fn owns_created<K: ResourceExt>(&self, obj: &K) -> bool {
        let name = obj.name_any();
        self.owns(obj)
            && obj
                .annotations()
                .get(ANN_CSI_NAME)
                .is_some_and(|csi| names::is_infra_name_of(&self.prefix, csi, &name))
    }

    /// Whether `pvc` is the claim CDI made for our DataVolume `dv`.
    pub fn owns_claim(&self, pvc: &PersistentVolumeClaim, dv: &DataVolume) -> bool {
        self.owns(pvc)
            && pvc.metadata.name == dv.metadata.name
            && dv.uid().is_some()
            && pvc.owner_references().iter().any(|o| {
                o.kind == "DataVolume"
                    && o.controller == Some(true)
                    && Some(&o.uid) == dv.uid().as_ref()
            })
    }

    /// Whether a VM or VMI volume (with its disk) is a hotplug this driver made: hotpluggable,
    /// named after one of our ids, backed by the object of that name, with our serial.
    pub fn owns_hotplug(&self, volume: &Volume, disk: Option<&Disk>) -> bool {
        let hotpluggable = volume.data_volume.as_ref().is_some_and(|d| d.hotpluggable)
            || volume
                .persistent_volume_claim
                .as_ref()
                .is_some_and(|c| c.hotpluggable);
        hotpluggable
            && self.is_our_id(&volume.name)
            && volume.source_name() == Some(volume.name.as_str())
            && disk.is_some_and(|d| {
                d.name == volume.name
                    && d.serial.as_deref() == Some(names::disk_serial(&volume.name).as_str())
            })
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

    fn tenant() -> Tenant {
        Tenant::new("tenant-a", &["cluster=a".into()])
            .unwrap()
            .with_prefix("kvcsi-")
    }

    fn dv(name: &str, csi_name: Option<&str>) -> DataVolume {
        let mut d = DataVolume::new(
            name,
            &crate::infra::types::data_volume_resource(),
            Default::default(),
        );
        d.metadata.namespace = Some("tenant-a".into());
        d.metadata.uid = Some("uid-1".into());
        d.metadata.labels = Some([("cluster".to_string(), "a".to_string())].into());
        if let Some(c) = csi_name {
            d.metadata.annotations = Some([(ANN_CSI_NAME.to_string(), c.to_string())].into());
        }
        d
    }

    #[test]
    fn created_objects_need_the_marker() {
        let t = tenant();
        let name = names::infra_name("kvcsi-", "pvc-1");
        assert!(t.owns_created(&dv(&name, Some("pvc-1"))));
        // Labelled but not made by us: no annotation, or one that does not derive the name.
        assert!(!t.owns_created(&dv(&name, None)));
        assert!(!t.owns_created(&dv(&name, Some("pvc-2"))));
        assert!(!t.owns_created(&dv("rootdisk", Some("rootdisk"))));
    }

    #[test]
    fn claims_must_be_controlled_by_the_data_volume() {
        let t = tenant();
        let name = names::infra_name("kvcsi-", "pvc-1");
        let d = dv(&name, Some("pvc-1"));
        let claim = |labels: bool, owner_uid: Option<&str>| {
            let mut c = PersistentVolumeClaim::default();
            c.metadata.name = Some(name.clone());
            c.metadata.namespace = Some("tenant-a".into());
            if labels {
                c.metadata.labels = Some([("cluster".to_string(), "a".to_string())].into());
            }
            if let Some(uid) = owner_uid {
                c.metadata.owner_references = Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                        kind: "DataVolume".into(),
                        uid: uid.into(),
                        controller: Some(true),
                        ..Default::default()
                    },
                ]);
            }
            c
        };
        assert!(t.owns_claim(&claim(true, Some("uid-1")), &d));
        assert!(!t.owns_claim(&claim(false, Some("uid-1")), &d));
        assert!(!t.owns_claim(&claim(true, None), &d));
        assert!(!t.owns_claim(&claim(true, Some("uid-2")), &d));
    }

    #[test]
    fn hotplugs_need_our_name_source_and_serial() {
        use crate::infra::types::DataVolumeRef;
        let t = tenant();
        let name = names::infra_name("kvcsi-", "pvc-1");
        let vol = |name: &str, source: &str, hotpluggable: bool| Volume {
            name: name.into(),
            data_volume: Some(DataVolumeRef {
                name: source.into(),
                hotpluggable,
            }),
            persistent_volume_claim: None,
        };
        let disk = |name: &str, serial: &str| Disk {
            name: name.into(),
            disk: None,
            serial: Some(serial.into()),
        };
        let serial = names::disk_serial(&name);
        assert!(t.owns_hotplug(&vol(&name, &name, true), Some(&disk(&name, &serial))));
        assert!(!t.owns_hotplug(&vol(&name, &name, false), Some(&disk(&name, &serial))));
        assert!(!t.owns_hotplug(&vol(&name, "other", true), Some(&disk(&name, &serial))));
        assert!(!t.owns_hotplug(&vol(&name, &name, true), Some(&disk(&name, "x"))));
        assert!(!t.owns_hotplug(&vol(&name, &name, true), None));
        assert!(!t.owns_hotplug(
            &vol("rootdisk", "rootdisk", true),
            Some(&disk("rootdisk", &names::disk_serial("rootdisk")))
        ));
    }
}
