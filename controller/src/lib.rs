//! kubevirt-csi controller plugin: mirrors guest volumes into the infra cluster as CDI
//! DataVolumes and hotplugs them into the KubeVirt worker VMs behind guest nodes.
//!
//! Start reading at [`attach`] for the attach path, [`volumes`] for provisioning.
#![forbid(unsafe_code)]

pub mod attach;
pub mod capability;
pub mod driver;
pub mod error;
pub mod expand;
pub mod identity;
pub mod infra;
pub mod listing;
pub mod locks;
pub mod names;
pub mod params;
pub mod quantity;
pub mod server;
pub mod service;
pub mod snapshots;
pub mod volumes;
