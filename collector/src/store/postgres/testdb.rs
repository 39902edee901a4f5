//! A fresh database per test on the PostgreSQL named by `TALLY_TEST_POSTGRES_URL`, dropped when
//! the test ends, so tests run in parallel and CI runs repeat cleanly. For tests and benches.

use std::str::FromStr;

/// The environment variable naming the test server (`postgres://postgres@127.0.0.1:5432/test`).
pub const ENV: &str = "TALLY_TEST_POSTGRES_URL";

/// A database made for one test; dropped (with `FORCE`, closing leftover sessions) on drop.
#[derive(Debug)]
pub struct TestDb {
    admin: String,
    name: String,
    url: String,
}

/// Runs `f` on a plain thread: the synchronous client must not run on a runtime's thread, and
/// tests call this from `#[tokio::test]`s too.
fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match std::thread::spawn(f).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

impl TestDb {
    /// A new, empty database, or `None` (after printing that `test` skipped) when
    /// [`ENV`] is not set.
    pub fn create(test: &str) -> Option<TestDb> {
        let Ok(admin) = std::env::var(ENV) else {
            println!("{test}: skipped ({ENV} is not set)");
            return None;
        };
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).expect("random source");
        let name = format!("tally_t_{}", hex::encode(b));
        let url = with_database(&admin, &name);
        let (a, n) = (admin.clone(), name.clone());
        off_runtime(move || {
            let cfg = postgres::Config::from_str(&a).expect("TALLY_TEST_POSTGRES_URL parses");
            let mut c = cfg
                .connect(postgres::NoTls)
                .expect("test PostgreSQL answers");
            c.batch_execute(&format!("CREATE DATABASE {n}"))
                .expect("CREATE DATABASE");
        });
        Some(TestDb { admin, name, url })
    }

    /// Its URL, for `--ledger-url` and [`super::PgStore::open`].
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (a, n) = (self.admin.clone(), self.name.clone());
        off_runtime(move || {
            if let Ok(cfg) = postgres::Config::from_str(&a)
                && let Ok(mut c) = cfg.connect(postgres::NoTls)
            {
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"));
            }
        });
    }
}

/// `url` with its database replaced by `db` (query string kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let start = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[start..].find('/').map_or(base.len(), |i| start + i);
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_is_replaced_and_the_query_kept() {
        use super::with_database;
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/test?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }
}
