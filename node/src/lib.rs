//! kubevirt-csi node plugin: inside a KubeVirt worker VM, finds hotplugged disks by serial
//! straight from sysfs and turns them into mounted filesystems or raw block devices.
#![forbid(unsafe_code)]

pub mod config;
pub mod context;
pub mod devno;
pub mod discovery;
pub mod error;
pub mod fs;
pub mod identity;
pub mod inflight;
pub mod mountinfo;
pub mod mounts;
pub mod node_id;
pub mod node_service;
pub mod paths;
pub mod server;
pub mod state;
pub mod uevent;
pub mod volume_ops;
