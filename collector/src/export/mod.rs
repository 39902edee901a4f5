//! The analytics export: the ledger as Parquet (or NDJSON) files for the warehouse, continuous
//! and exactly once (docs/decisions/0050).
//!
//! - [`core`]: the sans-IO state machine (plans, file names, manifest, checkpoint rule);
//! - [`encode`]: rows to bytes, deterministic;
//! - this module: the shell that reads the store, writes files (temporary name, fsync, rename,
//!   fsync the directory) and saves the manifest; [`spawn`] runs it every interval.
//!
//! Layout of an export directory:
//! `manifest.json`, `transfers/date=YYYY-MM-DD/transfers-<first>-<last>.parquet` and
//! `usage_hourly/date=YYYY-MM-DD/usage_hourly-<first>-<last>.parquet`.

pub mod core;
pub mod encode;
pub mod route;

use self::core::{Action, CoreError, Dataset, Exporter, FileEntry, Format, MANIFEST, Manifest};
use self::encode::{EncodeError, Row};
use crate::core::ledger::{AccountId, AccountKey};
use crate::store::{Store, StoreError};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Accounts remembered between reads; past this the cache is emptied (it only saves reads).
pub const ACCOUNT_CACHE_LIMIT: usize = 100_000;

/// Settings of an export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The export directory.
    pub dir: PathBuf,
    /// The encoding.
    pub format: Format,
    /// Positions per file at most (clamped to 1..=[`core::MAX_ROWS_PER_FILE`]).
    pub max_rows_per_file: u64,
}

impl ExportOptions {
    /// Parquet, [`core::MAX_ROWS_PER_FILE`] rows per file.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ExportOptions {
            dir: dir.into(),
            format: Format::Parquet,
            max_rows_per_file: core::MAX_ROWS_PER_FILE,
        }
    }
}

/// An export failure. Files written so far stay; the next run goes on from the checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading or writing the export directory failed.
    #[error("export directory {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The manifest does not parse.
    #[error("manifest {path}: {source}")]
    Manifest {
        /// The path.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
    /// The core refused (incompatible directory, gap in the ledger).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// Encoding failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A transfer's usage account is not in the store.
    #[error("ledger position {0}: the transfer's usage account is missing")]
    MissingAccount(u64),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Files written (both data sets).
    pub files: u64,
    /// Ledger positions exported.
    pub rows: u64,
    /// Bytes written.
    pub bytes: u64,
    /// The checkpoint after the run.
    pub last_position: u64,
    /// Nothing was done: another exporter sharing the store holds this directory's claim.
    pub held_by_other: bool,
}

/// How long an export claim lasts without renewal; every run renews it before each file plan
/// (decision 0098).
pub const CLAIM_TTL_MS: i64 = 120_000;

/// The claim's name for an export directory.
fn claim_name(dir: &Path) -> String {
    format!("export:{}", dir.display())
}

/// A holder name unique to this process: `<what>-<pid>-<random>`.
pub fn claim_holder(what: &str) -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::getrandom(&mut b);
    format!("{what}-{}-{}", std::process::id(), hex::encode(b))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// [`export_once`] under the store's claim on the directory (one exporter at a time among the
/// collectors sharing a store): claimed (or renewed) first and again before each file plan; a
/// claim held by another returns `held_by_other` with nothing done, and a claim lost midway
/// stops the run after its current plan (the next holder resumes from the manifest).
pub fn export_claimed(
    store: &dyn Store,
    opts: &ExportOptions,
    holder: &str,
) -> Result<ExportReport, ExportError> {
    let name = claim_name(&opts.dir);
    let claim = || {
        let now = now_ms();
        store.claim(&name, holder, now, now.saturating_add(CLAIM_TTL_MS))
    };
    if !claim()? {
        return Ok(ExportReport {
            held_by_other: true,
            ..ExportReport::default()
        });
    }
    export_while(store, opts, &mut || claim().unwrap_or(false))
}

/// Reads the manifest of `dir`, if any.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>, ExportError> {
    let path = dir.join(MANIFEST);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|source| ExportError::Manifest { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

/// Writes `bytes` to `dir/rel` through a temporary name in the same directory: write, fsync,
/// rename, fsync the directory. A crash leaves either the old file or the new one, plus at most
/// a temporary file that the next run removes.
fn write_atomic(dir: &Path, rel: &str, bytes: &[u8]) -> Result<(), ExportError> {
    let target = dir.join(rel);
    let parent = target.parent().unwrap_or(dir).to_owned();
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = parent.join(format!("{}{name}", core::TEMP_PREFIX));
    {
        let mut f = std::fs::File::create(&temp).map_err(io(&temp))?;
        f.write_all(bytes).map_err(io(&temp))?;
        f.sync_all().map_err(io(&temp))?;
    }
    std::fs::rename(&temp, &target).map_err(io(&target))?;
    sync_dir(&parent)
}

fn sync_dir(dir: &Path) -> Result<(), ExportError> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

fn remove_temps(dir: &Path) -> Result<(), ExportError> {
    fn walk(p: &Path) -> Result<(), ExportError> {
        let rd = match std::fs::read_dir(p) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(p)(e)),
        };
        for entry in rd {
            let entry = entry.map_err(io(p))?;
            let path = entry.path();
            if path.is_dir() {
                walk(&path)?;
            } else if entry
                .file_name()
                .to_string_lossy()
                .starts_with(core::TEMP_PREFIX)
            {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }
    walk(dir)
}

/// Resolves transfers to rows: finds the usage account each one touches.
struct Resolver<'a> {
    store: &'a dyn Store,
    accounts: HashMap<AccountId, AccountKey>,
    /// The transfers read for planning, reused when they cover a plan (saves a second read).
    prefetched: Vec<(u64, crate::core::ledger::Transfer)>,
}

impl Resolver<'_> {
    fn rows(&mut self, first: u64, last: u64) -> Result<Vec<Row>, ExportError> {
        let n = usize::try_from(last - first + 1).unwrap_or(usize::MAX);
        let pre = std::mem::take(&mut self.prefetched);
        let entries = if pre.first().is_some_and(|(p, _)| *p == first) && pre.len() >= n {
            let mut pre = pre;
            pre.truncate(n);
            pre
        } else {
            self.store.entries(None, first - 1, n)?
        };
        let mut rows = Vec::with_capacity(entries.len());
        let mut expect = first;
        for (pos, t) in entries {
            if pos != expect {
                return Err(CoreError::Gap {
                    after: expect - 1,
                    got: pos,
                }
                .into());
            }
            expect += 1;
            if matches!(t.source, crate::core::ledger::TransferSource::Grant { .. }) {
                // Grants raise limits; they are not usage (no usage account to resolve).
                continue;
            }
            let (id, credited) = match (self.lookup(&t, t.credit)?, self.lookup(&t, t.debit)?) {
                (Some(k), _) => (k, true),
                (None, Some(k)) => (k, false),
                (None, None) => return Err(ExportError::MissingAccount(pos)),
            };
            rows.push(Row::new(pos, t, &id, credited));
        }
        if expect != last + 1 {
            return Err(CoreError::Gap {
                after: expect - 1,
                got: last,
            }
            .into());
        }
        Ok(rows)
    }

    /// The usage account `id` of the transfer's customer, if `id` is one.
    fn lookup(
        &mut self,
        t: &crate::core::ledger::Transfer,
        id: AccountId,
    ) -> Result<Option<AccountKey>, ExportError> {
        if let Some(k) = self.accounts.get(&id) {
            return Ok(Some(k.clone()));
        }
        if self.accounts.len() >= ACCOUNT_CACHE_LIMIT {
            self.accounts.clear();
        }
        for a in self
            .store
            .usage_accounts(&t.customer, Some(&t.unit), None)?
        {
            self.accounts.insert(a.key.id(), a.key);
        }
        Ok(self.accounts.get(&id).cloned())
    }
}

/// Exports everything the ledger holds after the checkpoint, then returns. Safe to kill at any
/// point: the next run re-creates what was pending and goes on.
pub fn export_once(store: &dyn Store, opts: &ExportOptions) -> Result<ExportReport, ExportError> {
    export_while(store, opts, &mut || true)
}

/// [`export_once`], asking `keep` before each new plan (false: stop there).
fn export_while(
    store: &dyn Store,
    opts: &ExportOptions,
    keep: &mut dyn FnMut() -> bool,
) -> Result<ExportReport, ExportError> {
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let manifest = read_manifest(dir)?;
    let (mut ex, actions) = Exporter::start(manifest, opts.format, opts.max_rows_per_file)?;
    let mut resolver = Resolver {
        store,
        accounts: HashMap::new(),
        prefetched: Vec::new(),
    };
    let mut report = ExportReport::default();
    run_actions(&mut ex, actions, &mut resolver, opts, &mut report)?;
    loop {
        let limit =
            usize::try_from(opts.max_rows_per_file.clamp(1, core::MAX_ROWS_PER_FILE)).unwrap_or(1);
        let entries = store.entries(None, ex.checkpoint(), limit)?;
        if entries.is_empty() || !keep() {
            break;
        }
        let meta: Vec<(u64, i64)> = entries.iter().map(|(p, t)| (*p, t.posted_at_ms)).collect();
        let actions = ex.offer(&meta)?;
        resolver.prefetched = entries;
        run_actions(&mut ex, actions, &mut resolver, opts, &mut report)?;
    }
    report.last_position = ex.checkpoint();
    Ok(report)
}

fn run_actions(
    ex: &mut Exporter,
    mut actions: Vec<Action>,
    resolver: &mut Resolver<'_>,
    opts: &ExportOptions,
    report: &mut ExportReport,
) -> Result<(), ExportError> {
    let dir = &opts.dir;
    let mut cached: Option<(u64, Vec<Row>)> = None;
    while !actions.is_empty() {
        let action = actions.remove(0);
        match action {
            Action::RemoveTemps => remove_temps(dir)?,
            Action::SaveManifest(m) => {
                let bytes =
                    serde_json::to_vec_pretty(&m).map_err(|source| ExportError::Manifest {
                        path: dir.join(MANIFEST),
                        source,
                    })?;
                write_atomic(dir, MANIFEST, &bytes)?;
            }
            Action::WriteFile {
                plan,
                dataset,
                path,
            } => {
                if cached
                    .as_ref()
                    .is_none_or(|(first, _)| *first != plan.first)
                {
                    cached = Some((plan.first, resolver.rows(plan.first, plan.last)?));
                }
                let rows = cached.as_ref().map(|(_, r)| r.as_slice()).unwrap_or(&[]);
                let (bytes, n) = match dataset {
                    Dataset::Transfers => encode::encode_transfers(rows, opts.format)?,
                    Dataset::UsageHourly => encode::encode_hourly(rows, opts.format)?,
                };
                write_atomic(dir, &path, &bytes)?;
                report.files += 1;
                report.bytes += bytes.len() as u64;
                if dataset == Dataset::Transfers {
                    report.rows += n;
                }
                let entry = FileEntry {
                    path,
                    dataset,
                    first_position: plan.first,
                    last_position: plan.last,
                    rows: n,
                    bytes: bytes.len() as u64,
                    sha256: hex::encode(Sha256::digest(&bytes)),
                };
                actions.extend(ex.written(entry));
            }
        }
    }
    Ok(())
}

/// The continuous export of a running collector.
#[derive(Debug, Clone)]
pub struct ExportJob {
    /// Where and how.
    pub options: ExportOptions,
    /// How often.
    pub interval: Duration,
}

/// Serialises runs of one export directory (the job and `POST /v1/export`).
#[derive(Clone)]
pub struct ExportRunner {
    store: Arc<dyn Store>,
    options: ExportOptions,
    lock: Arc<tokio::sync::Mutex<()>>,
    /// This collector's name in the store's export claim.
    holder: Arc<str>,
}

impl ExportRunner {
    /// A runner over `store`.
    pub fn new(store: Arc<dyn Store>, options: ExportOptions) -> Self {
        ExportRunner {
            store,
            options,
            lock: Arc::new(tokio::sync::Mutex::new(())),
            holder: claim_holder("collector").into(),
        }
    }

    /// Exports what is new, off the async workers; one run at a time.
    pub async fn run(&self) -> Result<ExportReport, ExportError> {
        let _guard = self.lock.lock().await;
        let (store, opts, holder) = (
            self.store.clone(),
            self.options.clone(),
            self.holder.clone(),
        );
        match tokio::task::spawn_blocking(move || export_claimed(store.as_ref(), &opts, &holder))
            .await
        {
            Ok(r) => r,
            Err(e) => Err(ExportError::Io {
                path: self.options.dir.clone(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }
}

/// Runs the export every `interval` until `stop` flips to true; failures are logged and retried
/// at the next tick.
pub fn spawn(
    runner: ExportRunner,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                break;
            }
            match runner.run().await {
                Ok(r) if r.rows > 0 => tracing::info!(
                    rows = r.rows,
                    files = r.files,
                    bytes = r.bytes,
                    last_position = r.last_position,
                    "exported"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "export failed; retrying at the next interval")
                }
            }
        }
    })
}
