//! The segment log (`tally_agent::seglog`) against a model, over a fake directory whose files
//! lose what was not synced when the "machine" crashes, with torn writes (a random subset of
//! the 16-byte chunks of the write in flight persists, later chunks possibly without earlier
//! ones), and I/O that fails from a chosen operation on (a crash at every step) or for a few
//! operations and then recovers (a full disk that frees up).
//!
//! Checked after every step and every reopen: every acknowledged record is read back exactly
//! once, in lsn order, with its payload, until the store's watermark passes it, and never after;
//! a record that was never acknowledged may surface after a crash only as one of the writes that
//! failed at that position; nothing else ever appears.
//!
//! The fake makes creations, renames and deletions durable at once (file data is what it
//! models); `tests/kill.rs` covers a real file system under `kill -9`.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use tally_agent::seglog::{LogConfig, LogDir, Record, SegFile, SegmentLog};

/// The unit a torn write persists in (a sector, scaled down to the test's small records).
const CHUNK: usize = 16;

#[derive(Default)]
struct FileData {
    durable: Vec<u8>,
    /// Writes since the last sync, in order.
    pending: Vec<(u64, Vec<u8>)>,
}

impl FileData {
    fn visible(&self) -> Vec<u8> {
        let mut v = self.durable.clone();
        for (off, b) in &self.pending {
            apply(&mut v, *off, b);
        }
        v
    }
}

fn apply(v: &mut Vec<u8>, off: u64, b: &[u8]) {
    let end = off as usize + b.len();
    if v.len() < end {
        v.resize(end, 0);
    }
    v[off as usize..end].copy_from_slice(b);
}

#[derive(Default)]
struct Disk {
    files: BTreeMap<String, Arc<Mutex<FileData>>>,
    ops: u64,
    /// From this operation on, everything fails (the machine is going down).
    crash_at: Option<u64>,
    /// After `fail_skip` more operations, this-many operations fail, then I/O works again (a
    /// full disk that frees up).
    fail_next: u64,
    fail_skip: u64,
}

#[derive(Clone, Default)]
struct FakeDir(Arc<Mutex<Disk>>);

fn tick(d: &mut Disk) -> io::Result<()> {
    d.ops += 1;
    if d.crash_at.is_some_and(|c| d.ops >= c) {
        return Err(io::Error::other("crashed"));
    }
    if d.fail_skip > 0 {
        d.fail_skip -= 1;
    } else if d.fail_next > 0 {
        d.fail_next -= 1;
        return Err(io::Error::from_raw_os_error(28)); // ENOSPC
    }
    Ok(())
}

struct FakeFile {
    disk: FakeDir,
    data: Arc<Mutex<FileData>>,
}

impl SegFile for FakeFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        tick(&mut self.disk.0.lock().unwrap())?;
        let v = self.data.lock().unwrap().visible();
        let off = off as usize;
        if off >= v.len() {
            return Ok(0);
        }
        let n = buf.len().min(v.len() - off);
        buf[..n].copy_from_slice(&v[off..off + n]);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        tick(&mut self.disk.0.lock().unwrap())?;
        self.data.lock().unwrap().pending.push((off, buf.to_vec()));
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        tick(&mut self.disk.0.lock().unwrap())?;
        let mut d = self.data.lock().unwrap();
        d.durable = d.visible();
        d.pending.clear();
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        tick(&mut self.disk.0.lock().unwrap())?;
        Ok(self.data.lock().unwrap().visible().len() as u64)
    }
}

impl LogDir for FakeDir {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut d = self.0.lock().unwrap();
        tick(&mut d)?;
        Ok(d.files.keys().cloned().collect())
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn SegFile>> {
        let mut d = self.0.lock().unwrap();
        tick(&mut d)?;
        let data = d.files.get(name).cloned().ok_or(io::ErrorKind::NotFound)?;
        Ok(Arc::new(FakeFile {
            disk: self.clone(),
            data,
        }))
    }
    fn create(&self, name: &str) -> io::Result<Arc<dyn SegFile>> {
        let mut d = self.0.lock().unwrap();
        tick(&mut d)?;
        if d.files.contains_key(name) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let data = Arc::new(Mutex::new(FileData::default()));
        d.files.insert(name.to_owned(), data.clone());
        Ok(Arc::new(FakeFile {
            disk: self.clone(),
            data,
        }))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        tick(&mut d)?;
        let f = d.files.remove(from).ok_or(io::ErrorKind::NotFound)?;
        d.files.insert(to.to_owned(), f);
        Ok(())
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        tick(&mut d)?;
        d.files.remove(name).ok_or(io::ErrorKind::NotFound)?;
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        tick(&mut self.0.lock().unwrap())
    }
}

impl FakeDir {
    /// Power loss: per file, unsynced writes persist in order up to a random one, which
    /// persists as a random subset of its 16-byte chunks; the rest are lost.
    fn crash(&self, seed: u64) {
        let mut rng = seed | 1;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut d = self.0.lock().unwrap();
        for f in d.files.values() {
            let mut f = f.lock().unwrap();
            let pending = std::mem::take(&mut f.pending);
            let keep = (next() % (pending.len() as u64 + 1)) as usize;
            for (i, (off, b)) in pending.into_iter().enumerate() {
                if i < keep {
                    apply(&mut f.durable, off, &b);
                } else if i == keep {
                    for (c, chunk) in b.chunks(CHUNK).enumerate() {
                        if next() % 2 == 0 {
                            apply(&mut f.durable, off + (c * CHUNK) as u64, chunk);
                        }
                    }
                } else {
                    break;
                }
            }
        }
        d.crash_at = None;
        d.fail_next = 0;
        d.fail_skip = 0;
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Append a group of requests with these payload sizes.
    Append(Vec<u8>),
    /// Read up to n records, commit the watermark (unless `crash_before_commit`), release.
    Fold {
        n: u8,
        crash_before_commit: bool,
        crash_before_release: bool,
    },
    /// Append a group with these sizes while everything fails from the k-th I/O operation on;
    /// then the machine crashes (with this seed) and restarts.
    CrashAt(Vec<u8>, u8, u64),
    /// After `skip` operations, the next k fail (disk full), then I/O works again.
    FailNext(u8, u8),
    /// A clean restart.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop::collection::vec(prop::sample::select(vec![8u8, 8, 16, 40]), 1..5).prop_map(Op::Append),
        3 => (1u8..6, any::<bool>(), any::<bool>()).prop_map(|(n, a, b)| Op::Fold {
            n,
            crash_before_commit: a && n % 3 == 0,
            crash_before_release: b && n % 2 == 0,
        }),
        3 => (prop::collection::vec(prop::sample::select(vec![8u8, 8, 16]), 1..4), 1u8..12, any::<u64>())
            .prop_map(|(p, k, s)| Op::CrashAt(p, k, s)),
        2 => (0u8..3, 1u8..4).prop_map(|(skip, k)| Op::FailNext(skip, k)),
        1 => Just(Op::Reopen),
    ]
}

struct Model {
    /// Records after the watermark that must be there, in lsn order: (lsn, payload).
    unfolded: Vec<(u64, Vec<u8>)>,
    /// The store's watermark.
    watermark: u64,
    /// Payloads that failed to append since the last success, by position after the last
    /// acknowledged lsn: what may surface after a crash.
    maybe: Vec<Vec<Vec<u8>>>,
    next_lsn: u64,
    payload_seq: u64,
}

fn cfg() -> LogConfig {
    LogConfig {
        segment_bytes: 256,
        spares: 1,
    }
}

/// Opens the log and checks what it found against the model (taking in surfaced records).
fn open(dir: &FakeDir, m: &mut Model) -> SegmentLog {
    let mut found: Vec<Record> = Vec::new();
    let (log, rec) = SegmentLog::open(Arc::new(dir.clone()), cfg(), m.watermark, |r| {
        found.push(r.clone())
    })
    .unwrap();
    assert_eq!(rec.records, found.len() as u64);
    assert!(
        found.len() >= m.unfolded.len(),
        "acknowledged records lost: found {} of {}",
        found.len(),
        m.unfolded.len()
    );
    for (r, (lsn, p)) in found.iter().zip(&m.unfolded) {
        assert_eq!(
            (r.lsn, &r.payload),
            (*lsn, p),
            "an acknowledged record changed"
        );
    }
    // Records beyond: only writes that failed at exactly that position.
    let acked_next = m.next_lsn;
    let acked = m.unfolded.len();
    for (i, r) in found[acked..].iter().enumerate() {
        assert_eq!(r.lsn, acked_next + i as u64);
        let ok = m
            .maybe
            .iter()
            .any(|group| group.get(i).is_some_and(|p| *p == r.payload));
        assert!(ok, "record {} surfaced but was never written there", r.lsn);
        m.unfolded.push((r.lsn, r.payload.clone()));
    }
    m.maybe.clear();
    let expect_next = m.unfolded.last().map_or(acked_next, |(l, _)| l + 1);
    assert_eq!(log.next_lsn(), expect_next);
    m.next_lsn = expect_next;
    log
}

/// Distinct payloads of these sizes (at least 8 bytes).
fn payloads(m: &mut Model, sizes: &[u8]) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .map(|s| {
            m.payload_seq += 1;
            let mut p = m.payload_seq.to_le_bytes().to_vec();
            p.resize(usize::from(*s).max(8), *s);
            p
        })
        .collect()
}

fn run(ops: Vec<Op>) {
    let dir = FakeDir::default();
    let mut m = Model {
        unfolded: Vec::new(),
        watermark: 0,
        maybe: Vec::new(),
        next_lsn: 1,
        payload_seq: 0,
    };
    let mut log = open(&dir, &mut m);
    let mut all_folded: Vec<u64> = Vec::new();
    for op in ops {
        match op {
            Op::Append(sizes) => {
                let payloads = payloads(&mut m, &sizes);
                match log.append(&payloads) {
                    Ok(first) => {
                        assert_eq!(first, m.next_lsn);
                        for (i, p) in payloads.into_iter().enumerate() {
                            m.unfolded.push((first + i as u64, p));
                        }
                        m.next_lsn += sizes.len() as u64;
                        m.maybe.clear();
                    }
                    Err(_) => m.maybe.push(payloads),
                }
            }
            Op::Fold {
                n,
                crash_before_commit,
                crash_before_release,
            } => {
                let Ok(read) = log.read_unfolded(usize::from(n), u64::MAX) else {
                    continue;
                };
                let want: Vec<_> = m.unfolded.iter().take(usize::from(n)).collect();
                let got: Vec<_> = read.records.iter().map(|r| (r.lsn, &r.payload)).collect();
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!((g.0, g.1), (w.0, &w.1));
                }
                if crash_before_commit || read.records.is_empty() {
                    continue;
                }
                // The store's commit: atomic.
                let upto = read.records.last().unwrap().lsn;
                assert!(upto > m.watermark);
                m.watermark = upto;
                for r in &read.records {
                    all_folded.push(r.lsn);
                }
                m.unfolded.drain(..read.records.len());
                if crash_before_release {
                    drop(log);
                    dir.crash(upto);
                    log = open(&dir, &mut m);
                    continue;
                }
                let _ = log.folded(&read);
            }
            Op::CrashAt(sizes, k, seed) => {
                {
                    let mut d = dir.0.lock().unwrap();
                    d.crash_at = Some(d.ops + u64::from(k));
                }
                let payloads = payloads(&mut m, &sizes);
                match log.append(&payloads) {
                    Ok(first) => {
                        for (i, p) in payloads.into_iter().enumerate() {
                            m.unfolded.push((first + i as u64, p));
                        }
                        m.next_lsn += sizes.len() as u64;
                        m.maybe.clear();
                    }
                    Err(_) => m.maybe.push(payloads),
                }
                drop(log);
                dir.crash(seed);
                log = open(&dir, &mut m);
            }
            Op::FailNext(skip, k) => {
                let mut d = dir.0.lock().unwrap();
                d.fail_skip = u64::from(skip);
                d.fail_next = u64::from(k);
            }
            Op::Reopen => {
                drop(log);
                {
                    let mut d = dir.0.lock().unwrap();
                    d.fail_next = 0;
                    d.fail_skip = 0;
                }
                log = open(&dir, &mut m);
            }
        }
        assert_eq!(log.unfolded().0, m.unfolded.len() as u64);
    }
    // Drain: everything left folds exactly once, in order.
    {
        let mut d = dir.0.lock().unwrap();
        d.fail_next = 0;
        d.fail_skip = 0;
    }
    loop {
        let read = log.read_unfolded(1000, u64::MAX).unwrap();
        if read.records.is_empty() {
            break;
        }
        for r in &read.records {
            all_folded.push(r.lsn);
        }
        m.watermark = read.records.last().unwrap().lsn;
        m.unfolded.drain(..read.records.len());
        log.folded(&read).unwrap();
    }
    let mut sorted = all_folded.clone();
    sorted.dedup();
    assert_eq!(sorted, all_folded, "a record folded twice or out of order");
    assert!(all_folded.windows(2).all(|w| w[1] == w[0] + 1));
    // Recycling keeps the directory bounded: the active segment and the spares (a segment
    // whose recycling failed goes at the next open).
    drop(log);
    let log = open(&dir, &mut m);
    // Only writes that failed since the last success may have surfaced (checked by `open`).
    assert_eq!(log.unfolded().0, m.unfolded.len() as u64);
    assert!(dir.0.lock().unwrap().files.len() <= 1 + cfg().spares + 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1000), ..ProptestConfig::default() })]
    #[test]
    fn the_log_keeps_every_acknowledged_record_exactly_once(ops in prop::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
