//! The segment log (`tally_agent::seglog`) against a model, over a fake directory whose files
//! lose what was not synced when the "machine" crashes, with torn writes (a random subset of
//! the 16-byte chunks of the write in flight persists, later chunks possibly without earlier
//! ones), a failed sync that drops what it did not write (as Linux marks such pages clean, so a
//! later sync succeeds without them), and I/O that fails from a chosen operation on (a crash at
//! every step) or for a few operations and then recovers (a full disk that frees up).
//!
//! The pipelined commit is driven step by step: groups written without a sync (several in
//! flight), syncs begun and ended in any order (overlapping, completing out of order), failing
//! syncs, and crashes with groups in flight.
//!
//! Checked after every step and every reopen: every acknowledged record is read back exactly
//! once, in lsn order, with its payload, until the store's watermark passes it, and never after;
//! groups are acknowledged in write order with consecutive lsns; a record that was never
//! acknowledged may surface after a crash only as one of the writes that failed or were in
//! flight at that position; nothing else ever appears.
//!
//! The fake makes creations, renames and deletions durable at once (file data is what it
//! models); `tests/kill.rs` covers a real file system under `kill -9`.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use tally_agent::seglog::{LogConfig, LogDir, LogError, Record, SegFile, SegmentLog, SyncJob};

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
        if let Err(e) = tick(&mut self.disk.0.lock().unwrap()) {
            // Linux marks pages whose writeback failed clean: what was not synced is gone, and
            // the error is reported to one sync only (a later one succeeds without it).
            self.data.lock().unwrap().pending.clear();
            return Err(e);
        }
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
    /// Write a group without syncing it (it stays in flight).
    Write(Vec<u8>),
    /// Begin a sync (covering everything written so far) and run its `fdatasync` now; its
    /// result is handed to the log later (so later writes are not durable through it).
    SyncBegin,
    /// End the begun sync at this index (modulo the number begun): out of order.
    SyncEnd(u8),
    /// Power loss now, with whatever is in flight.
    Crash(u64),
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
        4 => prop::collection::vec(prop::sample::select(vec![8u8, 8, 16, 40]), 1..4).prop_map(Op::Write),
        3 => Just(Op::SyncBegin),
        3 => any::<u8>().prop_map(Op::SyncEnd),
        1 => any::<u64>().prop_map(Op::Crash),
    ]
}

/// Outcomes reported by the log's callbacks, in the order they came: (group tag, outcome).
type Outcomes = Arc<Mutex<Vec<(u64, Result<u64, String>)>>>;

struct Model {
    /// Records after the watermark that must be there, in lsn order: (lsn, payload).
    unfolded: Vec<(u64, Vec<u8>)>,
    /// The store's watermark.
    watermark: u64,
    /// Writes that failed or were in flight: (first lsn of the run they were written in, the
    /// run's payloads by position, the last group tag when they failed). What may surface after
    /// a crash; an acknowledged group written later overwrote them durably.
    maybe: Vec<(u64, Vec<Vec<u8>>, u64)>,
    next_lsn: u64,
    payload_seq: u64,
    /// Groups written and not yet resolved, in position order: (tag, payloads, failed).
    chain: Vec<(u64, Vec<Vec<u8>>, bool)>,
    next_tag: u64,
    /// Outcomes reported by the log's callbacks, in the order they came.
    events: Outcomes,
}

impl Model {
    /// Takes the outcomes reported so far.
    fn resolve(&mut self) {
        let events = std::mem::take(&mut *self.events.lock().unwrap());
        for (tag, r) in events {
            let i = self
                .chain
                .iter()
                .position(|g| g.0 == tag)
                .expect("an outcome for a group not in flight");
            match r {
                Ok(first) => {
                    assert!(
                        self.chain[..i].iter().all(|g| g.2),
                        "a group acknowledged before an earlier one"
                    );
                    assert_eq!(first, self.next_lsn, "lsns of acknowledged groups follow");
                    let (_, ps, _) = self.chain.remove(i);
                    for p in ps {
                        self.unfolded.push((self.next_lsn, p));
                        self.next_lsn += 1;
                    }
                    self.maybe.retain(|m| m.2 >= tag);
                }
                Err(_) => {
                    let run: Vec<Vec<u8>> = self.chain[..=i]
                        .iter()
                        .flat_map(|g| g.1.iter().cloned())
                        .collect();
                    self.maybe.push((self.next_lsn, run, self.next_tag));
                    self.chain[i].2 = true;
                }
            }
        }
        // A rollback failed every group in flight: the next write starts at the durable end.
        // A failed write leaves the others in flight; the next write takes its place.
        if self.chain.iter().all(|g| g.2) {
            self.chain.clear();
        } else {
            self.chain.retain(|g| !g.2);
        }
    }

    /// A crash or a restart: what was in flight may surface.
    fn lose_inflight(&mut self) {
        let run: Vec<Vec<u8>> = self
            .chain
            .iter()
            .flat_map(|g| g.1.iter().cloned())
            .collect();
        if !run.is_empty() {
            self.maybe.push((self.next_lsn, run, self.next_tag));
        }
        self.chain.clear();
    }

    /// Writes a group through `log.write` (tagged), in flight until resolved.
    fn write(&mut self, log: &SegmentLog, payloads: Vec<Vec<u8>>) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.chain.push((tag, payloads.clone(), false));
        let ev = self.events.clone();
        log.write(
            &payloads,
            Box::new(move |r: Result<u64, LogError>| {
                ev.lock().unwrap().push((tag, r.map_err(|e| e.to_string())));
            }),
        );
        self.resolve();
    }

    /// A group through `log.append` (write + sync, waiting).
    fn append(&mut self, log: &SegmentLog, payloads: Vec<Vec<u8>>) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.chain.push((tag, payloads.clone(), false));
        let r = log.append(&payloads);
        self.events
            .lock()
            .unwrap()
            .push((tag, r.map_err(|e| e.to_string())));
        self.resolve();
    }
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
    // Records beyond: only writes that failed or were in flight at exactly that position.
    let acked_next = m.next_lsn;
    let acked = m.unfolded.len();
    for (i, r) in found[acked..].iter().enumerate() {
        assert_eq!(r.lsn, acked_next + i as u64);
        let ok = m.maybe.iter().any(|(start, run, _)| {
            r.lsn >= *start
                && run
                    .get((r.lsn - start) as usize)
                    .is_some_and(|p| *p == r.payload)
        });
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

/// Ends the begun syncs, last begun first (out of order: the log takes completions in
/// start order).
fn end_all(log: &SegmentLog, jobs: &mut Vec<(SyncJob, Result<(), LogError>)>) {
    while let Some((j, r)) = jobs.pop() {
        log.sync_end(j, r);
    }
}

fn run(ops: Vec<Op>) {
    let dir = FakeDir::default();
    let mut m = Model {
        unfolded: Vec::new(),
        watermark: 0,
        maybe: Vec::new(),
        next_lsn: 1,
        payload_seq: 0,
        chain: Vec::new(),
        next_tag: 0,
        events: Arc::new(Mutex::new(Vec::new())),
    };
    let mut log = open(&dir, &mut m);
    let mut jobs: Vec<(SyncJob, Result<(), LogError>)> = Vec::new();
    let mut all_folded: Vec<u64> = Vec::new();
    for op in ops {
        match op {
            Op::Append(sizes) => {
                end_all(&log, &mut jobs);
                let payloads = payloads(&mut m, &sizes);
                m.append(&log, payloads);
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
                    jobs.clear();
                    drop(log);
                    m.resolve();
                    m.lose_inflight();
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
                end_all(&log, &mut jobs);
                let payloads = payloads(&mut m, &sizes);
                m.append(&log, payloads);
                jobs.clear();
                drop(log);
                m.resolve();
                m.lose_inflight();
                dir.crash(seed);
                log = open(&dir, &mut m);
            }
            Op::Crash(seed) => {
                jobs.clear();
                drop(log);
                m.resolve();
                m.lose_inflight();
                dir.crash(seed);
                log = open(&dir, &mut m);
            }
            Op::Write(sizes) => {
                let payloads = payloads(&mut m, &sizes);
                // A write that starts a segment waits for what is in flight: end the syncs
                // this single thread holds first (a syncer thread always ends its own).
                if !log.fits(&payloads) {
                    end_all(&log, &mut jobs);
                }
                m.write(&log, payloads);
            }
            Op::SyncBegin => {
                if jobs.len() < 3
                    && let Some(j) = log.sync_begin()
                {
                    let r = j.run();
                    jobs.push((j, r));
                }
            }
            Op::SyncEnd(i) => {
                if !jobs.is_empty() {
                    let (j, r) = jobs.remove(usize::from(i) % jobs.len());
                    log.sync_end(j, r);
                    m.resolve();
                }
            }
            Op::FailNext(skip, k) => {
                let mut d = dir.0.lock().unwrap();
                d.fail_skip = u64::from(skip);
                d.fail_next = u64::from(k);
            }
            Op::Reopen => {
                jobs.clear();
                drop(log);
                m.resolve();
                m.lose_inflight();
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
    // Drain: what is in flight resolves, everything left folds exactly once, in order.
    {
        let mut d = dir.0.lock().unwrap();
        d.fail_next = 0;
        d.fail_skip = 0;
    }
    end_all(&log, &mut jobs);
    while log.sync() {}
    m.resolve();
    assert!(m.chain.is_empty(), "a group never resolved");
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

/// Two groups in flight, two overlapping syncs: the earlier sync fails (dropping the first
/// group's unsynced write), the later one succeeds and ends first. Neither group may be
/// acknowledged: the later sync's success proves nothing while an earlier one may still fail.
#[test]
fn a_later_sync_waits_for_an_earlier_failing_one() {
    run(vec![
        Op::Write(vec![8]),
        Op::FailNext(0, 1),
        Op::SyncBegin,
        Op::Write(vec![16]),
        Op::SyncBegin,
        Op::SyncEnd(1),
        Op::SyncEnd(0),
        Op::Append(vec![8]),
        Op::Reopen,
    ]);
}

/// A crash with two groups in flight (one written before a sync began, one after): only what
/// a completed sync acknowledged survives as acknowledged; the rest may surface only at its
/// own position.
#[test]
fn a_crash_with_two_groups_in_flight() {
    for seed in 0..64 {
        run(vec![
            Op::Append(vec![8]),
            Op::Write(vec![8, 16]),
            Op::SyncBegin,
            Op::Write(vec![40]),
            Op::Crash(seed),
            Op::Append(vec![8]),
        ]);
        run(vec![
            Op::Write(vec![8]),
            Op::SyncBegin,
            Op::Write(vec![16]),
            Op::SyncEnd(0),
            Op::Crash(seed),
        ]);
    }
}

/// The syncer waits for a cohort as large as the one it last answered only up to its cap: a
/// lone write after a group of 16 is still acknowledged, and each record only once durable.
#[test]
fn a_lone_write_after_a_cohort_is_acknowledged() {
    let dir = FakeDir::default();
    let cfg = LogConfig {
        segment_bytes: 1 << 20,
        spares: 1,
    };
    let (log, _) = SegmentLog::open(Arc::new(dir.clone()), cfg, 0, |_| {}).unwrap();
    let log = Arc::new(log);
    let syncer = {
        let log = log.clone();
        std::thread::spawn(move || log.run_syncer())
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let cohort: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 8]).collect();
    let t = tx.clone();
    log.write(
        &cohort,
        Box::new(move |r| t.send(r.map_err(|e| e.to_string())).unwrap()),
    );
    let timeout = std::time::Duration::from_secs(10);
    assert_eq!(rx.recv_timeout(timeout).unwrap(), Ok(1));
    for lsn in 17..20u64 {
        let t = tx.clone();
        log.write(
            &[vec![9; 8]],
            Box::new(move |r| t.send(r.map_err(|e| e.to_string())).unwrap()),
        );
        assert_eq!(rx.recv_timeout(timeout).unwrap(), Ok(lsn));
    }
    log.close();
    syncer.join().unwrap();
    // Everything acknowledged survives a power loss.
    dir.crash(1);
    let mut m = Model {
        unfolded: (1..=16u64)
            .map(|i| (i, vec![(i - 1) as u8; 8]))
            .chain((17..20).map(|i| (i, vec![9; 8])))
            .collect(),
        watermark: 0,
        maybe: Vec::new(),
        next_lsn: 20,
        payload_seq: 0,
        chain: Vec::new(),
        next_tag: 0,
        events: Arc::new(Mutex::new(Vec::new())),
    };
    let _ = open(&dir, &mut m);
}
