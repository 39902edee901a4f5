//! The files of a collector's data directory, and `tally-collector init`.
//!
//! Owns the layout of `data_dir`: `ca.pem`, `ca.key` (the deployment's CA), `collector.pem`,
//! `collector.key` (the collector's certificate, signed by the CA), `admin-token`,
//! `enroll-token` and `collector.redb` (the store).
//!
//! Guarantees: [`init`] never overwrites an existing file (run it twice, nothing changes);
//! secrets (`*.key`, tokens) are created with mode 0600; tokens are 32 random bytes from the OS,
//! hex-encoded. Token values are never logged.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why `init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The OS random generator failed.
    #[error("random: {0}")]
    Random(getrandom::Error),
    /// Only `ca.pem` or only `ca.key` exists, or a certificate without its key.
    #[error("{0} exists without its pair; remove it or restore the other file")]
    HalfPair(PathBuf),
    /// The data directory could not be created or made private.
    #[error(transparent)]
    Dir(tally_storefile::StoreFileError),
}

/// The paths of a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitFiles {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The CA certificate agents trust.
    pub ca_pem: PathBuf,
    /// The CA key.
    pub ca_key: PathBuf,
    /// The collector's certificate.
    pub collector_pem: PathBuf,
    /// The collector's key.
    pub collector_key: PathBuf,
    /// The admin API token.
    pub admin_token: PathBuf,
    /// The agents' enrolment token.
    pub enroll_token: PathBuf,
    /// The embedded store.
    pub store: PathBuf,
}

impl InitFiles {
    /// The paths under `data_dir` (nothing is read or written).
    pub fn at(data_dir: &Path) -> Self {
        let p = |n: &str| data_dir.join(n);
        InitFiles {
            data_dir: data_dir.to_path_buf(),
            ca_pem: p("ca.pem"),
            ca_key: p("ca.key"),
            collector_pem: p("collector.pem"),
            collector_key: p("collector.key"),
            admin_token: p("admin-token"),
            enroll_token: p("enroll-token"),
            store: p("collector.redb"),
        }
    }

    /// Reads a token file, trimmed.
    pub fn read_token(path: &Path) -> Result<String, InitError> {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|source| InitError::Io {
                path: path.to_path_buf(),
                source,
            })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InitError + '_ {
    move |source| InitError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `path` with `contents`, failing if it exists; mode 0600 when `secret`.
fn create_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), InitError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(contents).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// 32 random bytes from the OS, hex.
pub fn random_token() -> Result<String, InitError> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(InitError::Random)?;
    Ok(hex::encode(b))
}

fn ca_params() -> Result<CertificateParams, InitError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "tally deployment ca");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Creates whatever is missing in `data_dir`: the CA, the collector certificate (SANs
/// `localhost`, `127.0.0.1`, `::1` and `extra_sans`), and the tokens. Never overwrites.
pub fn init(data_dir: &Path, extra_sans: &[String]) -> Result<InitFiles, InitError> {
    tally_storefile::private_dir(data_dir).map_err(InitError::Dir)?;
    let f = InitFiles::at(data_dir);
    for (a, b) in [(&f.ca_pem, &f.ca_key), (&f.collector_pem, &f.collector_key)] {
        match (a.exists(), b.exists()) {
            (true, false) => return Err(InitError::HalfPair(a.clone())),
            (false, true) => return Err(InitError::HalfPair(b.clone())),
            _ => {}
        }
    }
    if !f.ca_pem.exists() {
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        create_new(&f.ca_key, key.serialize_pem().as_bytes(), true)?;
        create_new(&f.ca_pem, cert.pem().as_bytes(), false)?;
    }
    if !f.collector_pem.exists() {
        let ca_key_pem = std::fs::read_to_string(&f.ca_key).map_err(io(&f.ca_key))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        // The issuer's name and key identifier come from the same parameters and key that made
        // `ca.pem`, so the chain verifies.
        let issuer = Issuer::new(ca_params()?, ca_key);
        let mut sans = vec![
            String::from("localhost"),
            String::from("127.0.0.1"),
            String::from("::1"),
        ];
        sans.extend(extra_sans.iter().cloned());
        let mut params = CertificateParams::new(sans)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "tally collector");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        create_new(&f.collector_key, key.serialize_pem().as_bytes(), true)?;
        create_new(&f.collector_pem, cert.pem().as_bytes(), false)?;
    }
    for path in [&f.admin_token, &f.enroll_token] {
        if !path.exists() {
            create_new(path, format!("{}\n", random_token()?).as_bytes(), true)?;
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let f = init(dir.path(), &[String::from("collector.internal")]).unwrap();
        let before: Vec<Vec<u8>> = [&f.ca_pem, &f.collector_pem, &f.admin_token, &f.enroll_token]
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        let g = init(dir.path(), &[]).unwrap();
        let after: Vec<Vec<u8>> = [&g.ca_pem, &g.collector_pem, &g.admin_token, &g.enroll_token]
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        assert_eq!(before, after);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for p in [&f.ca_key, &f.collector_key, &f.admin_token, &f.enroll_token] {
                let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", p.display());
            }
        }
        assert_eq!(InitFiles::read_token(&f.admin_token).unwrap().len(), 64);
    }
}
