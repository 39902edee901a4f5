//! The behaviour every [`ForwardStore`] must show, as one function a test calls on a fresh
//! store: the redb store's tests and the collector's PostgreSQL store's tests run the same
//! checks (feature `test-server`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::store::{BackfillPhase, BackfillRecord, ForwardStore, FwdStoreError};
use super::{Engine, FwdEvent, FwdState, LedgerItem, Routes, plan};

fn item(p: u64, c: &str, a: Decimal, ts: i64) -> LedgerItem {
    LedgerItem {
        position: p,
        customer: c.to_owned(),
        meter: "m".to_owned(),
        amount: a,
        timestamp_s: ts,
        dimensions: BTreeMap::from([("region".to_owned(), "eu".to_owned())]),
    }
}

/// Runs every check on `s`, which must be empty.
pub fn check_store(s: &dyn ForwardStore) {
    let ns = s.namespace().unwrap();
    assert!(
        !ns.is_empty()
            && ns
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "{ns:?}"
    );
    assert_eq!(s.namespace().unwrap(), ns, "the namespace is stable");
    let d = Engine::Metronome;
    for dest in [Engine::Orb, Engine::Metronome] {
        assert_eq!(s.cursor(dest).unwrap(), 0);
        assert_eq!(s.stats(dest).unwrap(), Default::default());
        assert!(s.backfill(dest).unwrap().is_none());
    }

    // Plan and cursor move together; a second planner from the same cursor is refused.
    let items: Vec<_> = (1..=3)
        .map(|p| item(p, &format!("c{p}"), Decimal::new(15, 1), 60 * p as i64))
        .collect();
    let p = plan(&ns, d, 0, 5, &items, &Routes::default());
    assert_eq!(p.cursor, 5);
    let gs = s.commit_plan(d, 0, p.cursor, p.groups.clone()).unwrap();
    assert_eq!(
        gs.iter().map(|g| g.id).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "ids ascend from 1 per destination"
    );
    assert!(gs.iter().all(|g| g.state == FwdState::Pending));
    assert_eq!(
        gs[0].event, p.groups[0],
        "the planned event is kept exactly"
    );
    match s.commit_plan(d, 0, p.cursor, p.groups.clone()) {
        Err(FwdStoreError::CursorMoved { expected, found }) => {
            assert_eq!((expected, found), (0, 5));
        }
        other => panic!("expected CursorMoved, got {other:?}"),
    }
    assert_eq!(s.cursor(d).unwrap(), 5);
    assert_eq!(s.cursor(Engine::Orb).unwrap(), 0, "cursors per destination");
    assert_eq!(
        s.stats(d).unwrap().open,
        3,
        "the refused plan wrote nothing"
    );
    // An empty plan moves only the cursor.
    assert!(s.commit_plan(d, 5, 7, Vec::new()).unwrap().is_empty());
    assert_eq!(s.cursor(d).unwrap(), 7);
    // The other destination numbers its own groups.
    let po = plan(&ns, Engine::Orb, 0, 0, &items[..1], &Routes::default());
    let go = s.commit_plan(Engine::Orb, 0, po.cursor, po.groups).unwrap();
    assert_eq!(go[0].id, 1);
    assert_ne!(go[0].event.key, gs[0].event.key);

    // Ready: open and due, ascending, limited.
    assert_eq!(s.ready(d, 0, 10).unwrap().len(), 3);
    assert_eq!(s.ready(d, 0, 2).unwrap().len(), 2);
    let a = s
        .apply(
            d,
            &[1],
            FwdEvent::Attempt {
                now_ms: 100,
                lease_until_ms: 5_000,
            },
        )
        .unwrap();
    assert_eq!((a[0].attempts, a[0].next_attempt_ms), (1, 5_000));
    assert_eq!(a[0].first_attempt_ms, Some(100));
    let ids = |v: Vec<super::FwdGroup>| v.iter().map(|g| g.id).collect::<Vec<_>>();
    assert_eq!(ids(s.ready(d, 4_999, 10).unwrap()), vec![2, 3], "leased");
    assert_eq!(ids(s.ready(d, 5_000, 10).unwrap()), vec![1, 2, 3]);
    // A lost answer: unknown, sticky, resent under the same key.
    let u = s
        .apply(
            d,
            &[1],
            FwdEvent::Retry {
                at_ms: 6_000,
                unknown: true,
                error: Some("lost".into()),
            },
        )
        .unwrap();
    assert_eq!(u[0].state, FwdState::Unknown);
    assert_eq!(u[0].event.key, gs[0].event.key);
    let u = s
        .apply(
            d,
            &[1],
            FwdEvent::Retry {
                at_ms: 7_000,
                unknown: false,
                error: None,
            },
        )
        .unwrap();
    assert_eq!(u[0].state, FwdState::Unknown, "unknown is sticky");
    assert_eq!(u[0].last_error.as_deref(), Some("lost"));

    // Old open groups (the window step).
    assert_eq!(ids(s.open_older_than(d, 120, 10).unwrap()), vec![1]);
    assert_eq!(ids(s.open_older_than(d, 1_000, 2).unwrap()), vec![1, 2]);

    // Final states: a late answer changes nothing; indexes and counts follow.
    s.apply(d, &[1], FwdEvent::Delivered).unwrap();
    let late = s.apply(d, &[1], FwdEvent::Rejected("late".into())).unwrap();
    assert_eq!(late[0].state, FwdState::Sent);
    s.apply(d, &[2], FwdEvent::OutOfWindow("old".into()))
        .unwrap();
    s.apply(d, &[3], FwdEvent::Rejected("bad".into())).unwrap();
    let st = s.stats(d).unwrap();
    assert_eq!(
        (st.open, st.sent, st.out_of_window, st.dead, st.backfill),
        (0, 1, 1, 1, 0)
    );
    assert_eq!(st.oldest_open_s, None);
    assert!(s.ready(d, i64::MAX, 10).unwrap().is_empty());
    assert_eq!(
        ids(s.list(d, Some(FwdState::Dead), 0, 10).unwrap()),
        vec![3]
    );
    assert_eq!(ids(s.list(d, None, 1, 10).unwrap()), vec![2, 3]);
    assert_eq!(ids(s.list(d, None, 0, 1).unwrap()), vec![1]);
    assert_eq!(
        s.list(d, Some(FwdState::OutOfWindow), 0, 10).unwrap()[0]
            .last_error
            .as_deref(),
        Some("old")
    );
    // An operator requeues a dead letter: same key, back to open.
    let r = s.apply(d, &[3], FwdEvent::Requeue).unwrap();
    assert_eq!(r[0].state, FwdState::Pending);
    assert_eq!(r[0].event.key, gs[2].event.key);
    let st = s.stats(d).unwrap();
    assert_eq!((st.open, st.dead), (1, 0));
    assert_eq!(st.oldest_open_s, Some(180));
    assert!(matches!(
        s.apply(d, &[99], FwdEvent::Delivered),
        Err(FwdStoreError::NotFound(99))
    ));
    assert_eq!(
        s.list(d, Some(FwdState::Pending), 0, 10).unwrap()[0].state,
        FwdState::Pending,
        "a refused apply changed nothing"
    );

    // Orb backfill: the record and the groups' move are one step; groups leave "open".
    let o = Engine::Orb;
    let more: Vec<_> = (2..=4)
        .map(|p| {
            item(
                p,
                "late",
                Decimal::new(-25, 2) * Decimal::from(p),
                60 * p as i64,
            )
        })
        .collect();
    let pm = plan(&ns, o, 1, 4, &more, &Routes::default());
    assert_eq!(pm.groups.len(), 3, "one per minute");
    let gm = s.commit_plan(o, 1, 4, pm.groups).unwrap();
    assert_eq!(ids(gm.clone()), vec![2, 3, 4]);
    assert_eq!(
        gm[0].event.value,
        Decimal::new(-5, 1),
        "negative values kept"
    );
    let rec = BackfillRecord {
        key: format!("tly-{ns}-bf-2-120"),
        start_s: 120,
        end_s: 240,
        orb_id: None,
        phase: BackfillPhase::Create,
        next_attempt_ms: 0,
        attempts: 0,
    };
    s.start_backfill(o, &rec, &[2, 3]).unwrap();
    assert_eq!(s.backfill(o).unwrap(), Some(rec.clone()));
    assert_eq!(ids(s.backfill_groups(o, &rec.key, 10).unwrap()), vec![2, 3]);
    assert!(s.backfill_groups(o, "other", 10).unwrap().is_empty());
    assert_eq!(ids(s.ready(o, 0, 10).unwrap()), vec![1, 4]);
    let st = s.stats(o).unwrap();
    assert_eq!((st.open, st.backfill), (2, 2));
    let ing = s.apply(o, &[2], FwdEvent::BackfillIngested).unwrap();
    assert!(ing[0].ingested && ing[0].state == FwdState::Backfill);
    let mut rec2 = rec.clone();
    rec2.orb_id = Some("bf_1".into());
    rec2.phase = BackfillPhase::Wait;
    s.put_backfill(o, Some(&rec2)).unwrap();
    assert_eq!(s.backfill(o).unwrap(), Some(rec2));
    s.apply(o, &[2, 3], FwdEvent::Delivered).unwrap();
    s.put_backfill(o, None).unwrap();
    assert!(s.backfill(o).unwrap().is_none());
    assert!(s.backfill_groups(o, &rec.key, 10).unwrap().is_empty());
    let st = s.stats(o).unwrap();
    assert_eq!((st.open, st.backfill, st.sent), (2, 0, 2));
    assert_eq!(s.stats(d).unwrap().sent, 1, "destinations' counts apart");
}
