//! A store file on disk is created once and never silently re-created.
//!
//! redb takes a zero-length file for a new database, and a store re-created by mistake is data
//! lost without a word: an agent would start a new epoch and forget its unacknowledged batches, a
//! collector would forget its dedup state and count resent batches again. So the first commit of
//! a store leaves a marker beside it (`<file>.created`), and [`check`] refuses to open, with an
//! error that says what to look at:
//! - a file that is missing while its marker is there (deleted, or the wrong `--data-dir`),
//! - an empty file (a failed restore, a full disk at creation),
//! - a file that is not a redb database (foreign or overwritten).
//!
//! A truncated file is refused by redb itself when it opens ("file truncated below stored
//! layout"); a test here holds redb to that.
//!
//! Files are made readable by their owner only (0600) and data directories 0700: a store holds
//! usage, keys and tokens' hashes.
//!
//! ```
//! # fn main() -> Result<(), tally_storefile::StoreFileError> {
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("store.redb");
//! assert_eq!(tally_storefile::check(&path)?, tally_storefile::Found::Nothing);
//! std::fs::write(&path, b"")?; // what a failed restore leaves
//! assert!(matches!(tally_storefile::check(&path), Err(tally_storefile::StoreFileError::Empty { .. })));
//! # Ok(()) }
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The first bytes of every redb file (redb's file format, version 3 and later).
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// What [`check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No store and no marker: a new store may be created here.
    Nothing,
    /// A store that looks whole.
    Store,
}

/// Why a store file will not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreFileError {
    /// The marker says a store was created here, and the file is gone.
    #[error(
        "{path} is missing, but {marker} says a store was created here: check --data-dir and \
         restore the file from a backup; delete the marker only to start over with no data"
    )]
    Missing {
        /// The store file.
        path: PathBuf,
        /// Its marker.
        marker: PathBuf,
    },
    /// A zero-length file.
    #[error(
        "{path} is empty (0 bytes), so it is not a store: restore it from a backup, or delete it \
         (and {marker}, if present) to start a new store with no data"
    )]
    Empty {
        /// The store file.
        path: PathBuf,
        /// Its marker.
        marker: PathBuf,
    },
    /// Not a redb file.
    #[error(
        "{path} is not a Tally store (it does not start with redb's header): check --data-dir, \
         or restore the file from a backup"
    )]
    Foreign {
        /// The store file.
        path: PathBuf,
    },
    /// Reading or writing the file, its marker or its directory failed.
    #[error("{path}: {source}")]
    Io {
        /// What was being read or written.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl From<io::Error> for StoreFileError {
    fn from(source: io::Error) -> Self {
        StoreFileError::Io {
            path: PathBuf::new(),
            source,
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreFileError + '_ {
    move |source| StoreFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The marker of the store at `path`: `<path>.created`.
pub fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".created");
    path.with_file_name(name)
}

/// Checks the store file at `path` before it is opened; see the module doc for what is refused.
pub fn check(path: &Path) -> Result<Found, StoreFileError> {
    let marker = marker_path(path);
    let marked = marker.try_exists().map_err(io_at(&marker))?;
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return match marked {
                true => Err(StoreFileError::Missing {
                    path: path.to_path_buf(),
                    marker,
                }),
                false => Ok(Found::Nothing),
            };
        }
        Err(e) => return Err(io_at(path)(e)),
    };
    let len = file.metadata().map_err(io_at(path))?.len();
    if len == 0 {
        return Err(StoreFileError::Empty {
            path: path.to_path_buf(),
            marker,
        });
    }
    let mut head = [0u8; REDB_MAGIC.len()];
    let n = read_up_to(&mut file, &mut head).map_err(io_at(path))?;
    if n < head.len() || head != REDB_MAGIC {
        return Err(StoreFileError::Foreign {
            path: path.to_path_buf(),
        });
    }
    Ok(Found::Store)
}

/// Records that the store at `path` exists; call it after the store's first commit. The marker
/// is written to a temporary file, synced, and renamed into place, and the directory is synced,
/// so after a crash it is either there or not.
pub fn mark(path: &Path) -> Result<(), StoreFileError> {
    let marker = marker_path(path);
    let tmp = marker.with_extension("created.tmp");
    {
        let mut f = private_file_options().open(&tmp).map_err(io_at(&tmp))?;
        writeln!(f, "tally store").map_err(io_at(&tmp))?;
        f.sync_all().map_err(io_at(&tmp))?;
    }
    std::fs::rename(&tmp, &marker).map_err(io_at(&marker))?;
    if let Some(dir) = marker.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(dir))?;
    }
    Ok(())
}

/// Creates `dir` (and its parents) if needed and makes it private to its owner (0700).
pub fn private_dir(dir: &Path) -> Result<(), StoreFileError> {
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    set_mode(dir, 0o700)
}

/// Makes an existing file private to its owner (0600).
pub fn private_file(path: &Path) -> Result<(), StoreFileError> {
    set_mode(path, 0o600)
}

/// Writes `bytes` to a new file at `path` readable by its owner only (0600), replacing it.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StoreFileError> {
    let mut f = private_file_options()
        .truncate(true)
        .open(path)
        .map_err(io_at(path))?;
    f.write_all(bytes).map_err(io_at(path))?;
    f.sync_all().map_err(io_at(path))?;
    // `mode` applies only when the file is created; an older file keeps its mode otherwise.
    private_file(path)
}

fn private_file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<(), StoreFileError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_at(path))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<(), StoreFileError> {
    Ok(())
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn new_store(dir: &Path) -> PathBuf {
        let path = dir.join("s.redb");
        assert_eq!(check(&path).unwrap(), Found::Nothing);
        let db = redb::Database::create(&path).unwrap();
        const T: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("t");
        let txn = db.begin_write().unwrap();
        txn.open_table(T).unwrap().insert(1, 2).unwrap();
        txn.commit().unwrap();
        drop(db);
        mark(&path).unwrap();
        path
    }

    #[test]
    fn a_marked_store_opens_and_a_missing_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_store(dir.path());
        assert_eq!(check(&path).unwrap(), Found::Store);
        std::fs::remove_file(&path).unwrap();
        let e = check(&path).unwrap_err();
        assert!(matches!(e, StoreFileError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("--data-dir"));
    }

    #[test]
    fn empty_truncated_and_foreign_files_are_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_store(dir.path());
        let whole = std::fs::read(&path).unwrap();

        // Truncation: redb refuses it when it opens, and check() leaves it to redb.
        std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        assert_eq!(check(&path).unwrap(), Found::Store);
        let Err(e) = redb::Database::create(&path) else {
            panic!("redb opened a truncated file");
        };
        assert!(e.to_string().contains("truncated"), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            &whole[..whole.len() / 2],
            "left as it was"
        );
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(check(&path), Err(StoreFileError::Empty { .. })));
        std::fs::write(&path, b"SQLite format 3\0 and so on").unwrap();
        assert!(matches!(check(&path), Err(StoreFileError::Foreign { .. })));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"SQLite format 3\0 and so on"
        );
        // Without a marker (a store from before markers), an empty file is still refused.
        std::fs::remove_file(marker_path(&path)).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(check(&path), Err(StoreFileError::Empty { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn files_and_dirs_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        private_dir(&sub).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sub), 0o700);
        let f = sub.join("token");
        std::fs::write(&f, b"old").unwrap();
        write_private(&f, b"secret").unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(std::fs::read(&f).unwrap(), b"secret");
        let path = new_store(&sub);
        assert_eq!(mode(&marker_path(&path)), 0o600);
    }
}
