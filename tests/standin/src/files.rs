//! The data directory: one sparse file per provisioned PVC and per snapshot, named from UIDs.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Files are sized in whole sectors so every guest bus accepts them.
pub const SECTOR: u64 = 512;
const COPY_CHUNK: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum FileError {
    /// A UID that would not make a safe file name.
    #[error("uid {0:?} is not a valid object uid")]
    BadUid(String),
    /// Creating, growing, copying or removing a backing file failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A blocking file task was cancelled or panicked.
    #[error("file task failed: {0}")]
    Join(String),
}

/// The PV name for a PVC: `pvc-<uid>`, as dynamic provisioners do.
pub fn pv_name(pvc_uid: &str) -> Result<String, FileError> {
    check_uid(pvc_uid)?;
    Ok(format!("pvc-{pvc_uid}"))
}

/// The VolumeSnapshotContent name for a VolumeSnapshot: `snapcontent-<uid>`.
pub fn snapshot_content_name(vs_uid: &str) -> Result<String, FileError> {
    check_uid(vs_uid)?;
    Ok(format!("snapcontent-{vs_uid}"))
}

fn check_uid(uid: &str) -> Result<(), FileError> {
    let ok = !uid.is_empty()
        && uid.len() <= 64
        && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(FileError::BadUid(uid.to_string()))
    }
}

/// Rounds a byte size up to whole sectors (at least one).
pub fn round_to_sector(bytes: u64) -> u64 {
    bytes.max(1).div_ceil(SECTOR) * SECTOR
}

/// Where the stand-in keeps its backing files.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, FileError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|source| FileError::Io {
            op: "create data dir",
            path: root.clone(),
            source,
        })?;
        Ok(Self { root })
    }

    /// The backing file of the PV provisioned for a PVC with this UID.
    pub fn volume_path(&self, pvc_uid: &str) -> Result<PathBuf, FileError> {
        Ok(self.root.join(format!("{}.img", pv_name(pvc_uid)?)))
    }

    /// The copy taken for a VolumeSnapshot with this UID.
    pub fn snapshot_path(&self, vs_uid: &str) -> Result<PathBuf, FileError> {
        check_uid(vs_uid)?;
        Ok(self.root.join(format!("snapshot-{vs_uid}.img")))
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates (or resizes an existing, never shrinking) a zeroed sparse file; returns its size.
pub fn create_sparse(path: &Path, size: u64) -> Result<u64, FileError> {
    let size = round_to_sector(size);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err("create", path))?;
    let current = file.metadata().map_err(io_err("stat", path))?.len();
    if current < size {
        file.set_len(size).map_err(io_err("resize", path))?;
    }
    Ok(size.max(current))
}

/// Grows a file to at least `size` bytes (rounded to sectors); returns the new size.
pub fn grow(path: &Path, size: u64) -> Result<u64, FileError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    let current = file.metadata().map_err(io_err("stat", path))?.len();
    let size = round_to_sector(size);
    if size > current {
        file.set_len(size).map_err(io_err("grow", path))?;
        Ok(size)
    } else {
        Ok(current)
    }
}

/// The current size of a file.
pub fn size_of(path: &Path) -> Result<u64, FileError> {
    Ok(std::fs::metadata(path).map_err(io_err("stat", path))?.len())
}

/// Copies `src` into a new file `dst` of at least `min_size` bytes, leaving zero chunks as holes.
///
/// The copy is written to a temporary name and renamed, so a crash never leaves a half copy
/// under the final name. Returns the size of `dst`.
pub fn sparse_copy(src: &Path, dst: &Path, min_size: u64) -> Result<u64, FileError> {
    let mut input = File::open(src).map_err(io_err("open source", src))?;
    let src_len = input.metadata().map_err(io_err("stat source", src))?.len();
    let tmp = dst.with_extension("partial");
    let mut out = File::create(&tmp).map_err(io_err("create", &tmp))?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut input, &mut buf).map_err(io_err("read", src))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if chunk.iter().any(|b| *b != 0) {
            out.seek(SeekFrom::Start(offset))
                .map_err(io_err("seek", &tmp))?;
            out.write_all(chunk).map_err(io_err("write", &tmp))?;
        }
        offset += n as u64;
    }
    let size = round_to_sector(src_len.max(min_size));
    out.set_len(size).map_err(io_err("resize", &tmp))?;
    out.sync_all().map_err(io_err("sync", &tmp))?;
    std::fs::rename(&tmp, dst).map_err(io_err("rename", dst))?;
    Ok(size)
}

fn read_full(input: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Removes a file; a file that is already gone is fine.
pub fn remove(path: &Path) -> Result<(), FileError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FileError::Io {
            op: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Runs a blocking file operation off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, FileError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FileError::Join(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn names_derive_from_uids() {
        let d = DataDir::new(tempfile::tempdir().unwrap().path().join("data")).unwrap();
        let uid = "0b8d5a0e-1a2b-4c3d-9e8f-001122334455";
        assert_eq!(pv_name(uid).unwrap(), format!("pvc-{uid}"));
        assert_eq!(
            snapshot_content_name(uid).unwrap(),
            format!("snapcontent-{uid}")
        );
        assert!(
            d.volume_path(uid)
                .unwrap()
                .ends_with(format!("pvc-{uid}.img"))
        );
        assert!(
            d.snapshot_path(uid)
                .unwrap()
                .ends_with(format!("snapshot-{uid}.img"))
        );
        assert!(pv_name("../etc").is_err());
        assert!(d.volume_path("").is_err());
    }

    #[test]
    fn create_grow_copy_remove() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        assert_eq!(create_sparse(&a, 1000).unwrap(), 1024);
        assert_eq!(size_of(&a).unwrap(), 1024);
        // Sparse: a 64 MiB file allocates (almost) nothing.
        assert_eq!(grow(&a, 64 << 20).unwrap(), 64 << 20);
        assert!(std::fs::metadata(&a).unwrap().blocks() < 64);
        // Growing never shrinks.
        assert_eq!(grow(&a, 10).unwrap(), 64 << 20);
        // Write data in the middle and copy it into a bigger file.
        {
            let mut f = OpenOptions::new().write(true).open(&a).unwrap();
            f.seek(SeekFrom::Start(5 << 20)).unwrap();
            f.write_all(b"hello standin").unwrap();
        }
        let b = dir.path().join("b.img");
        assert_eq!(sparse_copy(&a, &b, 128 << 20).unwrap(), 128 << 20);
        let mut data = vec![0u8; 13];
        let mut f = File::open(&b).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.read_exact(&mut data).unwrap();
        assert_eq!(&data, b"hello standin");
        assert!(std::fs::metadata(&b).unwrap().blocks() < 8 * 1024);
        remove(&b).unwrap();
        remove(&b).unwrap();
        assert!(!b.exists());
    }
}
