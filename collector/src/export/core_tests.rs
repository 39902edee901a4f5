//! The core driven against a model disk: a crash after any action, then recovery, ends with the
//! same files, the same bytes and the same manifest as a run without crashes.

use super::*;
use std::collections::BTreeMap;

const DAY: i64 = 86_400_000;

/// A model of the export directory: the manifest, the renamed files, and temporary files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Disk {
    manifest: Option<Manifest>,
    files: BTreeMap<String, Vec<u8>>,
    temps: usize,
}

/// The "ledger": position → posted_at. A file's content is a pure function of its range.
fn ledger(n: u64) -> Vec<(u64, i64)> {
    // Three days, with more than `max_rows` on the first.
    (1..=n)
        .map(|p| (p, 20_000 * DAY + (p as i64 / 7) * DAY / 2))
        .collect()
}

fn content(plan: &Plan, dataset: Dataset) -> Vec<u8> {
    format!("{dataset:?} {}..={} {}", plan.first, plan.last, plan.date).into_bytes()
}

/// Carries out one action; a file write is three steps (temp, rename, report), so that a crash
/// can fall between them.
fn apply(disk: &mut Disk, ex: &mut Exporter, a: Action, steps: &mut u64, crash_at: u64) -> bool {
    let mut step = || {
        *steps += 1;
        *steps == crash_at
    };
    match a {
        Action::RemoveTemps => {
            if step() {
                return false;
            }
            disk.temps = 0;
        }
        Action::SaveManifest(m) => {
            if step() {
                return false;
            }
            disk.manifest = Some(m);
        }
        Action::WriteFile {
            plan,
            dataset,
            path,
        } => {
            if step() {
                return false;
            }
            disk.temps += 1;
            if step() {
                return false;
            }
            disk.temps -= 1;
            let bytes = content(&plan, dataset);
            disk.files.insert(path.clone(), bytes.clone());
            if step() {
                return false;
            }
            let entry = FileEntry {
                path,
                dataset,
                first_position: plan.first,
                last_position: plan.last,
                rows: plan.len(),
                bytes: bytes.len() as u64,
                sha256: String::new(),
            };
            for next in ex.written(entry) {
                if !apply(disk, ex, next, steps, crash_at) {
                    return false;
                }
            }
        }
    }
    true
}

/// Runs exports until caught up with `available` positions, crashing at step `crash_at` (0:
/// never). Returns false when it crashed.
fn run(disk: &mut Disk, available: &[(u64, i64)], crash_at: u64) -> bool {
    let mut steps = 0;
    let (mut ex, actions) = Exporter::start(disk.manifest.clone(), Format::Parquet, 4).unwrap();
    for a in actions {
        if !apply(disk, &mut ex, a, &mut steps, crash_at) {
            return false;
        }
    }
    loop {
        let from = usize::try_from(ex.checkpoint()).unwrap();
        let rows = &available[from..available.len().min(from + 10)];
        let actions = ex.offer(rows).unwrap();
        if actions.is_empty() {
            return true;
        }
        for a in actions {
            if !apply(disk, &mut ex, a, &mut steps, crash_at) {
                return false;
            }
        }
    }
}

fn check_exact(disk: &Disk, n: u64) {
    let m = disk.manifest.as_ref().unwrap();
    assert_eq!(m.last_position, n);
    assert!(m.pending.is_none());
    for ds in Dataset::ALL {
        let mut next = 1;
        for f in m.files.iter().filter(|f| f.dataset == ds) {
            assert_eq!(f.first_position, next, "gap or overlap at {}", f.path);
            next = f.last_position + 1;
            assert!(disk.files.contains_key(&f.path));
        }
        assert_eq!(next, n + 1);
    }
    assert_eq!(
        disk.files.len(),
        m.files.len(),
        "a file outside the manifest"
    );
}

#[test]
fn a_crash_at_every_step_recreates_the_same_files() {
    let all = ledger(40);
    let mut reference = Disk::default();
    assert!(run(&mut reference, &all, 0));
    check_exact(&reference, 40);
    let mut crash_at = 1;
    loop {
        let mut disk = Disk::default();
        let crashed = !run(&mut disk, &all, crash_at);
        if !crashed {
            break;
        }
        // Recover (with more rows available than before: the ledger grew meanwhile).
        assert!(run(&mut disk, &all, 0));
        assert_eq!(disk.files, reference.files, "crash at step {crash_at}");
        assert_eq!(
            disk.manifest, reference.manifest,
            "crash at step {crash_at}"
        );
        assert_eq!(disk.temps, 0);
        crash_at += 1;
    }
    assert!(crash_at > 50, "the model crashed at only {crash_at} steps");
}

#[test]
fn crashes_while_the_ledger_grows_leave_no_gap_or_overlap() {
    let all = ledger(60);
    let mut disk = Disk::default();
    // Crash at a moving step while more and more positions are there.
    for (i, n) in [3usize, 9, 10, 17, 30, 31, 45, 60].iter().enumerate() {
        let _ = run(&mut disk, &all[..*n], (i as u64 * 5) % 11 + 1);
    }
    assert!(run(&mut disk, &all, 0));
    check_exact(&disk, 60);
}

#[test]
fn a_plan_holds_one_day_and_at_most_max_rows() {
    let (mut ex, _) = Exporter::start(None, Format::Ndjson, 3).unwrap();
    let rows = [(1, 0), (2, 1), (3, DAY - 1), (4, DAY)];
    let a = ex.offer(&rows).unwrap();
    let Action::SaveManifest(m) = &a[0] else {
        panic!("{a:?}")
    };
    let plan = m.pending.clone().unwrap();
    assert_eq!(
        (plan.first, plan.last, plan.date.as_str()),
        (1, 3, "1970-01-01")
    );
    assert_eq!(
        plan.path(Dataset::Transfers, Format::Ndjson),
        "transfers/date=1970-01-01/transfers-00000000000000000001-00000000000000000003.ndjson"
    );
    assert!(ex.busy());
    assert!(ex.offer(&rows).unwrap().is_empty(), "one plan at a time");

    let (mut ex, _) = Exporter::start(None, Format::Ndjson, 10).unwrap();
    let a = ex.offer(&[(1, DAY - 1), (2, DAY)]).unwrap();
    let Action::SaveManifest(m) = &a[0] else {
        panic!("{a:?}")
    };
    assert_eq!(
        m.pending.as_ref().map(|p| p.last),
        Some(1),
        "cut at midnight"
    );
}

#[test]
fn gaps_and_other_formats_are_refused() {
    let (mut ex, _) = Exporter::start(None, Format::Parquet, 10).unwrap();
    assert_eq!(
        ex.offer(&[(2, 0)]),
        Err(CoreError::Gap { after: 0, got: 2 })
    );
    assert_eq!(
        ex.offer(&[(1, 0), (3, 0)]),
        Err(CoreError::Gap { after: 1, got: 3 })
    );
    let m = Manifest::new(Format::Ndjson);
    assert!(matches!(
        Exporter::start(Some(m), Format::Parquet, 10),
        Err(CoreError::Incompatible { .. })
    ));
}

#[test]
fn dates() {
    assert_eq!(date_of_ms(0), "1970-01-01");
    assert_eq!(date_of_ms(-1), "1969-12-31");
    assert_eq!(date_of_ms(951_782_400_000), "2000-02-29");
    assert_eq!(date_of_ms(1_796_256_000_000), "2026-12-03");
    assert_eq!(date_of_ms(1_796_256_000_000 - 1), "2026-12-02");
}
