//! Event times outside the window are refused on every path that takes one, and nothing of the
//! refused call is recorded.
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use tally_agent::{Agent, Event, RecordError, Recorded};
use tally_protocol::Decimal;

const T0: i64 = 1_790_000_000_000;
const DAY: i64 = 86_400_000;

async fn agent(dir: &std::path::Path, window: Option<(Duration, Duration)>) -> Agent {
    let mut b = Agent::builder()
        .data_dir(dir)
        .flush_interval(Duration::from_secs(3600))
        .clock(std::sync::Arc::new(tally_clock::ManualClock::new(T0)));
    if let Some((age, lead)) = window {
        b = b.event_time_window(age, lead);
    }
    b.start().await.unwrap()
}

#[tokio::test]
async fn events_dated_outside_stripes_window_are_refused_and_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), None).await;
    let at = |ms: i64| Event::new("acme", "api_calls", Decimal::ONE).at_ms(ms);
    let year_1 = -62_135_596_800_000;
    let year_9999 = 253_402_300_799_000;
    for t in [year_1, year_9999, T0 - 35 * DAY - 1, T0 + 5 * 60_000 + 1] {
        assert_eq!(a.record_event(at(t)), Err(RecordError::EventTimeOutOfRange));
        assert_eq!(
            a.record_event(at(t).with_id(format!("id-{t}"))),
            Err(RecordError::EventTimeOutOfRange)
        );
        assert!(matches!(
            a.record_durable(at(t).with_id(format!("d-{t}"))).await,
            Err(RecordError::EventTimeOutOfRange)
        ));
        // One bad event refuses the whole request.
        assert!(matches!(
            a.record_durable_all(vec![at(T0).with_id("fine"), at(t)])
                .await,
            Err(RecordError::EventTimeOutOfRange)
        ));
    }
    assert_eq!(a.status().durable_log_events, 0, "nothing logged");
    assert_eq!(a.seal().await.unwrap(), 0, "nothing to seal");
    // The edges are inside.
    assert_eq!(a.record_event(at(T0 - 35 * DAY)), Ok(Recorded::New));
    assert_eq!(a.record_event(at(T0 + 5 * 60_000)), Ok(Recorded::New));
    assert_eq!(
        a.record_durable(at(T0).with_id("fine")).await.unwrap(),
        Recorded::New,
        "the refused request left no id behind"
    );
    assert!(a.render_metrics().contains("event_time_out_of_range"));
    let _ = a.shutdown(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn the_window_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent(
        dir.path(),
        Some((Duration::from_secs(90 * 86_400), Duration::from_secs(60))),
    )
    .await;
    let at = |ms: i64| Event::new("acme", "api_calls", Decimal::ONE).at_ms(ms);
    assert_eq!(a.record_event(at(T0 - 60 * DAY)), Ok(Recorded::New));
    assert_eq!(
        a.record_event(at(T0 + 120_000)),
        Err(RecordError::EventTimeOutOfRange)
    );
    let _ = a.shutdown(Duration::from_millis(10)).await;
}
