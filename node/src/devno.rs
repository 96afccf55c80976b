//! Device numbers, the one identity of a block device that sysfs, mountinfo and `stat(2)`
//! all agree on.

use std::fmt;
use std::str::FromStr;

/// A `major:minor` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct DevNo {
    pub major: u64,
    pub minor: u64,
}

impl DevNo {
    pub const fn new(major: u64, minor: u64) -> Self {
        Self { major, minor }
    }

    pub fn from_raw(rdev: u64) -> Self {
        Self::new(nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
    }

    /// Anonymous devices (major 0) back pseudo filesystems such as tmpfs, proc or overlay;
    /// none of them can be one of our disks.
    pub fn is_anonymous(&self) -> bool {
        self.major == 0
    }
}

impl fmt::Display for DevNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// The text was not `major:minor`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a major:minor device number")]
pub struct DevNoParseError(pub String);

impl FromStr for DevNo {
    type Err = DevNoParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DevNoParseError(s.to_owned());
        let (major, minor) = s.trim().split_once(':').ok_or_else(err)?;
        Ok(Self::new(
            major.parse().map_err(|_| err())?,
            minor.parse().map_err(|_| err())?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysfs_dev_files() {
        assert_eq!("254:16\n".parse::<DevNo>().unwrap(), DevNo::new(254, 16));
        assert!("254".parse::<DevNo>().is_err());
        assert!("a:b".parse::<DevNo>().is_err());
        assert_eq!(DevNo::new(8, 0).to_string(), "8:0");
    }
}
