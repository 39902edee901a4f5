//! The dispatch machine driven on a virtual clock, without sockets or tasks.

#![allow(clippy::unwrap_used)]
use super::*;
use crate::stripe::outbox::{
    MemoryStore, NewOutboxRow, OutboxState, OutboxStore, resolve_customer,
};
use crate::time::{Clock, ManualClock};

const T0: i64 = 1_800_000_000_000;

/// The machine on a virtual clock, with a [`MemoryStore`] and a Stripe that counts each
/// identifier once — everything the tokio shell does, without sockets or tasks.
struct Harness {
    m: Dispatcher,
    store: MemoryStore,
    clock: ManualClock,
    /// Identifier → value, as Stripe counts it.
    stripe: BTreeMap<String, u64>,
    sends: Vec<(Option<JobId>, Request)>,
    checks: Vec<(JobId, EventGroup)>,
    logs: usize,
}

fn config(api: Api) -> DispatchConfig {
    DispatchConfig {
        api,
        live: true,
        rate_per_s: 1000,
        max_in_flight: 8,
        poll_interval_ms: 500,
        request_timeout_ms: 30_000,
        backoff: Backoff::default(),
        unknown_check_after_ms: 23 * 3_600_000,
        session_renew_before_ms: 60_000,
        rows_per_pass: 1000,
    }
}

fn answer(status: u16, body: &str) -> Answer {
    Answer {
        status,
        retry_after_s: None,
        should_retry: None,
        body: body.into(),
    }
}

fn stripe_error(code: &str) -> String {
    format!(r#"{{"error":{{"type":"invalid_request_error","code":"{code}","message":"{code}!"}}}}"#)
}

impl Harness {
    fn new(cfg: DispatchConfig) -> Self {
        Self {
            m: Dispatcher::new(cfg, T0, 42),
            store: MemoryStore::with_namespace("t"),
            clock: ManualClock::new(T0),
            stripe: BTreeMap::new(),
            sends: Vec::new(),
            checks: Vec::new(),
            logs: 0,
        }
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    fn usage(&mut self, customer: &str, meter: &str, value: u64) {
        self.store
            .insert(NewOutboxRow {
                customer: customer.into(),
                meter: meter.into(),
                stripe_event_name: meter.into(),
                timestamp_s: T0 / 1000 / 60 * 60,
                value,
            })
            .unwrap();
    }

    /// One planning scan, as the shell runs it.
    fn plan(&mut self) {
        let now = self.now();
        self.m.wake(now);
        let scan = self.m.plan_due(now).unwrap();
        let rows = self.store.pending_rows(scan.after, scan.limit).unwrap();
        let mapping = rows
            .iter()
            .map(|r| {
                let m = resolve_customer(&self.store, &r.customer).unwrap();
                (r.customer.clone(), m)
            })
            .collect();
        let scanned = ScannedRows {
            namespace: "t".into(),
            rows,
            mapping,
            reached_end: true,
        };
        let (create, _) = self.m.on_rows(now, scanned);
        self.perform(create.into_iter().collect());
    }

    fn perform(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Store { op, .. } => match op {
                    StoreOp::CreateGroups(g) => {
                        self.store.create_groups(g).unwrap();
                    }
                    StoreOp::RecordAttempt {
                        ids,
                        now_ms,
                        lease_until_ms,
                    } => self
                        .store
                        .record_attempt(&ids, now_ms, lease_until_ms)
                        .unwrap(),
                    StoreOp::MarkSent(ids) => self.store.mark_sent(&ids).unwrap(),
                    StoreOp::MarkRetry {
                        id,
                        at_ms,
                        unknown,
                        error,
                    } => self.store.mark_retry(id, at_ms, unknown, error).unwrap(),
                    StoreOp::MarkDead { id, error } => self.store.mark_dead(id, error).unwrap(),
                },
                Action::Send { job, request } => self.sends.push((job, request)),
                Action::Check { job, group } => self.checks.push((job, group)),
                Action::Log(_) => self.logs += 1,
            }
        }
    }

    /// What the shell does each turn: ready groups to the machine, timers.
    fn tick(&mut self) {
        let now = self.now();
        if let Some(limit) = self.m.ready_limit() {
            let ready = self.store.ready_groups(now, limit).unwrap();
            let a = self.m.on_ready(now, ready);
            self.perform(a);
        }
        let a = self.m.on_timeout(now);
        self.perform(a);
    }

    fn take_sends(&mut self) -> Vec<(Option<JobId>, Request)> {
        std::mem::take(&mut self.sends)
    }

    /// Stripe processes a v1 request (counting its identifier once) and answers.
    fn stripe_v1(&mut self, req: &Request) -> Answer {
        let Request::V1 { event, .. } = req else {
            panic!("not v1: {req:?}")
        };
        if self.stripe.contains_key(&event.identifier) {
            return answer(
                400,
                &format!(
                    r#"{{"error":{{"type":"invalid_request_error","message":"An event already exists with identifier {}."}}}}"#,
                    event.identifier
                ),
            );
        }
        self.stripe.insert(event.identifier.clone(), event.value);
        answer(200, "{}")
    }

    fn answer(&mut self, job: Option<JobId>, a: Option<Answer>) {
        let now = self.now();
        let out = self.m.on_answer(now, job.unwrap(), a);
        self.perform(out);
    }

    fn state(&self, s: OutboxState) -> usize {
        self.store.list(s, 0, 1000).unwrap().len()
    }
}

#[test]
fn a_500_then_success_sends_once_under_one_identifier() {
    let mut h = Harness::new(config(Api::V1));
    h.usage("cus_a", "calls", 5);
    h.plan();
    h.tick();
    let s = h.take_sends();
    assert_eq!(s.len(), 1);
    let Request::V1 {
        event: first,
        idempotency_key: k1,
    } = s[0].1.clone()
    else {
        panic!()
    };
    h.answer(s[0].0, Some(answer(500, &stripe_error("api_error"))));
    assert_eq!(
        h.state(OutboxState::Unknown),
        1,
        "a 5xx may have been processed"
    );
    h.tick();
    assert!(h.take_sends().is_empty(), "backoff: not at once");
    h.clock.advance_ms(60_000);
    h.tick();
    let s = h.take_sends();
    let Request::V1 {
        event: again,
        idempotency_key: k2,
    } = s[0].1.clone()
    else {
        panic!()
    };
    assert_eq!(again.identifier, first.identifier);
    assert_ne!(k1, k2, "a new attempt, a new idempotency key");
    let a = h.stripe_v1(&s[0].1);
    h.answer(s[0].0, Some(a));
    assert_eq!(h.state(OutboxState::Sent), 1);
    assert_eq!(h.stripe.values().sum::<u64>(), 5);
    assert_eq!(h.store.groups().unwrap()[0].attempts, 2);
}

#[test]
fn a_429_backs_off_at_least_retry_after() {
    let mut h = Harness::new(config(Api::V1));
    h.usage("cus_a", "calls", 1);
    h.plan();
    h.tick();
    let s = h.take_sends();
    let mut a = answer(429, &stripe_error("rate_limit"));
    a.retry_after_s = Some(120);
    h.answer(s[0].0, Some(a));
    let g = &h.store.groups().unwrap()[0];
    assert_eq!(g.state, GroupState::Pending, "a 429 was not processed");
    assert!(
        g.next_attempt_ms >= h.now() + 120_000,
        "{}",
        g.next_attempt_ms - h.now()
    );
    h.clock.advance_ms(119_000);
    h.tick();
    assert!(h.take_sends().is_empty());
    h.clock.advance_ms(1_000);
    h.tick();
    assert_eq!(h.take_sends().len(), 1);
}

#[test]
fn an_answer_lost_after_processing_is_retried_under_the_same_identifier_and_counted_once() {
    let mut h = Harness::new(config(Api::V1));
    h.usage("cus_a", "calls", 7);
    h.plan();
    h.tick();
    let s = h.take_sends();
    let _processed = h.stripe_v1(&s[0].1);
    h.answer(s[0].0, None);
    assert_eq!(h.state(OutboxState::Unknown), 1);
    h.clock.advance_ms(60_000);
    h.tick();
    let s2 = h.take_sends();
    assert_eq!(s2.len(), 1);
    let a = h.stripe_v1(&s2[0].1);
    assert_eq!(a.status, 400, "Stripe already has the identifier");
    h.answer(s2[0].0, Some(a));
    assert_eq!(h.state(OutboxState::Sent), 1);
    assert_eq!(h.stripe.len(), 1);
    assert_eq!(h.stripe.values().sum::<u64>(), 7, "counted once");
}

#[test]
fn a_4xx_goes_to_dead_letters_with_stripes_code() {
    let mut h = Harness::new(config(Api::V1));
    h.usage("cus_a", "calls", 1);
    h.plan();
    h.tick();
    let s = h.take_sends();
    h.answer(s[0].0, Some(answer(400, &stripe_error("resource_missing"))));
    let dead = h.store.list(OutboxState::Dead, 0, 10).unwrap();
    assert_eq!(dead.len(), 1);
    let e = dead[0].error.clone().unwrap();
    assert_eq!((e.status, e.code.as_str()), (400, "resource_missing"));
    h.clock.advance_ms(3_600_000);
    h.tick();
    assert!(
        h.take_sends().is_empty(),
        "dead letters wait for an operator"
    );
}

#[test]
fn the_23_hour_rule_checks_event_summaries_before_sending_again() {
    for (total, expect) in [(3, "sent"), (0, "send"), (2, "undecided")] {
        let mut h = Harness::new(config(Api::V1));
        h.usage("cus_a", "calls", 3);
        h.plan();
        h.tick();
        let s = h.take_sends();
        h.answer(s[0].0, None);
        // Within 23 hours an unknown group is simply retried.
        h.clock.advance_ms(60_000);
        h.tick();
        let s = h.take_sends();
        assert_eq!(s.len(), 1);
        assert!(h.checks.is_empty());
        h.answer(s[0].0, None);
        h.clock.advance_ms(23 * 3_600_000);
        h.tick();
        assert!(h.take_sends().is_empty(), "checked before it is sent again");
        let (job, g) = h.checks.pop().unwrap();
        let window = h.store.groups().unwrap();
        let out = h.m.on_check(
            h.now(),
            job,
            g.id,
            CheckReading::Read {
                stripe_total: Decimal::from(total),
                window,
            },
        );
        h.perform(out);
        match expect {
            "sent" => {
                assert_eq!(h.state(OutboxState::Sent), 1);
                assert!(h.take_sends().is_empty());
                assert_eq!(h.m.status().resolved_by_check, 1);
            }
            "send" => assert_eq!(h.take_sends().len(), 1),
            _ => {
                assert!(h.take_sends().is_empty());
                assert_eq!(h.m.status().inconclusive_checks, 1);
                let g = &h.store.groups().unwrap()[0];
                assert_eq!(g.state, GroupState::Unknown);
                assert_eq!(g.next_attempt_ms, h.now() + UNDECIDED_RECHECK_MS);
            }
        }
        let in_flight = usize::from(expect == "send");
        assert_eq!(h.m.jobs_in_flight(), in_flight, "{expect}");
    }
}

#[test]
fn at_most_one_request_in_flight_per_customer_and_meter() {
    let mut h = Harness::new(config(Api::V1));
    h.usage("cus_a", "calls", 1);
    h.plan();
    h.clock.advance_ms(60_000);
    // A later bucket: a second group for the same customer and meter, and another pair.
    h.store
        .insert(NewOutboxRow {
            customer: "cus_a".into(),
            meter: "calls".into(),
            stripe_event_name: "calls".into(),
            timestamp_s: T0 / 1000 / 60 * 60 + 60,
            value: 2,
        })
        .unwrap();
    h.usage("cus_b", "calls", 3);
    h.plan();
    assert_eq!(h.store.groups().unwrap().len(), 3);
    h.tick();
    let s = h.take_sends();
    let keys: Vec<(String, String)> = s
        .iter()
        .map(|(_, r)| match r {
            Request::V1 { event, .. } => (event.stripe_customer.clone(), event.event_name.clone()),
            _ => panic!(),
        })
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_ne!(keys[0], keys[1]);
    h.tick();
    assert!(h.take_sends().is_empty(), "cus_a/calls is busy");
    let a = h.stripe_v1(&s[0].1);
    h.answer(s[0].0, Some(a));
    h.tick();
    assert_eq!(h.take_sends().len(), 1, "the key is free again");
}

#[test]
fn v2_session_expiry_renews_the_session() {
    let mut h = Harness::new(config(Api::V2));
    h.usage("cus_a", "calls", 4);
    h.plan();
    h.tick();
    let s = h.take_sends();
    assert!(matches!(s[..], [(None, Request::Session { .. })]), "{s:?}");
    let expires = crate::time::rfc3339(h.now() / 1000 + 600);
    let out = h.m.on_session(h.now(), Ok(Ok(("tok1".into(), expires))));
    h.perform(out);
    let s = h.take_sends();
    let (job, Request::Stream { token, .. }) = s[0].clone() else {
        panic!("{s:?}")
    };
    assert_eq!(token, "tok1");
    // Stripe says the session expired: a new session, then the same events again.
    h.answer(
        job,
        Some(answer(
            401,
            r#"{"error":{"type":"temporary_session_expired","message":"x"}}"#,
        )),
    );
    let s = h.take_sends();
    assert!(matches!(s[..], [(None, Request::Session { .. })]), "{s:?}");
    let expires = crate::time::rfc3339(h.now() / 1000 + 600);
    let out = h.m.on_session(h.now(), Ok(Ok(("tok2".into(), expires))));
    h.perform(out);
    let s = h.take_sends();
    let (job2, Request::Stream { token, events, .. }) = s[0].clone() else {
        panic!("{s:?}")
    };
    assert_eq!((job2, token.as_str(), events.len()), (job, "tok2", 1));
    h.answer(job2, Some(answer(200, "{}")));
    assert_eq!(h.state(OutboxState::Sent), 1);
    // Near its expiry the session is renewed before the next stream request.
    h.usage("cus_a", "calls", 1);
    h.clock.advance_ms(600_000 - 30_000);
    h.plan();
    h.tick();
    let s = h.take_sends();
    assert!(matches!(s[..], [(None, Request::Session { .. })]), "{s:?}");
}

#[test]
fn v2_rejected_stream_is_resent_event_by_event() {
    let mut h = Harness::new(config(Api::V2));
    h.usage("cus_a", "calls", 1);
    h.usage("cus_b", "calls", 2);
    h.plan();
    h.tick();
    let expires = crate::time::rfc3339(h.now() / 1000 + 600);
    h.take_sends();
    let out = h.m.on_session(h.now(), Ok(Ok(("tok".into(), expires))));
    h.perform(out);
    let s = h.take_sends();
    h.answer(s[0].0, Some(answer(400, &stripe_error("invalid_customer"))));
    let s = h.take_sends();
    let Request::Stream { events, .. } = &s[0].1 else {
        panic!()
    };
    assert_eq!(events.len(), 1);
    h.answer(s[0].0, Some(answer(400, &stripe_error("invalid_customer"))));
    let s = h.take_sends();
    h.answer(s[0].0, Some(answer(200, "{}")));
    assert_eq!(
        (h.state(OutboxState::Dead), h.state(OutboxState::Sent)),
        (1, 1)
    );
    assert_eq!(h.m.jobs_in_flight(), 0);
}

#[test]
fn requests_are_paced_by_the_token_bucket() {
    let mut cfg = config(Api::V1);
    cfg.rate_per_s = 1;
    let mut h = Harness::new(cfg);
    h.usage("cus_a", "calls", 1);
    h.usage("cus_b", "calls", 1);
    h.plan();
    h.tick();
    assert_eq!(h.take_sends().len(), 1, "burst of one");
    assert!(h.m.poll_timeout() <= h.now() + 1000);
    h.clock.advance_ms(1000);
    h.tick();
    assert_eq!(h.take_sends().len(), 1);
}

#[test]
fn log_only_logs_each_group_once_within_its_bound() {
    let mut cfg = config(Api::V1);
    cfg.live = false;
    let mut h = Harness::new(cfg);
    h.usage("cus_a", "calls", 1);
    h.plan();
    h.tick();
    h.tick();
    assert_eq!((h.logs, h.sends.len()), (1, 0));
    assert_eq!(h.m.logged_len(), 1);
    let mut set = BoundedSet::new(3);
    for id in 0..5 {
        assert!(set.insert(id));
    }
    assert_eq!(set.len(), 3, "the limit holds");
    assert!(!set.insert(4), "recent ids are remembered");
    assert!(set.insert(0), "the oldest were forgotten: logged again");
}

#[test]
fn unknown_groups_sharing_a_minute_are_resolved_by_one_check() {
    let mut h = Harness::new(config(Api::V2));
    h.usage("cus_a", "calls", 1);
    h.usage("cus_a", "tokens", 2);
    h.plan();
    h.tick();
    h.take_sends();
    let expires = crate::time::rfc3339(h.now() / 1000 + 600);
    let out = h.m.on_session(h.now(), Ok(Ok(("tok".into(), expires))));
    h.perform(out);
    let s = h.take_sends();
    h.answer(s[0].0, None);
    assert_eq!(h.state(OutboxState::Unknown), 2);
    h.clock.advance_ms(24 * 3_600_000);
    h.tick();
    assert_eq!(h.checks.len(), 2, "both are checked before any send");
    let window = h.store.groups().unwrap();
    // The first reading explains both (one event name's window holds both here).
    let (job, g) = h.checks.remove(0);
    let out = h.m.on_check(
        h.now(),
        job,
        g.id,
        CheckReading::Read {
            stripe_total: Decimal::from(3),
            window: window.clone(),
        },
    );
    h.perform(out);
    assert_eq!(h.state(OutboxState::Sent), 2);
    let (job, g) = h.checks.remove(0);
    let out =
        h.m.on_check(h.now(), job, g.id, CheckReading::Failed("late".into()));
    h.perform(out);
    assert!(h.take_sends().is_empty(), "nothing is sent again");
    assert_eq!(h.m.jobs_in_flight(), 0, "the job ends");
}

#[test]
fn a_lost_session_answer_retries_the_events_later_as_not_sent() {
    let mut h = Harness::new(config(Api::V2));
    h.usage("cus_a", "calls", 1);
    h.plan();
    h.tick();
    h.take_sends();
    let out = h.m.on_session(h.now(), Err(()));
    h.perform(out);
    let g = &h.store.groups().unwrap()[0];
    assert_eq!(g.state, GroupState::Pending, "no event was sent");
    assert!(g.next_attempt_ms > h.now());
    assert_eq!(h.m.jobs_in_flight(), 0);
}

/// Random faults on a virtual clock: 5xx processed or not, 429s, answers lost before or
/// after processing, expired v2 sessions, answers out of order. Stripe ends with exactly
/// the outbox's units, each identifier once, and v1 never has two requests in flight for
/// one customer and meter.
#[test]
fn random_faults_end_exact() {
    for api in [Api::V1, Api::V2] {
        for seed in 1..=20u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut cfg = config(api);
            cfg.max_in_flight = 3;
            let mut h = Harness::new(cfg);
            let mut total = 0;
            for i in 0..30u64 {
                let v = 1 + next(5);
                total += v;
                let c = format!("cus_{}", i % 3);
                h.usage(&c, ["calls", "tokens"][(i % 2) as usize], v);
                if next(4) == 0 {
                    h.plan();
                }
            }
            h.plan();
            let mut in_flight: Vec<(Option<JobId>, Request)> = Vec::new();
            for step in 0..20_000 {
                if h.state(OutboxState::Sent) == 30 && in_flight.is_empty() {
                    break;
                }
                assert!(step < 19_999, "{api:?} seed {seed}: not done");
                h.clock.advance_ms(next(3000) as i64);
                h.tick();
                in_flight.extend(h.take_sends());
                if api == Api::V1 {
                    let mut keys = HashSet::new();
                    for (_, r) in &in_flight {
                        if let Request::V1 { event, .. } = r {
                            let k = (event.stripe_customer.clone(), event.event_name.clone());
                            assert!(keys.insert(k), "two in flight for one key");
                        }
                    }
                }
                if in_flight.is_empty() || next(3) == 0 {
                    continue;
                }
                let (job, req) = in_flight.remove(next(in_flight.len() as u64) as usize);
                let now = h.now();
                let fault = next(10);
                let out = match req {
                    Request::Session { .. } => {
                        let r = if fault < 2 {
                            Err(())
                        } else {
                            let exp = crate::time::rfc3339(now / 1000 + 60 + next(600) as i64);
                            Ok(Ok((format!("tok{step}"), exp)))
                        };
                        h.m.on_session(now, r)
                    }
                    Request::V1 { .. } => {
                        let processed = fault >= 4 || fault == 1;
                        let a = if processed {
                            Some(h.stripe_v1(&req))
                        } else {
                            None
                        };
                        let a = match fault {
                            0 => Some(answer(500, &stripe_error("api_error"))),
                            1 => None,
                            2 => Some(answer(429, &stripe_error("rate_limit"))),
                            3 => None,
                            _ => a,
                        };
                        h.m.on_answer(now, job.unwrap(), a)
                    }
                    Request::Stream { ref events, .. } => {
                        let processed = fault >= 4 || fault == 1;
                        if processed {
                            for e in events {
                                h.stripe.entry(e.identifier.clone()).or_insert(e.value);
                            }
                        }
                        let a = match fault {
                            0 => Some(answer(
                                401,
                                r#"{"error":{"type":"temporary_session_expired"}}"#,
                            )),
                            1 | 3 => None,
                            2 => Some(answer(429, &stripe_error("rate_limit"))),
                            _ => Some(answer(200, "{}")),
                        };
                        h.m.on_answer(now, job.unwrap(), a)
                    }
                };
                h.perform(out);
                in_flight.extend(h.take_sends());
            }
            assert_eq!(h.stripe.values().sum::<u64>(), total, "{api:?} seed {seed}");
            assert_eq!(h.stripe.len(), h.store.groups().unwrap().len());
            assert_eq!(h.m.jobs_in_flight(), 0);
        }
    }
}

#[test]
fn planning_resumes_where_it_stopped_and_publishes_unmapped_at_the_end() {
    let mut cfg = config(Api::V1);
    cfg.rows_per_pass = 2;
    let mut m = Dispatcher::new(cfg, T0, 1);
    let row = |id: u64, customer: &str| OutboxRow {
        id,
        customer: customer.into(),
        meter: "calls".into(),
        stripe_event_name: "calls".into(),
        timestamp_s: 60,
        value: 1,
        revision: 0,
    };
    let scan = m.plan_due(T0).unwrap();
    assert_eq!((scan.after, scan.limit), (0, 2));
    let (create, publish) = m.on_rows(
        T0,
        ScannedRows {
            namespace: "t".into(),
            rows: vec![row(1, "acme"), row(2, "acme")],
            mapping: BTreeMap::from([("acme".to_string(), None)]),
            reached_end: false,
        },
    );
    assert_eq!((create, publish), (None, None));
    assert_eq!(
        m.plan_due(T0),
        None,
        "the next pass waits for the poll interval"
    );
    m.wake(T0);
    assert_eq!(
        m.plan_due(T0).unwrap().after,
        2,
        "resumes after the backlog"
    );
    let (create, publish) = m.on_rows(
        T0,
        ScannedRows {
            namespace: "t".into(),
            rows: vec![row(3, "acme"), row(4, "cus_b")],
            mapping: BTreeMap::from([
                ("acme".to_string(), None),
                ("cus_b".to_string(), Some("cus_b".to_string())),
            ]),
            reached_end: true,
        },
    );
    let Some(Action::Store {
        op: StoreOp::CreateGroups(groups),
        ..
    }) = create
    else {
        panic!("{create:?}")
    };
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].row_ids, vec![4]);
    assert_eq!(publish, Some(BTreeMap::from([("acme".to_string(), 3)])));
    assert_eq!(m.status().unmapped.get("acme"), Some(&3));
    m.wake(T0);
    assert_eq!(
        m.plan_due(T0).unwrap().after,
        0,
        "a new scan from the start"
    );
}

#[test]
fn stop_waits_for_jobs_in_flight() {
    let mut h = Harness::new(config(Api::V1));
    h.usage("cus_a", "calls", 1);
    h.plan();
    h.tick();
    let s = h.take_sends();
    h.m.stop();
    assert!(!h.m.is_done());
    assert_eq!(h.m.ready_limit(), None);
    h.answer(s[0].0, Some(answer(200, "{}")));
    assert!(h.m.is_done());
}
