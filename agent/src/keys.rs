//! The agent's ed25519 identity key, kept in `data_dir/agent.key`.
//!
//! Owns the key file: 32 raw bytes (the ed25519 seed), created on first start with mode 0600 via
//! a temporary file, fsync and rename, so a crash leaves either no key or a whole one. Guarantees
//! the same key, hence the same [`tally_protocol::batch::AgentId`], on every later start; a file
//! of the wrong length is refused rather than replaced.

use crate::error::StoreError;
use ed25519_dalek::SigningKey;
use std::io::Write;
use std::path::Path;

/// File name of the key inside `data_dir`.
pub const KEY_FILE: &str = "agent.key";

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Loads the key in `dir`, creating it on first use.
pub fn load_or_create(dir: &Path) -> Result<SigningKey, StoreError> {
    let path = dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let seed: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt {
                    table: "agent.key",
                    detail: format!("expected 32 bytes, found {}", bytes.len()),
                })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(dir, &path),
        Err(e) => Err(io(&path, e)),
    }
}

fn create(dir: &Path, path: &Path) -> Result<SigningKey, StoreError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| io(path, std::io::Error::other(e.to_string())))?;
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(&seed).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    tracing::info!(path = %path.display(), "created agent key");
    Ok(SigningKey::from_bytes(&seed))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn created_once_with_mode_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join(KEY_FILE), [1, 2, 3]).unwrap();
        assert!(load_or_create(dir.path()).is_err());
    }
}
