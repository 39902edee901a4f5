//! The web console in a real browser: headless Chromium driven over WebDriver (chromedriver)
//! with `fantoccini`, against an in-process collector on 127.0.0.1 with real QUIC agents and a
//! local Stripe-compatible server. Signs in, checks the overview's figures against the API,
//! opens a customer and checks usage against the ledger, posts an adjustment, retries a dead
//! letter, revokes an agent, and is refused with a wrong token.
//!
//! Skips (and says so) when `chromium` or `chromedriver` is not installed; `.ci/run` installs
//! both. With `TALLY_CONSOLE_SCREENSHOTS=<dir>` it writes a PNG of every page there (README's
//! `docs/console/`).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use tally_collector::CollectorConfig;
use tally_collector::forwarding::stripe::StripeSettings;
use tally_forward::retry::Backoff;
use tally_forward::stripe::test_server::FakeStripe;
use tally_forward::stripe::{Api, ApiKey, ForwarderConfig};
use tally_protocol::frame::{AckOutcome, Frame};
use tally_protocol::names::{CustomerId, MeterName};

const LAPTOP: (u32, u32) = (1280, 900);
const PHONE: (u32, u32) = (390, 844);

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find(|p| p.is_file())
}

/// A headless Chromium session; chromedriver is killed when it drops.
struct Browser {
    c: Client,
    _driver: Proc,
    shots: Option<PathBuf>,
}

async fn browser() -> Option<Browser> {
    let (Some(chromium), Some(driver)) = (
        on_path(&["chromium", "chromium-browser", "google-chrome"]),
        on_path(&["chromedriver"]),
    ) else {
        eprintln!(
            "console test skipped: chromium and chromedriver are not installed (.ci/run installs them)"
        );
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
        "goog:chromeOptions": {
            "binary": chromium.to_string_lossy(),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--force-device-scale-factor=1", "--hide-scrollbars", "--lang=en-US",
                     format!("--window-size={},{}", LAPTOP.0, LAPTOP.1)]
        }
    }))
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut last = None;
    for _ in 0..100 {
        let mut b = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        b.capabilities(caps.clone());
        match b.connect(&url).await {
            Ok(c) => {
                let shots = std::env::var_os("TALLY_CONSOLE_SCREENSHOTS").map(PathBuf::from);
                return Some(Browser {
                    c,
                    _driver: proc,
                    shots,
                });
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not start a session: {last:?}");
}

impl Browser {
    async fn js(&self, script: &str) -> Value {
        self.c.execute(script, vec![]).await.unwrap()
    }

    /// Polls a JavaScript expression until it is truthy (10 s).
    async fn until(&self, expr: &str) {
        let script = format!("return !!({expr});");
        for _ in 0..200 {
            if self.js(&script).await == Value::Bool(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let html = self.js("return document.body.innerText").await;
        panic!("timed out waiting for {expr}; page text: {html}");
    }

    async fn text(&self, css: &str) -> String {
        self.c
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .text()
            .await
            .unwrap()
    }

    async fn click(&self, css: &str) {
        self.c
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap();
    }

    async fn type_in(&self, css: &str, text: &str) {
        let e = self.c.find(Locator::Css(css)).await.unwrap();
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    /// Follows a navigation link (an htmx swap) and waits for the page's data.
    async fn open(&self, page: &str) {
        self.click(&format!("nav a[href='/console/{page}']")).await;
        self.until(&format!(
            "document.querySelector('#main [data-page={page}][data-loaded]')"
        ))
        .await;
    }

    async fn shot(&self, name: &str) {
        let Some(dir) = &self.shots else { return };
        std::fs::create_dir_all(dir).unwrap();
        // The whole page: as tall as its content (at most 2,400 px), then back.
        let (w, h) = self.c.get_window_size().await.unwrap();
        let full = self
            .js("return document.documentElement.scrollHeight")
            .await;
        let full = full.as_u64().unwrap_or(h).clamp(h, 2_400);
        self.js("window.scrollTo(0, 0)").await;
        self.c.set_window_size(w as u32, full as u32).await.unwrap();
        // Let the chart redraw at its width and the fonts settle.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let png = self.c.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        self.c.set_window_size(w as u32, h as u32).await.unwrap();
    }

    async fn size(&self, (w, h): (u32, u32)) {
        self.c.set_window_size(w, h).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    async fn sign_in(&self, base: &str, token: &str) {
        self.c.goto(&format!("{base}/console/")).await.unwrap();
        self.until("document.querySelector('#token')").await;
        self.type_in("#token", token).await;
        self.click("#signin-form button[type=submit]").await;
    }
}

fn dec(v: &Value) -> Decimal {
    Decimal::from_str(v.as_str().unwrap()).unwrap()
}

async fn put_meters(env: &Env) {
    for (m, stripe) in [("api_calls", "api_calls"), ("tokens", "tokens")] {
        let body = format!(
            r#"{{"aggregation":"sum","event_type":"{m}","value_property":"$.value","stripe_event_name":"{stripe}","stripe_unit_scale":"1"}}"#
        );
        let (st, v) = env
            .admin("PUT", &format!("/v1/meters/{m}"), Some(&body))
            .await;
        assert_eq!(st, 200, "{v}");
    }
}

async fn map(env: &Env, customer: &str, stripe: &str) {
    let plan =
        r#"{"features":["gpt4"],"limits":{"api_calls":{"included":"1000","enforcement":"hard"}}}"#;
    let (st, v) = env.admin("PUT", "/v1/plans/pro", Some(plan)).await;
    assert_eq!(st, 200, "{v}");
    let body = format!(r#"{{"stripe_customer_id":"{stripe}","plan":"pro"}}"#);
    let (st, v) = env
        .admin("PUT", &format!("/v1/customers/{customer}"), Some(&body))
        .await;
    assert_eq!(st, 200, "{v}");
}

/// A collector forwarding to a local Stripe, with meters, mapped customers, usage from two
/// agents over QUIC (one still connected), a quarantined batch and dead letters.
async fn scenario(server: &FakeStripe) -> (Env, tally_collector::testkit::TestClient) {
    let settings = StripeSettings {
        forwarder: ForwarderConfig {
            api: Api::V1,
            api_key: Some(ApiKey::new("sk_test_tally_console")),
            base_url: server.url(),
            meter_events_url: server.url(),
            poll_interval: Duration::from_millis(25),
            request_timeout: Duration::from_secs(2),
            backoff: Backoff {
                base: Duration::from_millis(10),
                cap: Duration::from_millis(100),
            },
            ..ForwarderConfig::default()
        },
        webhook_secret: None,
        reconcile_interval: None,
    };
    let env = start_with(move |c: &mut CollectorConfig| c.stripe = settings).await;
    put_meters(&env).await;
    map(&env, "acme", "cus_acme").await;
    map(&env, "globex", "cus_globex").await;
    server.reject_customer("cus_wrong");
    map(&env, "hooli", "cus_wrong").await;

    let now = now_ms();
    let q = |s: &str| Decimal::from_str(s).unwrap();
    let (ka, kb) = (key(31), key(32));
    let mut a = env.client(&ka).await;
    let batches = [
        vec![
            delta("acme", "api_calls", &[], now - 3 * 3_600_000, q("120"), 120),
            delta("acme", "tokens", &[], now - 3 * 3_600_000, q("15000.5"), 40),
            delta("globex", "api_calls", &[], now - 3_600_000, q("7"), 7),
        ],
        vec![
            delta("acme", "api_calls", &[], now - 3_600_000, q("80"), 80),
            delta("hooli", "api_calls", &[], now - 3_600_000, q("12"), 12),
        ],
        vec![delta("acme", "api_calls", &[], now - 60_000, q("42"), 42)],
    ];
    for (i, deltas) in batches.into_iter().enumerate() {
        match send(&mut a, &seal(&ka, 1, i as u64 + 1, deltas)).await {
            Frame::Ack(x) => assert_eq!(x.outcome, AckOutcome::Committed),
            other => panic!("{other:?}"),
        }
    }
    // A meter the catalog does not have: the batch is quarantined whole.
    let bad = seal(
        &ka,
        1,
        4,
        vec![delta("acme", "gpu_minutes", &[], now, q("3"), 1)],
    );
    match send(&mut a, &bad).await {
        Frame::Ack(x) => assert!(matches!(x.outcome, AckOutcome::Quarantined { .. }), "{x:?}"),
        other => panic!("{other:?}"),
    }
    // A second agent sends once and goes away.
    {
        let mut b = env.client(&kb).await;
        let batch = seal(
            &kb,
            1,
            1,
            vec![delta(
                "initech",
                "api_calls",
                &[],
                now - 7_200_000,
                q("5"),
                5,
            )],
        );
        match send(&mut b, &batch).await {
            Frame::Ack(x) => assert_eq!(x.outcome, AckOutcome::Committed),
            other => panic!("{other:?}"),
        }
        b.conn.close(0u32.into(), b"done");
        b.endpoint.wait_idle().await;
    }
    // Wait until the forwarder has done what it can: hooli's rows are dead letters, the rest
    // (initech is unmapped and waits) is settled.
    for _ in 0..400 {
        let (_, d) = env.admin("GET", "/v1/stripe/outbox?state=dead", None).await;
        let unmapped = env.handle.shared().forwarding.stripe_status().unmapped;
        if !d["data"].as_array().unwrap().is_empty() && unmapped.contains_key("initech") {
            let (_, p) = env
                .admin("GET", "/v1/stripe/outbox?state=pending", None)
                .await;
            let waiting = p["data"].as_array().unwrap();
            if waiting.iter().all(|r| r["row"]["customer"] == "initech") {
                return (env, a);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the forwarder did not settle");
}

/// Σ the ledger's usage accounts of a customer, meter and period.
fn ledger_usage(env: &Env, c: &str, m: &str, period: &str) -> Decimal {
    let p = tally_collector::core::ledger::Period::parse(period).unwrap();
    env.handle
        .shared()
        .store
        .usage_accounts(
            &CustomerId::new(c).unwrap(),
            Some(&MeterName::new(m).unwrap()),
            Some(p),
        )
        .unwrap()
        .iter()
        .map(|a| a.balance())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_end_to_end_in_chromium() {
    let Some(b) = browser().await else { return };
    let server = FakeStripe::start().await.unwrap();
    let (env, _agent) = scenario(&server).await;
    let base = format!("http://{}", env.handle.http_addr());
    let token = env.handle.admin_token().to_owned();

    // Sign in: the token lands in this tab's sessionStorage, never in the URL.
    b.sign_in(&base, &token).await;
    b.until("document.querySelector('#main [data-page=overview][data-loaded]')")
        .await;
    assert_eq!(
        b.js("return sessionStorage.getItem('tally.admin_token')")
            .await,
        Value::String(token.clone())
    );
    let url = b.c.current_url().await.unwrap();
    assert!(!url.as_str().contains(&token), "{url}");

    // The overview's figures equal the API's.
    let (st, o) = env.admin("GET", "/v1/overview", None).await;
    assert_eq!(st, 200, "{o}");
    b.until("document.querySelector('[data-figure=\"outbox.dead\"]').textContent !== '–'")
        .await;
    let shown = |v: &Value| match v {
        Value::Null => String::from("–"),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for f in [
        "deltas_total",
        "agents.connected",
        "agents.offline",
        "agents.revoked",
        "agents.offline_with_backlog",
        "agents.offline_backlog_batches",
        "outbox.pending",
        "outbox.unmapped",
        "outbox.dead",
        "outbox.unknown",
        "reconciliation_discrepancies",
        "quarantined",
    ] {
        let want = f.split('.').fold(&o, |v, k| &v[k]);
        let got = b.text(&format!("[data-figure=\"{f}\"]")).await;
        assert_eq!(got, shown(want), "overview figure {f}: {o}");
    }
    // The lag is whole seconds that move with the clock: the page and the API read it a moment
    // apart, so they may straddle a second.
    let lag_page = b.text("[data-figure=\"stripe_forward_lag_s\"]").await;
    match (&o["stripe_forward_lag_s"], lag_page.parse::<i64>()) {
        (Value::Null, _) => assert_eq!(lag_page, "–", "{o}"),
        (want, Ok(got)) => {
            let want = want.as_i64().expect("lag is whole seconds");
            assert!((got - want).abs() <= 1, "lag: page {got}, API {want}: {o}");
        }
        (want, Err(_)) => panic!("lag: page {lag_page:?}, API {want}"),
    }
    assert_eq!(o["deltas_total"], 7, "{o}");
    assert_eq!(o["agents"]["connected"], 1, "{o}");
    assert_eq!(o["quarantined"], 1, "{o}");
    assert!(o["outbox"]["dead"].as_u64().unwrap() > 0, "{o}");
    assert!(o["outbox"]["unmapped"].as_u64().unwrap() > 0, "{o}");
    // Each figure links to the page that explains it.
    let links = b
        .js("return Array.from(document.querySelectorAll('.figure')).map(a => a.getAttribute('href'))")
        .await;
    for page in [
        "/console/agents",
        "/console/stripe#dead",
        "/console/quarantine",
    ] {
        assert!(links.as_array().unwrap().contains(&json!(page)), "{links}");
    }
    b.shot("overview").await;
    b.size(PHONE).await;
    b.shot("overview-phone").await;
    b.size(LAPTOP).await;

    // Customers: search, then a customer's page with usage equal to the ledger.
    b.open("customers").await;
    let listed = b.text("#customers-table tbody").await;
    for c in ["acme", "globex", "hooli", "initech"] {
        assert!(listed.contains(c), "{listed}");
    }
    b.type_in("#prefix", "ac").await;
    b.until("document.querySelectorAll('#customers-table tbody tr').length === 1 && document.querySelector('#customers-table tbody a')?.textContent === 'acme'")
        .await;
    b.shot("customers").await;
    b.click("#customers-table tbody a").await;
    b.until("document.querySelector('#main [data-page=customer][data-loaded]')")
        .await;
    assert!(
        b.c.current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/console/customers/acme")
    );
    let period = tally_collector::core::ledger::Period::of_ms(now_ms()).to_string();
    let rows = b
        .js("return Array.from(document.querySelectorAll('#usage-table tbody tr')).map(r => [r.dataset.meter, r.dataset.period, r.cells[2].textContent])")
        .await;
    let rows = rows.as_array().unwrap();
    assert!(!rows.is_empty());
    for r in rows {
        let (m, p, q) = (r[0].as_str().unwrap(), r[1].as_str().unwrap(), dec(&r[2]));
        assert_eq!(q, ledger_usage(&env, "acme", m, p), "{m} {p}");
        let (_, u) = env
            .admin(
                "GET",
                &format!("/v1/usage?customer=acme&meter={m}&period={p}"),
                None,
            )
            .await;
        assert_eq!(q, dec(&u["quantity"]), "{u}");
    }
    let before = ledger_usage(&env, "acme", "api_calls", &period);
    assert_eq!(before, Decimal::from(242));
    // The chart's series adds up to the ledger (every unit of acme is inside its 48 hours).
    b.until("document.querySelector('#chart[data-total]')")
        .await;
    let total = b
        .js("return document.querySelector('#chart').dataset.total")
        .await;
    assert_eq!(dec(&total), before);
    b.until("document.querySelector('#chart canvas')").await;
    // Entitlements: the panel reads GET /v1/entitlements/{c}; a grant through the form is
    // posted once (idempotent) and counted by the API.
    b.until("document.querySelector('#entitlements').dataset.state === 'loaded'")
        .await;
    let panel = b.text("#entitlements").await;
    assert!(
        panel.contains("Plan: pro") && panel.contains("gpt4 (allowed, plan)"),
        "{panel}"
    );
    b.c.find(Locator::Css("#grant-meter"))
        .await
        .unwrap()
        .select_by_value("api_calls")
        .await
        .unwrap();
    b.type_in("#grant-quantity", "50").await;
    b.type_in("#grant-key", "console-test-grant-1").await;
    b.click("#grant-form button[type=submit]").await;
    b.until("document.querySelector('#grant-result').dataset.outcome === 'created'")
        .await;
    let (s, g) = env
        .admin(
            "POST",
            "/v1/grants",
            Some(r#"{"customer":"acme","meter":"api_calls","quantity":"50","idempotency_key":"console-test-grant-1"}"#),
        )
        .await;
    assert_eq!(s, 200, "the form's grant exists with the same body: {g}");
    assert_eq!(g["quantity"], "50");
    let (_, e) = env.admin("GET", "/v1/entitlements/acme", None).await;
    assert_eq!(e["meters"]["api_calls"]["granted"], "50", "{e}");
    b.until("Array.from(document.querySelectorAll('#limits-table tbody tr')).some(r => r.cells[0].textContent === 'api_calls' && r.cells[3].textContent === '50')")
        .await;
    assert_eq!(
        ledger_usage(&env, "acme", "api_calls", &period),
        before,
        "a grant is not usage"
    );
    b.shot("customer").await;

    // Add an adjustment through the form; the page and the API both show it.
    b.c.find(Locator::Css("#adj-meter"))
        .await
        .unwrap()
        .select_by_value("api_calls")
        .await
        .unwrap();
    b.type_in("#adj-quantity", "-2.5").await;
    b.type_in("#adj-reason", "refund: outage on the 1st").await;
    b.type_in("#adj-key", "console-test-adj-1").await;
    b.click("#adjust-form button[type=submit]").await;
    b.until("document.querySelector('#adjust-result').dataset.outcome === 'created'")
        .await;
    let after = ledger_usage(&env, "acme", "api_calls", &period);
    assert_eq!(after, before - Decimal::from_str("2.5").unwrap());
    b.until(&format!(
        "Array.from(document.querySelectorAll('#usage-table tbody tr')).some(r => r.dataset.meter === 'api_calls' && r.dataset.period === '{period}' && r.cells[2].textContent === '{after}')"
    ))
    .await;
    b.until("Array.from(document.querySelectorAll('#entries-table tbody tr[data-source=adjustment]')).some(r => r.textContent.includes('−2.5') && r.textContent.includes('refund: outage'))")
        .await;
    // The same key again changes nothing: the form says so and the ledger is unchanged.
    b.type_in("#adj-quantity", "-2.5").await;
    b.type_in("#adj-reason", "refund: outage on the 1st").await;
    b.type_in("#adj-key", "console-test-adj-1").await;
    b.click("#adjust-form button[type=submit]").await;
    b.until("document.querySelector('#adjust-result').dataset.outcome === 'exists'")
        .await;
    assert_eq!(ledger_usage(&env, "acme", "api_calls", &period), after);
    b.size(PHONE).await;
    b.shot("customer-phone").await;
    b.size(LAPTOP).await;

    // Stripe: a dead letter shows Stripe's code and message; Retry requeues it and it is sent.
    b.open("stripe").await;
    let dead = b.text("#dead-table tbody").await;
    assert!(dead.contains("resource_missing"), "{dead}");
    b.shot("stripe").await;
    let (_, d) = env.admin("GET", "/v1/stripe/outbox?state=dead", None).await;
    let row = d["data"][0]["row"]["id"].as_u64().unwrap();
    server.accept_customer("cus_wrong");
    b.click(&format!("button[data-retry='{row}']")).await;
    b.until(&format!(
        "document.querySelector('#retry-result').textContent.startsWith('Row {row} requeued')"
    ))
    .await;
    let mut sent = false;
    for _ in 0..200 {
        let (_, s) = env
            .admin("GET", "/v1/stripe/outbox?state=sent&limit=1000", None)
            .await;
        if s["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["row"]["id"] == row)
        {
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(sent, "the retried row was delivered");
    assert!(server.totals().keys().any(|(c, _)| c == "cus_wrong"));

    // Agents: revoke with confirmation.
    b.open("agents").await;
    let kb = agent_id(&key(32)).to_string();
    b.until(&format!(
        "document.querySelector(\"tr[data-agent='{kb}'][data-state=offline]\")"
    ))
    .await;
    b.shot("agents").await;
    b.click(&format!("button[data-agent='{kb}']")).await;
    b.until("document.querySelector('#revoke-dialog').open")
        .await;
    b.shot("agents-revoke").await;
    b.click("#revoke-confirm").await;
    b.until(&format!(
        "document.querySelector(\"tr[data-agent='{kb}'][data-state=revoked]\")"
    ))
    .await;
    let (_, agents) = env.admin("GET", "/v1/agents", None).await;
    let revoked = agents["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == kb.as_str())
        .unwrap();
    assert!(revoked["revoked_at_ms"].is_i64(), "{agents}");

    // Meters: edit one through the form.
    b.open("meters").await;
    b.click("button[aria-label='Edit meter tokens']").await;
    b.type_in("#m-event-type", "llm_tokens").await;
    b.click("#meter-form button[type=submit]").await;
    b.until("document.querySelector('#meter-result').textContent.startsWith('Saved')")
        .await;
    let (_, meters) = env.admin("GET", "/v1/meters", None).await;
    assert!(
        meters["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "tokens" && m["event_type"] == "llm_tokens"),
        "{meters}"
    );
    b.shot("meters").await;

    // Quarantine lists the batch with its reason.
    b.open("quarantine").await;
    let q = b.text("#quarantine-table tbody").await;
    assert!(q.contains("unknown_meter"), "{q}");
    b.shot("quarantine").await;

    // Every page reloads at its own URL.
    b.c.refresh().await.unwrap();
    b.until("document.querySelector('#main [data-page=quarantine][data-loaded]')")
        .await;
    b.c.close().await.unwrap();
    env.assert_verified();
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_clearly() {
    let Some(b) = browser().await else { return };
    let env = start().await;
    let base = format!("http://{}", env.handle.http_addr());
    b.sign_in(&base, "not-the-admin-token").await;
    b.until("!document.querySelector('#signin-error').hidden")
        .await;
    let msg = b.text("#signin-error").await;
    assert!(msg.contains("Wrong admin token"), "{msg}");
    assert_eq!(
        b.js("return sessionStorage.getItem('tally.admin_token')")
            .await,
        Value::Null
    );
    assert_eq!(
        b.js("return document.querySelector('#main').hidden").await,
        Value::Bool(true)
    );
    b.shot("signin-refused").await;
    // A page reached directly still asks for the token first.
    b.c.goto(&format!("{base}/console/agents")).await.unwrap();
    b.until("document.querySelector('#token') && document.body.classList.contains('signed-out')")
        .await;
    b.c.close().await.unwrap();
    env.handle.shutdown().await;
}

/// The routes the console added, without a browser: the customer search pages in key order,
/// the usage series adds up to `/v1/usage`, the overview counts what the other routes list,
/// the pages are served with their security headers, and `/openapi.json` documents it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_routes_and_api() {
    let env = start().await;
    env.put_meter("api_calls", tally_protocol::catalog::Aggregation::Sum);
    let k = key(41);
    let mut a = env.client(&k).await;
    let now = now_ms();
    let q = |n: i64| Decimal::from(n);
    let mut deltas = Vec::new();
    for (i, c) in ["acme", "acme-eu", "beta", "zeta"].iter().enumerate() {
        deltas.push(delta(
            c,
            "api_calls",
            &[],
            now - 3_600_000 * i as i64,
            q(10 + i as i64),
            1,
        ));
    }
    deltas.push(delta(
        "acme",
        "api_calls",
        &[],
        now - 30 * 86_400_000,
        q(5),
        1,
    ));
    match send(&mut a, &seal(&k, 1, 1, deltas)).await {
        Frame::Ack(x) => assert_eq!(x.outcome, AckOutcome::Committed),
        other => panic!("{other:?}"),
    }
    map_plain(&env, "cus_only_settings").await;

    // Search by prefix, in key order, paged.
    let (st, v) = env.admin("GET", "/v1/customers?prefix=acme", None).await;
    assert_eq!(st, 200, "{v}");
    let keys: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["customer"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["acme", "acme-eu"]);
    let (_, p1) = env.admin("GET", "/v1/customers?limit=2", None).await;
    assert_eq!(p1["has_more"], true);
    let after = p1["next_after"].as_str().unwrap().to_owned();
    let (_, p2) = env
        .admin(
            "GET",
            &format!("/v1/customers?limit=10&after={after}"),
            None,
        )
        .await;
    let all: Vec<&str> = p1["data"]
        .as_array()
        .unwrap()
        .iter()
        .chain(p2["data"].as_array().unwrap())
        .map(|c| c["customer"].as_str().unwrap())
        .collect();
    assert_eq!(
        all,
        ["acme", "acme-eu", "beta", "cus_only_settings", "zeta"]
    );
    let (_, one) = env
        .admin("GET", "/v1/customers/cus_only_settings", None)
        .await;
    assert_eq!(one["stripe_customer_id"], "cus_only_settings", "{one}");
    assert_eq!(env.admin("GET", "/v1/customers/nobody", None).await.0, 404);
    assert_eq!(env.admin("GET", "/v1/customers?limit=0", None).await.0, 400);

    // The series adds up to the ledger's usage over its range, empty buckets included.
    let (st, s) = env
        .admin(
            "GET",
            &format!(
                "/v1/usage/series?customer=acme&meter=api_calls&granularity=day&from={}&to={}",
                now - 40 * 86_400_000,
                now + 1
            ),
            None,
        )
        .await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(dec(&s["total"]), q(15));
    assert_eq!(s["data"].as_array().unwrap().len(), 41);
    let (_, h) = env
        .admin(
            "GET",
            "/v1/usage/series?customer=acme&meter=api_calls",
            None,
        )
        .await;
    assert_eq!(
        dec(&h["total"]),
        q(10),
        "the default 48 hours leave the old delta out: {h}"
    );
    assert_eq!(h["data"].as_array().unwrap().len(), 49);
    let (st, e) = env
        .admin(
            "GET",
            "/v1/usage/series?customer=acme&meter=api_calls&granularity=week",
            None,
        )
        .await;
    assert_eq!(
        (st, e["error"]["param"].as_str()),
        (400, Some("granularity"))
    );
    let (st, e) = env
        .admin(
            "GET",
            "/v1/usage/series?customer=acme&meter=api_calls&from=0",
            None,
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (400, Some("invalid_range"))
    );

    // The overview.
    let (_, o) = env.admin("GET", "/v1/overview", None).await;
    assert_eq!(o["deltas_total"], 5, "{o}");
    assert_eq!(o["agents"]["connected"], 1, "{o}");
    assert!(o["deltas_per_s"].is_string(), "a rate since the start: {o}");

    // Pages: no token needed for markup, security headers on, fragments for htmx.
    let (st, html) = env.http("GET", "/console/agents", None, None).await;
    assert_eq!(st, 200);
    assert!(html.contains("<!doctype html>") && html.contains(r#"data-page="agents""#));
    let (st, _) = env
        .http("GET", "/console/assets/htmx-2.0.11.min.js", None, None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(env.http("GET", "/console/nope", None, None).await.0, 404);
    assert_eq!(
        env.http("GET", "/console/assets/nope.js", None, None)
            .await
            .0,
        404
    );
    let raw = raw_get(env.handle.http_addr(), "/console/customers/a%3Cb%3E", true).await;
    assert!(
        raw.contains("content-security-policy: default-src 'self'"),
        "{raw}"
    );
    assert!(
        raw.contains("a&lt;b&gt;") && !raw.contains("<b>"),
        "escaped: {raw}"
    );
    assert!(
        !raw.contains("<!doctype html>"),
        "a fragment for htmx: {raw}"
    );
    let (_, redirect) = env.http("GET", "/", None, None).await;
    assert!(redirect.is_empty());

    let (_, doc) = env.http("GET", "/openapi.json", None, None).await;
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for p in [
        "/v1/usage/series",
        "/v1/customers",
        "/v1/customers/{customer}",
        "/v1/overview",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} documented");
    }
    env.handle.shutdown().await;
}

async fn map_plain(env: &Env, customer: &str) {
    let (st, v) = env
        .admin("PUT", &format!("/v1/customers/{customer}"), Some("{}"))
        .await;
    assert_eq!(st, 200, "{v}");
}

/// A GET with or without `HX-Request`; the whole answer, head included, lowercased head.
async fn raw_get(addr: std::net::SocketAddr, path: &str, htmx: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let hx = if htmx { "HX-Request: true\r\n" } else { "" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{hx}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    format!("{}\r\n\r\n{body}", head.to_ascii_lowercase())
}
