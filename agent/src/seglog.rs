//! The durable log of `record_durable`: an append-only log of segment files, one `fdatasync`
//! per group commit.
//!
//! Owns `data_dir/log/`: the events `record_durable` acknowledged and the sealer has not yet
//! folded into a sealed batch. The sealer reads them from here; the fold itself is committed in
//! the store (`Store::commit_seal` writes the highest folded lsn, `log_folded`, in the same redb
//! transaction as the batches), and only then does this log release the segments below it.
//!
//! # Format (version 1)
//!
//! Files `seg-<first lsn, 20 digits>.tlog`, each a 32-byte header then records back to back:
//!
//! | bytes | header field                                   |
//! |-------|------------------------------------------------|
//! | 0..8  | magic `TLYSEG01`                               |
//! | 8..16 | first lsn of the segment, u64 LE               |
//! | 16..20| CRC-32 (IEEE) of bytes 0..16, u32 LE           |
//! | 20..32| zero                                           |
//!
//! | bytes     | record field                                               |
//! |-----------|------------------------------------------------------------|
//! | 0..4      | payload length `n`, u32 LE (0 = end of log)                |
//! | 4..8      | CRC-32 of bytes 8..16 and of the payload, u32 LE           |
//! | 8..16     | lsn, u64 LE: the previous record's lsn + 1                 |
//! | 16..16+n  | payload: one request's events (postcard `Vec<LoggedEvent>`)|
//!
//! One record is one `record_durable_all` request, so a request is on disk whole or not at all.
//! `spare-<n>.tlog` files are preallocated (zero-filled) or recycled segments waiting to be used.
//!
//! # Guarantees
//! - **Acknowledged means synced.** [`SegmentLog::write`] writes a group of records with one
//!   `pwrite` and queues the group; a syncer ([`SegmentLog::sync`], [`SegmentLog::run_syncer`])
//!   runs one `fdatasync` over everything written when it starts, and a group's [`Done`] is
//!   called with `Ok` only after a sync that started after its write returned. The commit is
//!   pipelined: the writer writes group N+1 while N's sync runs, and several syncs may run at
//!   once (each covers every write before its start). Completions are taken in the order the
//!   syncs started, so a sync that returns early waits for the ones before it.
//! - **A failed sync fails everything in flight.** Linux reports a writeback error to one
//!   `fsync` only, so a sync that succeeds beside a failing one proves nothing: on any sync
//!   error every group not yet acknowledged fails (its `Done` gets the error), the end of the
//!   log goes back to the last durable record, and the results of syncs still running are
//!   ignored. The [`append`](SegmentLog::append) of one group (write + sync) is the same path.
//! - **A new segment starts only with nothing in flight** (the writer syncs first), so a crash
//!   never leaves an unsynced hole at the end of a segment that is followed by another.
//! - **Torn or corrupt tail cut on open.** Every segment is synced when opened (what is read
//!   may sit only in the page cache after a failed sync). Records are read while their length fits, their CRC
//!   matches and their lsn follows; the first that does not ends the log. The rest of the last
//!   segment is zeroed (and synced) before anything is appended, so bytes of a write that was
//!   never acknowledged cannot come back behind a later record. A segment other than the last
//!   that ends early, or a segment whose first lsn does not follow, is corruption and refused
//!   ([`LogError::Corrupt`]), never skipped.
//! - **Exactly once.** Records with lsn ≤ `folded` (the store's watermark, committed with the
//!   batches that fold them) are never returned again; a segment is recycled only once all its
//!   records are ≤ `folded`. A crash between the store's commit and the recycling leaves
//!   segments that the next open recycles.
//! - **A failed write is overwritten.** After a write or sync error the end of the log does not
//!   move (or moves back to the last durable record); the next group is written there, padded
//!   with zeros over everything the failed ones may have left, so an unacknowledged record cannot
//!   surface after a crash behind an acknowledged one.
//! - **Bounded disk.** At most [`LogConfig::spares`] spare segments are kept; preallocation
//!   happens when a segment is opened, so overwriting preallocated blocks needs no new space.
//! - Files are 0600, the directory 0700; `log.created` beside it marks that a log was created,
//!   and a missing directory, an empty or foreign segment file is refused.

use crate::store::DiskFaults;
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

/// Bytes of a segment header.
pub const SEGMENT_HEADER: u64 = 32;
/// Bytes of a record header.
pub const RECORD_HEADER: u64 = 16;
/// The largest payload of one record.
pub const MAX_RECORD: u64 = 64 << 20;
const MAGIC: &[u8; 8] = b"TLYSEG01";
/// How long a syncer waits at most, once something is written, for as many records as the last
/// sync acknowledged before it starts the next sync. Callers of `record_durable` come back as a
/// cohort after an answer (waking them, their next request, its write: ≈ 50 µs here); without
/// the wait the first few start a sync alone and the rest queue behind it, so on a disk whose
/// concurrent flushes do not overlap each caller waits for two syncs (decision 0130).
const SYNC_LINGER: Duration = Duration::from_micros(60);
/// The largest cohort a syncer lingers for: a larger one already shares its sync widely, and
/// arriving as a stream it would not fill within [`SYNC_LINGER`], so every sync would start
/// late (256 callers: ≈ 15 % fewer events/s when it did).
const LINGER_COHORT_MAX: u64 = 64;

/// Why the log could not be opened, written or read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Reading or writing a file failed.
    #[error("durable log {op} {name}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        name: String,
        /// The cause.
        source: io::Error,
    },
    /// The log is damaged other than at its tail, or a file in it is not a segment.
    #[error("durable log is corrupt: {0}; restore the data directory from a backup")]
    Corrupt(String),
    /// The marker says a log was created here and the directory is gone.
    #[error(
        "durable log {0} is missing, but its marker says it was created: check --data-dir and \
         restore it from a backup"
    )]
    Missing(PathBuf),
}

fn io_err<'a>(op: &'static str, name: &'a str) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        op,
        name: name.to_owned(),
        source,
    }
}

/// One file of the log, as the log needs it (positional I/O). [`FsDir`] is the real one; tests
/// put a fake behind it that loses unsynced writes or fails on demand.
pub trait SegFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `off`; fewer at the end of the file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn size(&self) -> io::Result<u64>;
}

/// The log's directory.
pub trait LogDir: Send + Sync {
    /// File names in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, name: &str) -> io::Result<Arc<dyn SegFile>>;
    /// Creates a new empty file (0600); fails if it exists.
    fn create(&self, name: &str) -> io::Result<Arc<dyn SegFile>>;
    /// Renames a file (atomic).
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Deletes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and deletions durable.
    fn sync(&self) -> io::Result<()>;
}

/// A directory on the real file system.
#[derive(Debug, Clone)]
pub struct FsDir {
    path: PathBuf,
    faults: Option<DiskFaults>,
}

impl FsDir {
    /// Opens `path` as the log's directory, creating it (0700) and its marker the first time.
    /// A directory whose marker is there while the directory is not is refused.
    pub fn open(path: &Path) -> Result<FsDir, LogError> {
        let name = path.display().to_string();
        let marker = tally_storefile::marker_path(path);
        let exists = path.try_exists().map_err(io_err("stat", &name))?;
        let marked = marker.try_exists().map_err(io_err("stat", &name))?;
        if marked && !exists {
            return Err(LogError::Missing(path.to_path_buf()));
        }
        tally_storefile::private_dir(path).map_err(|e| LogError::Io {
            op: "create",
            name: name.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        if !marked {
            tally_storefile::mark(path).map_err(|e| LogError::Io {
                op: "mark",
                name,
                source: io::Error::other(e.to_string()),
            })?;
        }
        Ok(FsDir {
            path: path.to_path_buf(),
            faults: None,
        })
    }

    /// Routes writes, syncs and creations through `faults` (tests).
    pub fn with_faults(mut self, faults: Option<DiskFaults>) -> Self {
        self.faults = faults;
        self
    }

    fn check(&self) -> io::Result<()> {
        self.faults.as_ref().map_or(Ok(()), DiskFaults::check)
    }
}

struct FsFile(std::fs::File, Option<DiskFaults>);

impl FsFile {
    fn check(&self) -> io::Result<()> {
        self.1.as_ref().map_or(Ok(()), DiskFaults::check)
    }
}

impl SegFile for FsFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut n = 0;
        while n < buf.len() {
            match self.0.read_at(&mut buf[n..], off + n as u64)? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.check()?;
        self.0.write_all_at(buf, off)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.check()?;
        self.0.sync_data()
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl LogDir for FsDir {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.path)? {
            if let Some(n) = e?.file_name().to_str() {
                out.push(n.to_owned());
            }
        }
        Ok(out)
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn SegFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path.join(name))?;
        Ok(Arc::new(FsFile(f, self.faults.clone())))
    }
    fn create(&self, name: &str) -> io::Result<Arc<dyn SegFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        self.check()?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.path.join(name))?;
        Ok(Arc::new(FsFile(f, self.faults.clone())))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.check()?;
        std::fs::rename(self.path.join(from), self.path.join(to))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }
    fn sync(&self) -> io::Result<()> {
        self.check()?;
        std::fs::File::open(&self.path)?.sync_all()
    }
}

/// Sizes of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Bytes a segment is preallocated to (a larger group still fits: the file grows).
    pub segment_bytes: u64,
    /// Released segments kept for reuse at most (the rest are deleted).
    pub spares: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 8 << 20,
            spares: 2,
        }
    }
}

/// A record read back: its lsn and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its lsn.
    pub lsn: u64,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Called once with a group's outcome: `Ok(first lsn)` once it is durable, `Err` if it never
/// will be (its write or a sync failed). Called without the log's lock held; it must not block.
pub type Done = Box<dyn FnOnce(Result<u64, LogError>) + Send>;

/// A copy of `e` for every group a failure fails (`io::Error` is not `Clone`).
fn dup(e: &LogError) -> LogError {
    match e {
        LogError::Io { op, name, source } => LogError::Io {
            op,
            name: name.clone(),
            source: io::Error::new(source.kind(), source.to_string()),
        },
        LogError::Corrupt(s) => LogError::Corrupt(s.clone()),
        LogError::Missing(p) => LogError::Missing(p.clone()),
    }
}

/// A group written and not yet known durable.
struct Inflight {
    /// Its write's sequence number (never reused, unlike lsns after a rollback).
    seq: u64,
    first_lsn: u64,
    last_lsn: u64,
    /// Where it starts and ends in the active segment.
    off: u64,
    end: u64,
    done: Done,
}

/// A sync that started: its id, the last write seq it covers, the generation, its result.
struct Started {
    id: u64,
    upto: u64,
    generation: u64,
    ok: bool,
}

/// A sync to run: [`SegmentLog::sync_begin`] hands it out, the caller runs
/// [`SyncJob::run`] without any lock, then gives the result to [`SegmentLog::sync_end`].
pub struct SyncJob {
    id: u64,
    generation: u64,
    name: String,
    file: Arc<dyn SegFile>,
}

impl std::fmt::Debug for SyncJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncJob").field("id", &self.id).finish()
    }
}

impl SyncJob {
    /// The `fdatasync`.
    pub fn run(&self) -> Result<(), LogError> {
        self.file.sync_data().map_err(io_err("sync", &self.name))
    }
}

/// A segment as a reader sees it: first lsn, name, file, end, last lsn.
type SegView = (u64, String, Arc<dyn SegFile>, u64, u64);

struct Segment {
    first_lsn: u64,
    name: String,
    file: Arc<dyn SegFile>,
    /// Offset after its last durable record.
    end: u64,
    /// Its last durable record's lsn (`first_lsn - 1` while empty).
    last_lsn: u64,
    /// Offset after its last written record (durable or in flight).
    wend: u64,
}

struct State {
    segments: VecDeque<Segment>,
    spares: Vec<String>,
    next_spare: u64,
    next_lsn: u64,
    folded: u64,
    /// Where the first record after `folded` is: (segment's first lsn, offset).
    fold_pos: (u64, u64),
    /// Bytes past the end that a failed write may have left (zeroed by the next group).
    dirty_tail: u64,
    /// The next append starts a new segment (the last one does not end at `next_lsn - 1`).
    force_new: bool,
    /// Durable records after `folded` and their bytes (headers included).
    unfolded: (u64, u64),
    /// Groups written, not yet durable, in write order (all in the last segment).
    inflight: VecDeque<Inflight>,
    /// The next write's seq.
    next_seq: u64,
    /// The highest write seq a started sync covers.
    covered: u64,
    /// Syncs started and not yet taken, in start order.
    started: VecDeque<Started>,
    next_sync: u64,
    /// Bumped by every rollback; a sync of an older generation proves nothing.
    generation: u64,
    /// [`SegmentLog::close`] was called: syncers end once nothing is in flight.
    closed: bool,
    /// Records the last successful sync acknowledged: the size of the cohort of callers it
    /// answered, which a syncer lingers for (up to its cap) before starting the next sync.
    last_cohort: u64,
    /// When the oldest write not covered by a started sync was made.
    uncovered_since: Option<std::time::Instant>,
}

/// Records read after the watermark, and where the next one starts.
#[derive(Debug, Clone, Default)]
pub struct Unfolded {
    /// The records, in lsn order.
    pub records: Vec<Record>,
    /// Their bytes, headers included.
    pub bytes: u64,
    /// (first lsn of the segment, offset) right after the last one.
    pub end: (u64, u64),
}

/// What opening found.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Records after the fold watermark.
    pub records: u64,
    /// Their bytes, headers included.
    pub bytes: u64,
    /// Bytes cut from the tail (a torn or unacknowledged write).
    pub cut_bytes: u64,
}

/// The segment log. One writer (the durable-log thread), any number of syncers, one reader
/// (the sealer).
pub struct SegmentLog {
    dir: Arc<dyn LogDir>,
    cfg: LogConfig,
    state: Mutex<State>,
    /// Notified when a group is written (syncers wait on it) and when syncs end.
    changed: Condvar,
}

impl std::fmt::Debug for SegmentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentLog")
            .field("cfg", &self.cfg)
            .finish()
    }
}

fn seg_name(first_lsn: u64) -> String {
    format!("seg-{first_lsn:020}.tlog")
}

fn header(first_lsn: u64) -> [u8; SEGMENT_HEADER as usize] {
    let mut h = [0u8; SEGMENT_HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

fn record_crc(lsn: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&lsn.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends one record's bytes to `out`.
pub fn encode_record(out: &mut Vec<u8>, lsn: u64, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&record_crc(lsn, payload).to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Reads the record at `off` if it is whole, its CRC matches and its lsn is `lsn`.
fn read_record(f: &dyn SegFile, off: u64, lsn: u64, file_len: u64) -> io::Result<Option<Vec<u8>>> {
    if off + RECORD_HEADER > file_len {
        return Ok(None);
    }
    let mut h = [0u8; RECORD_HEADER as usize];
    if f.read_at(&mut h, off)? < h.len() {
        return Ok(None);
    }
    let n = u64::from(u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let at = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    if n == 0 || n > MAX_RECORD || at != lsn || off + RECORD_HEADER + n > file_len {
        return Ok(None);
    }
    let mut payload = vec![0u8; n as usize];
    if f.read_at(&mut payload, off + RECORD_HEADER)? < payload.len() {
        return Ok(None);
    }
    if record_crc(lsn, &payload) != crc {
        return Ok(None);
    }
    Ok(Some(payload))
}

fn parse_seg_name(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".tlog")?
        .parse()
        .ok()
}

fn parse_spare_name(name: &str) -> Option<u64> {
    name.strip_prefix("spare-")?
        .strip_suffix(".tlog")?
        .parse()
        .ok()
}

impl SegmentLog {
    /// Opens the log in `dir`: reads every segment, cuts a torn tail, recycles segments wholly
    /// at or below `folded` (the store's watermark), and calls `each` with every record after
    /// it, in lsn order (to rebuild the accepted-id set).
    pub fn open(
        dir: Arc<dyn LogDir>,
        cfg: LogConfig,
        folded: u64,
        mut each: impl FnMut(&Record),
    ) -> Result<(SegmentLog, Recovered), LogError> {
        let mut names = dir.list().map_err(io_err("list", "log directory"))?;
        names.sort();
        let mut segs: Vec<(u64, String)> = Vec::new();
        let mut spares = Vec::new();
        let mut next_spare = 0;
        for n in names {
            if let Some(first) = parse_seg_name(&n) {
                if first == 0 {
                    return Err(LogError::Corrupt(format!("{n}: lsns start at 1")));
                }
                segs.push((first, n));
            } else if let Some(i) = parse_spare_name(&n) {
                next_spare = next_spare.max(i + 1);
                spares.push(n);
            } else if n.ends_with(".tmp") {
                // A spare being preallocated when the process died.
                dir.remove(&n).map_err(io_err("remove", &n))?;
            } else {
                return Err(LogError::Corrupt(format!("{n} is not a log file")));
            }
        }
        segs.sort();
        let mut rec = Recovered::default();
        let mut segments = VecDeque::new();
        // lsns start at 1; an empty log continues after the watermark.
        let mut expect = segs.first().map_or(folded + 1, |s| s.0);
        let mut fold_pos = None;
        let count = segs.len();
        for (i, (first, name)) in segs.into_iter().enumerate() {
            let last_seg = i + 1 == count;
            let file = dir.open(&name).map_err(io_err("open", &name))?;
            let len = file.size().map_err(io_err("stat", &name))?;
            if len == 0 {
                return Err(LogError::Corrupt(format!("{name} is empty (0 bytes)")));
            }
            let mut h = [0u8; SEGMENT_HEADER as usize];
            let got = file.read_at(&mut h, 0).map_err(io_err("read", &name))?;
            if got < h.len() || h != header(first) {
                return Err(LogError::Corrupt(format!(
                    "{name} does not start with a segment header for lsn {first}"
                )));
            }
            // A gap is allowed only where everything before it is folded: the log restarts
            // after the watermark once all it held was folded (earlier segments recycled).
            if first != expect && !(first > expect && first <= folded + 1) {
                return Err(LogError::Corrupt(format!(
                    "{name} starts at lsn {first}, but the log continues at {expect}"
                )));
            }
            expect = first;
            let mut off = SEGMENT_HEADER;
            while let Some(p) =
                read_record(file.as_ref(), off, expect, len).map_err(io_err("read", &name))?
            {
                let size = RECORD_HEADER + p.len() as u64;
                if expect > folded {
                    if fold_pos.is_none() {
                        fold_pos = Some((first, off));
                    }
                    rec.records += 1;
                    rec.bytes += size;
                    each(&Record {
                        lsn: expect,
                        payload: p,
                    });
                }
                off += size;
                expect += 1;
            }
            if last_seg {
                // Everything after the last whole record goes: zeroed and synced, so it cannot
                // resurface behind a later record.
                let rest = len.saturating_sub(off);
                let mut nonzero = false;
                let mut buf = vec![0u8; 64 << 10];
                let mut at = off;
                while at < len {
                    let k = file.read_at(&mut buf, at).map_err(io_err("read", &name))?;
                    if k == 0 {
                        break;
                    }
                    if buf[..k].iter().any(|b| *b != 0) {
                        nonzero = true;
                        break;
                    }
                    at += k as u64;
                }
                if nonzero {
                    rec.cut_bytes = rest;
                    let zeros = vec![0u8; 64 << 10];
                    let mut at = off;
                    while at < len {
                        let k = (len - at).min(zeros.len() as u64) as usize;
                        file.write_at(&zeros[..k], at)
                            .map_err(io_err("write", &name))?;
                        at += k as u64;
                    }
                    file.sync_data().map_err(io_err("sync", &name))?;
                    tracing::warn!(segment = %name, bytes = rest, "durable log: torn tail cut");
                }
            }
            // What was read may be only in the page cache (a write whose sync failed before the
            // restart): make it durable before it counts as the log.
            file.sync_data().map_err(io_err("sync", &name))?;
            segments.push_back(Segment {
                first_lsn: first,
                name,
                file,
                end: off,
                last_lsn: expect - 1,
                wend: off,
            });
        }
        // Every record is folded (or there are none): new ones follow the watermark, in a new
        // segment if the last one ends below it (the chain must not skip inside a segment).
        let mut force_new = false;
        if expect <= folded {
            force_new = !segments.is_empty() && expect != folded + 1;
            expect = folded + 1;
        }
        let log = SegmentLog {
            dir,
            cfg,
            state: Mutex::new(State {
                segments,
                spares,
                next_spare,
                next_lsn: expect,
                folded,
                fold_pos: fold_pos.unwrap_or((0, 0)),
                dirty_tail: 0,
                force_new,
                unfolded: (rec.records, rec.bytes),
                inflight: VecDeque::new(),
                next_seq: 1,
                covered: 0,
                last_cohort: 0,
                uncovered_since: None,
                started: VecDeque::new(),
                next_sync: 0,
                generation: 0,
                closed: false,
            }),
            changed: Condvar::new(),
        };
        {
            let mut st = log.lock();
            log.recycle(&mut st)?;
            if st.spares.len() > cfg.spares {
                let extra: Vec<String> = st.spares.drain(cfg.spares..).collect();
                for n in extra {
                    log.dir.remove(&n).map_err(io_err("remove", &n))?;
                }
            }
        }
        Ok((log, rec))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lsn the next record gets.
    pub fn next_lsn(&self) -> u64 {
        self.lock().next_lsn
    }

    /// Records and bytes (headers included) written and not yet folded.
    pub fn unfolded(&self) -> (u64, u64) {
        self.lock().unfolded
    }

    /// Appends one record per payload with one write and one `fdatasync` (waiting for it, and
    /// for every sync begun before it: a caller holding a begun [`SyncJob`] must end it first);
    /// returns the lsn of the first. On error nothing is acknowledged and the end of the log
    /// does not move. The same path as [`write`](Self::write) + [`sync`](Self::sync).
    pub fn append(&self, payloads: &[Vec<u8>]) -> Result<u64, LogError> {
        let slot: Arc<Mutex<Option<Result<u64, LogError>>>> = Arc::new(Mutex::new(None));
        let s2 = slot.clone();
        self.write(
            payloads,
            Box::new(move |r| *s2.lock().unwrap_or_else(PoisonError::into_inner) = Some(r)),
        );
        loop {
            if let Some(r) = slot.lock().unwrap_or_else(PoisonError::into_inner).take() {
                return r;
            }
            if !self.sync() {
                // Another syncer covers it: wait for its end (the slot is filled before the
                // notification, which is sent under the lock).
                let st = self.lock();
                if slot
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .is_none()
                {
                    let _ = self
                        .changed
                        .wait_timeout(st, Duration::from_millis(10))
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// Writes one record per payload with one `pwrite` and queues the group for a sync;
    /// `done` is called once with its outcome (see [`Done`]): at once if the write fails,
    /// else when a sync covers it or fails. Before a new segment is started everything in
    /// flight is synced first.
    pub fn write(&self, payloads: &[Vec<u8>], done: Done) {
        for p in payloads {
            if p.is_empty() || p.len() as u64 > MAX_RECORD {
                done(Err(LogError::Corrupt(format!(
                    "a record of {} bytes (1 to {MAX_RECORD})",
                    p.len()
                ))));
                return;
            }
        }
        if payloads.is_empty() {
            done(Ok(self.next_lsn()));
            return;
        }
        let size: u64 = payloads
            .iter()
            .map(|p| p.len() as u64 + RECORD_HEADER)
            .sum();
        let mut st = self.lock();
        let need_new = loop {
            let need_new = match st.segments.back() {
                None => true,
                Some(_) if st.force_new => true,
                Some(s) => s.wend > SEGMENT_HEADER && s.wend + size > self.cfg.segment_bytes,
            };
            if !need_new || st.inflight.is_empty() {
                break need_new;
            }
            // A segment ends only with everything in it durable: sync (or wait for) the rest.
            drop(st);
            if !self.sync() {
                let st = self.lock();
                if !st.inflight.is_empty() {
                    let _ = self
                        .changed
                        .wait_timeout(st, Duration::from_millis(10))
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
            st = self.lock();
        };
        let first = st.next_lsn;
        let mut buf = Vec::with_capacity(size as usize);
        for (i, p) in payloads.iter().enumerate() {
            encode_record(&mut buf, first + i as u64, p);
        }
        if need_new && let Err(e) = self.activate(&mut st, first) {
            drop(st);
            done(Err(e));
            return;
        }
        let Some(seg) = st.segments.back() else {
            drop(st);
            done(Err(LogError::Corrupt("no active segment".into())));
            return;
        };
        let (file, off, name) = (seg.file.clone(), seg.wend, seg.name.clone());
        // Cover what a failed write may have left past the end with zeros.
        let written = buf.len() as u64;
        if st.dirty_tail > written {
            buf.resize(st.dirty_tail as usize, 0);
        }
        if let Err(e) = file.write_at(&buf, off) {
            st.dirty_tail = st.dirty_tail.max(buf.len() as u64);
            drop(st);
            done(Err(io_err("write", &name)(e)));
            return;
        }
        st.dirty_tail = 0;
        let n = payloads.len() as u64;
        if let Some(seg) = st.segments.back_mut() {
            seg.wend += written;
        }
        st.next_lsn = first + n;
        let seq = st.next_seq;
        st.next_seq += 1;
        if st.inflight.back().is_none_or(|g| g.seq <= st.covered) {
            st.uncovered_since = Some(std::time::Instant::now());
        }
        st.inflight.push_back(Inflight {
            seq,
            first_lsn: first,
            last_lsn: first + n - 1,
            off,
            end: off + written,
            done,
        });
        drop(st);
        self.changed.notify_all();
    }

    /// Whether a group of these payloads goes into the active segment; if not,
    /// [`write`](Self::write) first waits until everything in flight is resolved (so a caller
    /// holding a begun [`SyncJob`] must end it before such a write).
    pub fn fits(&self, payloads: &[Vec<u8>]) -> bool {
        let size: u64 = payloads
            .iter()
            .map(|p| p.len() as u64 + RECORD_HEADER)
            .sum();
        let st = self.lock();
        match st.segments.back() {
            None => false,
            Some(_) if st.force_new => false,
            Some(s) => !(s.wend > SEGMENT_HEADER && s.wend + size > self.cfg.segment_bytes),
        }
    }

    /// A sync of everything written and not yet covered by a started sync, or `None`.
    pub fn sync_begin(&self) -> Option<SyncJob> {
        let mut st = self.lock();
        let upto = st.inflight.back()?.seq;
        if upto <= st.covered {
            return None;
        }
        let seg = st.segments.back()?;
        let (name, file) = (seg.name.clone(), seg.file.clone());
        st.covered = upto;
        st.uncovered_since = None;
        let id = st.next_sync;
        st.next_sync += 1;
        let generation = st.generation;
        st.started.push_back(Started {
            id,
            upto,
            generation,
            ok: false,
        });
        Some(SyncJob {
            id,
            generation,
            name,
            file,
        })
    }

    /// Takes a sync's result: acknowledges what the syncs started up to and including it
    /// cover, once every earlier one succeeded too; on error fails everything in flight and
    /// moves the end back to the last durable record.
    pub fn sync_end(&self, job: SyncJob, r: Result<(), LogError>) {
        let mut calls: Vec<(Done, Result<u64, LogError>)> = Vec::new();
        {
            let mut st = self.lock();
            match r {
                Err(e) => {
                    tracing::error!(error = %e, "durable log sync failed; groups in flight fail");
                    st.generation += 1;
                    st.started.clear();
                    let failed: Vec<Inflight> = st.inflight.drain(..).collect();
                    let st = &mut *st;
                    if let Some(seg) = st.segments.back_mut() {
                        // Everything written past the durable end may be garbage now.
                        st.dirty_tail = seg.wend + st.dirty_tail - seg.end;
                        seg.wend = seg.end;
                        st.next_lsn = seg.last_lsn + 1;
                    }
                    for g in failed {
                        calls.push((g.done, Err(dup(&e))));
                    }
                }
                Ok(()) => {
                    if let Some(s) = st
                        .started
                        .iter_mut()
                        .find(|s| s.id == job.id && s.generation == job.generation)
                    {
                        s.ok = true;
                    }
                    let mut acked = 0;
                    while st.started.front().is_some_and(|s| s.ok) {
                        let Some(s) = st.started.pop_front() else {
                            break;
                        };
                        while st.inflight.front().is_some_and(|g| g.seq <= s.upto) {
                            let Some(g) = st.inflight.pop_front() else {
                                break;
                            };
                            let first_seg = st.segments.back().map_or(0, |s| s.first_lsn);
                            if st.unfolded.0 == 0 {
                                st.fold_pos = (first_seg, g.off);
                            }
                            st.unfolded.0 += g.last_lsn - g.first_lsn + 1;
                            st.unfolded.1 += g.end - g.off;
                            if let Some(seg) = st.segments.back_mut() {
                                seg.end = g.end;
                                seg.last_lsn = g.last_lsn;
                            }
                            acked += g.last_lsn - g.first_lsn + 1;
                            calls.push((g.done, Ok(g.first_lsn)));
                        }
                    }
                    if acked > 0 {
                        st.last_cohort = acked;
                    }
                }
            }
        }
        for (done, r) in calls {
            done(r);
        }
        // Under the lock, so a waiter that checked its outcome under it cannot miss this.
        let _st = self.lock();
        self.changed.notify_all();
    }

    /// Runs one sync if something written is not covered by a started one; whether it did.
    pub fn sync(&self) -> bool {
        let Some(job) = self.sync_begin() else {
            return false;
        };
        let r = job.run();
        self.sync_end(job, r);
        true
    }

    /// A syncer thread's loop: syncs whatever is written (several syncers overlap their
    /// syncs), once as many records as the last sync acknowledged are waiting or the oldest has
    /// waited [`SYNC_LINGER`] (when no other sync runs and that cohort was at most
    /// [`LINGER_COHORT_MAX`]; else at once); returns once [`close`](Self::close) was called and
    /// nothing is in flight.
    pub fn run_syncer(&self) {
        loop {
            let st = self.lock();
            if st.closed && st.inflight.is_empty() {
                return;
            }
            let uncovered: u64 = st
                .inflight
                .iter()
                .rev()
                .take_while(|g| g.seq > st.covered)
                .map(|g| g.last_lsn - g.first_lsn + 1)
                .sum();
            if uncovered == 0 {
                let _ = self
                    .changed
                    .wait_timeout(st, Duration::from_millis(100))
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let left = match st.uncovered_since {
                Some(t)
                    if !st.closed
                        && st.started.is_empty()
                        && st.last_cohort <= LINGER_COHORT_MAX
                        && uncovered < st.last_cohort =>
                {
                    SYNC_LINGER.saturating_sub(t.elapsed())
                }
                _ => Duration::ZERO,
            };
            if left.is_zero() {
                drop(st);
                self.sync();
                continue;
            }
            let _ = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// No more writes: syncers end once what is in flight is resolved.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Starts a new segment at `first_lsn`: a spare if there is one, else a new zero-filled
    /// file; its header is written and synced before it is renamed into place.
    fn activate(&self, st: &mut State, first_lsn: u64) -> Result<(), LogError> {
        // A failed write's leftovers in the old segment would read as the new segment's first
        // records after a crash: zero them first.
        if st.dirty_tail > 0
            && let Some(old) = st.segments.back()
        {
            let zeros = vec![0u8; st.dirty_tail as usize];
            old.file
                .write_at(&zeros, old.end)
                .and_then(|()| old.file.sync_data())
                .map_err(io_err("write", &old.name))?;
        }
        st.dirty_tail = 0;
        let spare = match st.spares.pop() {
            Some(s) => s,
            None => self.preallocate(st)?,
        };
        let file = self.dir.open(&spare).map_err(io_err("open", &spare))?;
        let put = file
            .write_at(&header(first_lsn), 0)
            .and_then(|()| file.write_at(&[0u8; RECORD_HEADER as usize], SEGMENT_HEADER))
            .and_then(|()| file.sync_data());
        if let Err(e) = put {
            st.spares.push(spare.clone());
            return Err(io_err("write", &spare)(e));
        }
        let name = seg_name(first_lsn);
        self.dir
            .rename(&spare, &name)
            .and_then(|()| self.dir.sync())
            .map_err(|e| {
                st.spares.push(spare.clone());
                io_err("rename", &name)(e)
            })?;
        st.segments.push_back(Segment {
            first_lsn,
            name,
            file,
            end: SEGMENT_HEADER,
            last_lsn: first_lsn - 1,
            wend: SEGMENT_HEADER,
        });
        st.force_new = false;
        Ok(())
    }

    /// A new spare, zero-filled to `segment_bytes` and synced (so appends overwrite allocated
    /// blocks: no block allocation, no metadata in the `fdatasync`).
    fn preallocate(&self, st: &mut State) -> Result<String, LogError> {
        let name = format!("spare-{:020}.tlog", st.next_spare);
        let tmp = format!("{name}.tmp");
        let _ = self.dir.remove(&tmp);
        let file = self.dir.create(&tmp).map_err(io_err("create", &tmp))?;
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        let fill = (|| {
            while at < self.cfg.segment_bytes {
                let k = (self.cfg.segment_bytes - at).min(zeros.len() as u64) as usize;
                file.write_at(&zeros[..k], at)?;
                at += k as u64;
            }
            file.sync_data()?;
            self.dir.rename(&tmp, &name)?;
            self.dir.sync()
        })();
        if let Err(e) = fill {
            let _ = self.dir.remove(&tmp);
            return Err(io_err("preallocate", &name)(e));
        }
        st.next_spare += 1;
        Ok(name)
    }

    /// Up to `max_records` records after the fold watermark (and about `max_bytes` of payload,
    /// at least one record), oldest first. Reading does not fold: [`SegmentLog::folded`] does,
    /// once the store committed the batches.
    pub fn read_unfolded(&self, max_records: usize, max_bytes: u64) -> Result<Unfolded, LogError> {
        let (segs, mut lsn, start) = {
            let st = self.lock();
            let mut out = Unfolded {
                end: st.fold_pos,
                ..Unfolded::default()
            };
            if st.unfolded.0 == 0 {
                out.end = (0, 0);
                return Ok(out);
            }
            let segs: Vec<SegView> = st
                .segments
                .iter()
                .filter(|s| s.last_lsn > st.folded)
                .map(|s| {
                    (
                        s.first_lsn,
                        s.name.clone(),
                        s.file.clone(),
                        s.end,
                        s.last_lsn,
                    )
                })
                .collect();
            (segs, st.folded + 1, st.fold_pos)
        };
        let mut out = Unfolded {
            end: start,
            ..Unfolded::default()
        };
        for (first, name, file, end, last) in segs {
            let mut off = if first == start.0 {
                start.1
            } else {
                SEGMENT_HEADER
            };
            while lsn <= last && off < end {
                if out.records.len() >= max_records
                    || (out.bytes >= max_bytes && !out.records.is_empty())
                {
                    return Ok(out);
                }
                let p = read_record(file.as_ref(), off, lsn, end)
                    .map_err(io_err("read", &name))?
                    .ok_or_else(|| {
                        LogError::Corrupt(format!(
                            "{name}: record {lsn} at offset {off} does not read back"
                        ))
                    })?;
                off += RECORD_HEADER + p.len() as u64;
                out.bytes += RECORD_HEADER + p.len() as u64;
                out.end = (first, off);
                out.records.push(Record { lsn, payload: p });
                lsn += 1;
            }
        }
        Ok(out)
    }

    /// Records with lsn ≤ `upto` were folded into batches that the store committed (with the
    /// watermark `upto`); `read` is the [`Unfolded`] they were read in. Forgets them and
    /// recycles segments wholly at or below the watermark.
    pub fn folded(&self, read: &Unfolded) -> Result<(), LogError> {
        let Some(upto) = read.records.last().map(|r| r.lsn) else {
            return Ok(());
        };
        let mut st = self.lock();
        if upto <= st.folded {
            return Ok(());
        }
        st.folded = upto;
        st.fold_pos = read.end;
        st.unfolded.0 = st.unfolded.0.saturating_sub(read.records.len() as u64);
        st.unfolded.1 = st.unfolded.1.saturating_sub(read.bytes);
        self.recycle(&mut st)
    }

    /// Turns segments wholly at or below the watermark into spares (keeping the active one).
    fn recycle(&self, st: &mut State) -> Result<(), LogError> {
        while st.segments.len() > 1 && st.segments.front().is_some_and(|s| s.last_lsn <= st.folded)
        {
            let Some(s) = st.segments.pop_front() else {
                break;
            };
            if st.spares.len() < self.cfg.spares {
                let spare = format!("spare-{:020}.tlog", st.next_spare);
                self.dir
                    .rename(&s.name, &spare)
                    .map_err(io_err("rename", &s.name))?;
                st.next_spare += 1;
                st.spares.push(spare);
            } else {
                self.dir
                    .remove(&s.name)
                    .map_err(io_err("remove", &s.name))?;
            }
        }
        // Renames and removals need not be durable: a segment found again at open is at or
        // below the watermark and recycled then.
        Ok(())
    }
}
