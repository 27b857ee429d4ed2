//! Files rewritten whole, atomically.

use std::path::Path;

use super::StorageError;

/// A small file rewritten whole and atomically (write a temporary file,
/// fsync, rename over, fsync the directory): after a crash it holds the old
/// contents or the new, never a mix. Unlike a log-structured store, a
/// replace leaves no trace of the old bytes in the directory, which is what
/// destroying a key needs. Created 0600.
#[derive(Debug, Clone)]
pub struct AtomicFile {
    path: std::path::PathBuf,
}

impl AtomicFile {
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The contents, or `None` if the file does not exist.
    pub fn read(&self) -> Result<Option<Vec<u8>>, StorageError> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::Io(format!("{}: {e}", self.path.display()))),
        }
    }

    /// Replaces the contents, durably, in the steps a crash test counts:
    /// 1 write the temporary file, 2 fsync it, 3 rename it over, 4 fsync the
    /// directory. `stop_before` ends early after the steps before it (a
    /// simulated kill, for tests).
    pub fn replace_steps(
        &self,
        bytes: &[u8],
        stop_before: Option<u32>,
    ) -> Result<(), StorageError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e: std::io::Error| StorageError::Io(format!("{}: {e}", self.path.display()));
        let stop = |step: u32| stop_before.is_some_and(|s| s <= step);
        let tmp = self.path.with_extension("tmp");
        if stop(1) {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        std::io::Write::write_all(&mut f, bytes).map_err(err)?;
        if stop(2) {
            return Ok(());
        }
        f.sync_all().map_err(err)?;
        drop(f);
        if stop(3) {
            return Ok(());
        }
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if stop(4) {
            return Ok(());
        }
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)
    }

    pub fn replace(&self, bytes: &[u8]) -> Result<(), StorageError> {
        self.replace_steps(bytes, None)
    }
}
