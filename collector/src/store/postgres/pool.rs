//! A small pool of PostgreSQL connections, each owned by one thread of its own.
//!
//! The store's traits are synchronous and are called from the committer thread, from
//! `spawn_blocking` and, in a few places, straight from async handlers. The synchronous
//! `postgres` client drives its socket on a private runtime and must not be entered from a
//! runtime thread, so each connection lives on a plain thread and callers hand it a closure and
//! wait for the answer (as they wait on redb's fsync). See docs/decisions/0090.
//!
//! Guarantees: a closure runs on one connection at a time; when it fails with a transient error
//! (serialization failure, deadlock, a lost or refused connection) its transaction is gone, the
//! connection is dropped if it broke, and the closure runs again from the start after a short
//! back-off, at most [`MAX_ATTEMPTS`] times. Closures must therefore be whole transactions.

use super::tls::PgTls;
use crate::store::StoreError;
use postgres::error::SqlState;
use postgres::{Client, Statement};
use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most runs of one closure (the first and its retries); with the back-off below about 8 s,
/// long enough for a PostgreSQL restart or a failover of a managed instance to begin answering.
pub const MAX_ATTEMPTS: u32 = 12;

/// One connection and the statements prepared on it.
pub struct Session {
    config: postgres::Config,
    tls: PgTls,
    client: Option<Client>,
    stmts: HashMap<&'static str, Statement>,
}

impl Session {
    fn new(config: postgres::Config, tls: PgTls) -> Self {
        Session {
            config,
            tls,
            client: None,
            stmts: HashMap::new(),
        }
    }

    /// The connection, opened (again) when there is none or it closed.
    pub fn client(&mut self) -> Result<&mut Client, postgres::Error> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.stmts.clear();
            self.client = None;
            self.client = Some(self.tls.connect(&self.config)?);
        }
        match self.client.as_mut() {
            Some(c) => Ok(c),
            None => unreachable!("connected just above"),
        }
    }

    /// Starts a transaction (READ COMMITTED; writers serialize on row locks, see the store).
    pub fn begin(&mut self) -> Result<Tx<'_>, postgres::Error> {
        self.client()?;
        let Session { client, stmts, .. } = self;
        let Some(client) = client.as_mut() else {
            unreachable!("connected just above")
        };
        Ok(Tx {
            tx: client.transaction()?,
            stmts,
        })
    }
}

/// A transaction with the session's statement cache.
pub struct Tx<'a> {
    tx: postgres::Transaction<'a>,
    stmts: &'a mut HashMap<&'static str, Statement>,
}

type Params<'p> = &'p [&'p (dyn postgres::types::ToSql + Sync)];

impl Tx<'_> {
    fn stmt(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql)?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }

    /// Every row.
    pub fn query(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let s = self.stmt(sql)?;
        self.tx.query(&s, params)
    }

    /// At most one row.
    pub fn query_opt(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Option<postgres::Row>, postgres::Error> {
        let s = self.stmt(sql)?;
        self.tx.query_opt(&s, params)
    }

    /// Exactly one row.
    pub fn query_one(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<postgres::Row, postgres::Error> {
        let s = self.stmt(sql)?;
        self.tx.query_one(&s, params)
    }

    /// Rows changed.
    pub fn execute(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<u64, postgres::Error> {
        let s = self.stmt(sql)?;
        self.tx.execute(&s, params)
    }

    /// Runs statements without parameters (migrations).
    pub fn batch(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.tx.batch_execute(sql)
    }

    /// Commits.
    pub fn commit(self) -> Result<(), postgres::Error> {
        self.tx.commit()
    }
}

/// Whether a failure is worth running the whole transaction again.
pub fn transient(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let c = code.code();
        return *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || c.starts_with("08");
    }
    // No SQL state: the socket (refused, reset, timed out).
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// Transactions waiting for a connection at most.
pub const QUEUE_MAX: usize = 256;

/// The pool: `size` threads, each with one [`Session`], fed from one queue.
pub struct Pool {
    tx: mpsc::SyncSender<Job>,
    retries: Arc<std::sync::atomic::AtomicU64>,
}

impl Pool {
    /// Starts `size` connection threads (connections open lazily, on first use).
    pub fn new(config: postgres::Config, tls: PgTls, size: usize) -> Result<Self, StoreError> {
        // Bounded: past `QUEUE_MAX` waiting transactions a caller waits to enqueue (callers
        // block for their answer anyway, so the queue only smooths bursts).
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE_MAX);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..size.max(1) {
            let rx = rx.clone();
            let mut session = Session::new(config.clone(), tls.clone());
            std::thread::Builder::new()
                .name(format!("tally-pg-{i}"))
                .spawn(move || {
                    loop {
                        let job = {
                            let guard =
                                rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            guard.recv()
                        };
                        match job {
                            Ok(job) => job(&mut session),
                            Err(_) => break, // the pool was dropped
                        }
                    }
                })
                .map_err(|e| StoreError::Invariant(format!("postgres thread: {e}")))?;
        }
        Ok(Pool {
            tx,
            retries: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// Transactions run again after a transient failure, since the pool started.
    pub fn retries(&self) -> u64 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` on a connection, again after transient failures (see the module doc), and
    /// waits for its answer.
    pub fn run<T, F>(&self, mut f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&mut Session) -> Result<T, StoreError> + Send + 'static,
    {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let retries = self.retries.clone();
        let job: Job = Box::new(move |s: &mut Session| {
            let mut attempt = 1;
            let r = loop {
                match f(s) {
                    Err(StoreError::Postgres(e)) if attempt < MAX_ATTEMPTS && transient(&e) => {
                        tracing::warn!(error = %e, attempt, "postgres transaction retried");
                        retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if e.is_closed() || e.code().is_none() {
                            s.client = None;
                        }
                        let ms = (25u64 << attempt.min(6)).min(1_000);
                        std::thread::sleep(Duration::from_millis(ms));
                        attempt += 1;
                    }
                    other => break other,
                }
            };
            let _ = rtx.send(r);
        });
        self.tx
            .send(job)
            .map_err(|_| StoreError::Invariant(String::from("postgres pool stopped")))?;
        rrx.recv()
            .map_err(|_| StoreError::Invariant(String::from("postgres worker stopped")))?
    }
}
