//! The design a team would build itself, as well as it can be built: every event one row in
//! PostgreSQL with its idempotency key (`INSERT … ON CONFLICT DO NOTHING`), prepared
//! statements, one connection per worker thread (a pool of `workers`), one event per
//! transaction or `batch` events per transaction (one `unnest` statement), then a `SUM` per
//! customer and meter. Same events as the other phases ([`Workload`]), same machine.

use super::workload::{Names, Totals, Workload};
use anyhow::{Context, bail};
use rust_decimal::Decimal;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Streams of the baseline's workers start here (the sidecar phase uses other streams).
pub const STREAM_BASE: u64 = 3_000_000;

/// What one baseline run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BaselineRun {
    /// Events per transaction.
    pub batch: usize,
    /// Worker threads, one connection each.
    pub workers: usize,
    /// Events inserted (all new keys).
    pub events: u64,
    /// Insert phase, seconds.
    pub seconds: f64,
    /// Events per second inserted.
    pub events_per_s: f64,
    /// Latency of one transaction, µs: p50, p99, p999.
    pub txn_us: [u64; 3],
    /// The `SUM … GROUP BY customer, meter` over every row afterwards, ms.
    pub sum_ms: f64,
    /// The sums equal the events' exact totals.
    pub exact: bool,
    /// PostgreSQL's CPU over the insert phase, % of one core (all its processes).
    pub postgres_cpu_percent: f64,
}

/// A scratch database on the server of `url`, dropped on drop.
pub struct ScratchDb {
    admin: postgres::Config,
    name: String,
    /// The scratch database's own settings.
    pub config: postgres::Config,
}

impl ScratchDb {
    /// Creates `tally_load_<pid>_<n>`.
    pub fn create(url: &str) -> anyhow::Result<ScratchDb> {
        let admin = postgres::Config::from_str(url).context("postgres URL")?;
        let name = format!(
            "tally_load_{}_{}",
            std::process::id(),
            Instant::now().elapsed().subsec_nanos()
        );
        let mut c = admin.connect(postgres::NoTls).context("connect")?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))?;
        let mut config = admin.clone();
        config.dbname(&name);
        let mut db = config.connect(postgres::NoTls)?;
        db.batch_execute(
            "CREATE TABLE usage_events (
                idempotency_key text PRIMARY KEY,
                customer text NOT NULL,
                meter text NOT NULL,
                model text NOT NULL,
                quantity numeric NOT NULL,
                occurred_at timestamptz NOT NULL DEFAULT now())",
        )?;
        Ok(ScratchDb {
            admin,
            name,
            config,
        })
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if let Ok(mut c) = self.admin.connect(postgres::NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

const INSERT_ONE: &str =
    "INSERT INTO usage_events (idempotency_key, customer, meter, model, quantity)
     VALUES ($1, $2, $3, $4, $5::text::numeric) ON CONFLICT (idempotency_key) DO NOTHING";
const INSERT_MANY: &str =
    "INSERT INTO usage_events (idempotency_key, customer, meter, model, quantity)
     SELECT k, c, m, d, q::numeric
       FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS t(k, c, m, d, q)
     ON CONFLICT (idempotency_key) DO NOTHING";

/// Runs `workers` threads inserting `batch` events per transaction for `duration`, then sums.
/// `expected` gets the events' totals; the table is emptied first so each run sums only its own.
pub fn run(
    db: &ScratchDb,
    w: Workload,
    names: &Arc<Names>,
    workers: usize,
    batch: usize,
    duration: Duration,
) -> anyhow::Result<BaselineRun> {
    db.config
        .connect(postgres::NoTls)?
        .batch_execute("TRUNCATE usage_events")?;
    let stop = Arc::new(AtomicBool::new(false));
    let pg_before = postgres_cpu();
    let began = Instant::now();
    let mut threads = Vec::new();
    for t in 0..workers {
        let (config, names, stop) = (db.config.clone(), names.clone(), stop.clone());
        let stream = STREAM_BASE + (batch as u64) * 1_000 + t as u64;
        threads.push(std::thread::spawn(
            move || -> anyhow::Result<(u64, hdrhistogram::Histogram<u64>)> {
                let mut c = config.connect(postgres::NoTls)?;
                let one = c.prepare(INSERT_ONE)?;
                let many = c.prepare(INSERT_MANY)?;
                let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    if batch == 1 {
                        let e = w.event(stream, i);
                        let q = e.quantity.to_string();
                        let key = format!("s{stream}-{i}");
                        let n = c.execute(
                            &one,
                            &[
                                &key,
                                &names.customers[e.customer as usize],
                                &names.meters[e.meter as usize],
                                &names.dims[e.dim as usize],
                                &q,
                            ],
                        )?;
                        if n != 1 {
                            bail!("event {key} was not new");
                        }
                    } else {
                        let mut cols: [Vec<String>; 5] = Default::default();
                        for k in i..i + batch as u64 {
                            let e = w.event(stream, k);
                            cols[0].push(format!("s{stream}-{k}"));
                            cols[1].push(names.customers[e.customer as usize].clone());
                            cols[2].push(names.meters[e.meter as usize].clone());
                            cols[3].push(names.dims[e.dim as usize].clone());
                            cols[4].push(e.quantity.to_string());
                        }
                        let mut tx = c.transaction()?;
                        let n =
                            tx.execute(&many, &[&cols[0], &cols[1], &cols[2], &cols[3], &cols[4]])?;
                        tx.commit()?;
                        if n != batch as u64 {
                            bail!("{n} of {batch} events were new");
                        }
                    }
                    i += batch as u64;
                    let _ = hist.record(t0.elapsed().as_micros() as u64);
                }
                Ok((i, hist))
            },
        ));
    }
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut events = 0;
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut streams = Vec::new();
    for (t, th) in threads.into_iter().enumerate() {
        let (n, h) = th
            .join()
            .map_err(|_| anyhow::anyhow!("worker panicked"))??;
        events += n;
        hist.add(h)?;
        streams.push((STREAM_BASE + (batch as u64) * 1_000 + t as u64, n));
    }
    let seconds = began.elapsed().as_secs_f64();
    let pg_after = postgres_cpu();

    let t0 = Instant::now();
    let mut c = db.config.connect(postgres::NoTls)?;
    let rows = c.query(
        "SELECT customer, meter, sum(quantity)::text FROM usage_events GROUP BY 1, 2",
        &[],
    )?;
    let sum_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut expected = Totals::new();
    w.add_totals(&streams, &mut expected);
    let mut got = std::collections::BTreeMap::new();
    for r in rows {
        let (c, m, q): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let ci = names.customers.iter().position(|x| *x == c);
        let mi = names.meters.iter().position(|x| *x == m);
        if let (Some(ci), Some(mi)) = (ci, mi) {
            got.insert((ci as u32, mi as u32), Decimal::from_str(&q)?.normalize());
        }
    }
    let expected: Totals = expected
        .into_iter()
        .map(|(k, v)| (k, v.normalize()))
        .collect();
    Ok(BaselineRun {
        batch,
        workers,
        events,
        seconds,
        events_per_s: events as f64 / seconds,
        txn_us: [
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.99),
            hist.value_at_quantile(0.999),
        ],
        sum_ms,
        exact: got == expected,
        postgres_cpu_percent: match (pg_before, pg_after) {
            (Some(a), Some(b)) => 100.0 * (b - a) / seconds,
            _ => f64::NAN,
        },
    })
}

/// CPU seconds of every `postgres` process on this machine (the server's backends, WAL writer,
/// checkpointer), or `None` when none can be read.
pub fn postgres_cpu() -> Option<f64> {
    let mut total = 0.0;
    let mut any = false;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "postgres"
            && let Some(s) = super::procstat::sample(pid)
        {
            total += s.cpu_s();
            any = true;
        }
    }
    any.then_some(total)
}
