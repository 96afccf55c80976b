//! Everything the controller does to the infra cluster: typed objects, tenant-checked
//! access, KubeVirt hotplug subresources, and waits on watches.

pub mod client;
pub mod tenant;
pub mod types;
pub mod wait;

pub use client::Infra;
pub use tenant::Tenant;
