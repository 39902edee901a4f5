//! Any bytes as the files of the agent's durable log (`tally_agent::seglog`): opening never
//! panics; it either refuses with an error or recovers a log that reads back what it found,
//! takes a new record, and finds that record again after a reopen.
//!
//! Input: byte 0 = number of segment files (1–3), bytes 1..9 = the fold watermark; then per
//! file a first lsn (1 byte), a length (2 bytes) and that many bytes, written after a valid
//! segment header (so the fuzzer spends its time in the records, where the torn-tail logic is).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use tally_agent::seglog::{LogConfig, LogDir, SegFile, SegmentLog};

type Files = Arc<Mutex<BTreeMap<String, Arc<Mutex<Vec<u8>>>>>>;

#[derive(Clone, Default)]
struct MemDir(Files);

struct MemFile(Arc<Mutex<Vec<u8>>>);

impl SegFile for MemFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let v = self.0.lock().unwrap();
        let off = off as usize;
        if off >= v.len() {
            return Ok(0);
        }
        let n = buf.len().min(v.len() - off);
        buf[..n].copy_from_slice(&v[off..off + n]);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut v = self.0.lock().unwrap();
        let end = off as usize + buf.len();
        if v.len() < end {
            v.resize(end, 0);
        }
        v[off as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
}

impl LogDir for MemDir {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.0.lock().unwrap().keys().cloned().collect())
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn SegFile>> {
        let f = self.0.lock().unwrap().get(name).cloned();
        Ok(Arc::new(MemFile(f.ok_or(io::ErrorKind::NotFound)?)))
    }
    fn create(&self, name: &str) -> io::Result<Arc<dyn SegFile>> {
        let f = Arc::new(Mutex::new(Vec::new()));
        self.0.lock().unwrap().insert(name.to_owned(), f.clone());
        Ok(Arc::new(MemFile(f)))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        let f = m.remove(from).ok_or(io::ErrorKind::NotFound)?;
        m.insert(to.to_owned(), f);
        Ok(())
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.0.lock().unwrap().remove(name);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

fn header(first_lsn: u64) -> Vec<u8> {
    let mut h = vec![0u8; 32];
    h[..8].copy_from_slice(b"TLYSEG01");
    h[8..16].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let files = usize::from(data[0] % 3) + 1;
    let folded = u64::from_le_bytes(data[1..9].try_into().unwrap()) % 64;
    let dir = MemDir::default();
    let mut rest = &data[9..];
    for _ in 0..files {
        if rest.len() < 3 {
            break;
        }
        let first = u64::from(rest[0] % 64) + 1;
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let mut bytes = header(first);
        bytes.extend_from_slice(&rest[3..3 + len]);
        rest = &rest[3 + len..];
        dir.0
            .lock()
            .unwrap()
            .insert(format!("seg-{first:020}.tlog"), Arc::new(Mutex::new(bytes)));
    }
    let cfg = LogConfig {
        segment_bytes: 256,
        spares: 1,
    };
    let mut found = Vec::new();
    let Ok((log, rec)) = SegmentLog::open(Arc::new(dir.clone()), cfg, folded, |r| {
        found.push(r.clone())
    }) else {
        return;
    };
    assert_eq!(rec.records, found.len() as u64);
    let read = log.read_unfolded(usize::MAX, u64::MAX).unwrap();
    assert_eq!(read.records, found);
    let lsn = log.append(&[b"fuzz".to_vec()]).unwrap();
    drop(log);
    let mut again = Vec::new();
    let (log, _) = SegmentLog::open(Arc::new(dir), cfg, folded, |r| again.push(r.clone())).unwrap();
    assert_eq!(
        again.last().map(|r| (r.lsn, r.payload.as_slice())),
        Some((lsn, &b"fuzz"[..]))
    );
    assert_eq!(&again[..again.len() - 1], &found[..]);
    assert_eq!(log.next_lsn(), lsn + 1);
});
