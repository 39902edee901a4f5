//! TLS to PostgreSQL (decision 0096), against the test server named by
//! `TALLY_TEST_POSTGRES_URL` (otherwise the test prints that it skipped): `sslmode=disable`
//! connects in the clear, `require` over TLS (PostgreSQL's own `pg_stat_ssl` says so) or not at
//! all when the server has no TLS, and `verify-full` refuses a certificate it cannot verify.
#![allow(clippy::unwrap_used, missing_docs)]

use tally_collector::store::Store;
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::testdb::TestDb;
use tally_collector::store::postgres::tls;

/// Whether this connection is encrypted, as the server sees it.
fn encrypted(url: &str) -> Result<bool, String> {
    let (config, tls, _) = tls::parse(url).map_err(|e| e.to_string())?;
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut c = tls.connect(&config).map_err(|e| format!("{url}: {e:?}"))?;
        let row = c
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .map_err(|e| e.to_string())?;
        Ok(row.get::<_, bool>(0))
    })
    .join()
    .unwrap()
}

fn with(url: &str, q: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{q}")
}

#[test]
fn sslmode_is_honoured_against_the_test_server() {
    let Some(db) = TestDb::create("sslmode_is_honoured_against_the_test_server") else {
        return;
    };
    let url = db.url();
    assert_eq!(encrypted(&with(url, "sslmode=disable")), Ok(false));
    let server_has_tls = std::thread::spawn({
        let url = url.to_owned();
        move || {
            let (config, _, _) = tls::parse(&url).unwrap();
            let mut c = config.connect(postgres::NoTls).unwrap();
            c.query_one("SHOW ssl", &[]).unwrap().get::<_, String>(0) == "on"
        }
    })
    .join()
    .unwrap();
    match encrypted(&with(url, "sslmode=require")) {
        Ok(on) => {
            assert!(server_has_tls);
            assert!(on, "sslmode=require connected in the clear");
        }
        Err(e) => assert!(!server_has_tls, "require failed on a TLS server: {e}"),
    }
    if server_has_tls {
        // The server's certificate is not signed by anything we trust.
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec![String::from("elsewhere")]).unwrap();
        let root = dir.path().join("root.pem");
        std::fs::write(&root, ca.cert.pem()).unwrap();
        let e = encrypted(&with(
            url,
            &format!("sslmode=verify-full&sslrootcert={}", root.display()),
        ))
        .unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        // The store itself over TLS: it migrates, writes and reads.
        let store_url = with(url, "sslmode=require");
        std::thread::spawn(move || {
            let s = PgStore::open(&store_url).unwrap();
            assert!(s.verify().unwrap().ok);
        })
        .join()
        .unwrap();
    }
}
