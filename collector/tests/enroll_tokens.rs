//! Enrolment tokens as objects, over real QUIC and the admin API: single-use by default,
//! expiring, revocable, labelled; only hashes kept; revoking an agent can revoke the token that
//! enrolled it, so the same host cannot enrol again with a fresh key.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use tally_collector::testkit::{ClientError, TestClient};
use tally_protocol::error::ErrorCode;

fn refused(r: Result<TestClient, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Refused(e)) => e.code,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a welcome"),
    }
}

async fn connect(env: &Env, seed: u8, token: &str) -> Result<TestClient, ClientError> {
    TestClient::connect(env.handle.quic_addr(), &env.ca_pem, &key(seed), Some(token)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_single_use_expire_and_revoke_with_their_agents() {
    let env = start().await;
    // The token init wrote is an object too: listed, unlimited, labelled source=init.
    let (s, list) = env.admin("GET", "/v1/enroll-tokens", None).await;
    assert_eq!(s, 200, "{list}");
    let init = &list["data"][0];
    assert_eq!(init["labels"]["source"], "init");
    assert!(init["max_uses"].is_null() && init["expires_at"].is_null());
    assert!(init.get("token").is_none(), "secrets are never listed");

    // A new token: single-use, 24 h, labelled; the secret shown once.
    let (s, t) = env
        .admin(
            "POST",
            "/v1/enroll-tokens",
            Some(r#"{"labels":{"env":"prod"}}"#),
        )
        .await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["max_uses"], 1);
    assert_eq!(t["uses"], 0);
    let secret = t["token"].as_str().unwrap().to_string();
    let id = t["id"].as_str().unwrap().to_string();
    let created = t["created_at"].as_i64().unwrap();
    assert_eq!(
        t["expires_at"].as_i64().unwrap(),
        created + 86_400,
        "Unix seconds"
    );
    let dump = std::fs::read(&env.handle.files().store).unwrap();
    assert!(
        !dump.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the secret is not in the store"
    );

    // It enrols one agent, whose record carries the token and its labels; a second is refused.
    let agent = connect(&env, 1, &secret).await.unwrap();
    drop(agent);
    assert_eq!(
        refused(connect(&env, 2, &secret).await),
        ErrorCode::EnrollTokenUsedUp
    );
    let (_, agents) = env.admin("GET", "/v1/agents", None).await;
    let a = agents["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == agent_id(&key(1)).to_string())
        .unwrap();
    assert_eq!(a["enrolled_by"], id.as_str());
    assert_eq!(a["labels"]["env"], "prod");

    // Revoking the agent with revoke_token revokes the token: the same host with a fresh key
    // cannot come back with it (a multi-use token, so only the revocation stops it).
    let (_, multi) = env
        .admin("POST", "/v1/enroll-tokens", Some(r#"{"max_uses":5}"#))
        .await;
    let multi_secret = multi["token"].as_str().unwrap().to_string();
    drop(connect(&env, 3, &multi_secret).await.unwrap());
    let (s, _) = env
        .admin(
            "POST",
            &format!("/v1/agents/{}/revoke", agent_id(&key(3))),
            Some(r#"{"revoke_token":true}"#),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        refused(connect(&env, 4, &multi_secret).await),
        ErrorCode::EnrollTokenRevoked
    );
    assert_eq!(
        refused(connect(&env, 3, &multi_secret).await),
        ErrorCode::RevokedAgent
    );

    // DELETE revokes; a wrong secret is simply invalid; bad requests change nothing.
    let (_, other) = env.admin("POST", "/v1/enroll-tokens", None).await;
    let (s, gone) = env
        .admin(
            "DELETE",
            &format!("/v1/enroll-tokens/{}", other["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(gone["usable"], false);
    assert_eq!(
        refused(connect(&env, 5, other["token"].as_str().unwrap()).await),
        ErrorCode::EnrollTokenRevoked
    );
    assert_eq!(
        refused(connect(&env, 5, "not-a-token").await),
        ErrorCode::InvalidEnrollToken
    );
    for bad in [
        r#"{"max_uses":0}"#,
        r#"{"expires_in_s":0}"#,
        r#"{"labels":{"a b":"x"}}"#,
        r#"{"nonsense":1}"#,
    ] {
        let (s, e) = env.admin("POST", "/v1/enroll-tokens", Some(bad)).await;
        assert_eq!(s, 400, "{bad}: {e}");
    }
    let (s, _) = env.admin("DELETE", "/v1/enroll-tokens/et_nope", None).await;
    assert_eq!(s, 404);
    let (_, list) = env.admin("GET", "/v1/enroll-tokens", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 4);
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_past_its_expiry_is_refused() {
    let env = start().await;
    let (_, t) = env
        .admin("POST", "/v1/enroll-tokens", Some(r#"{"expires_in_s":1}"#))
        .await;
    let secret = t["token"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    assert_eq!(
        refused(connect(&env, 7, &secret).await),
        ErrorCode::EnrollTokenExpired
    );
    env.handle.shutdown().await;
}

/// Runs `tally-collector enroll-token ARGS` against `env`'s admin API; (exit code, stdout,
/// stderr).
fn cli(env: &Env, args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally-collector"))
        .arg("enroll-token")
        .args(args)
        .arg("--admin-url")
        .arg(format!("http://{}", env.handle.http_addr()))
        .arg("--admin-token-file")
        .arg(&env.handle.files().admin_token)
        .env_remove("TALLY_ADMIN_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::String(stdout));
    (
        out.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_lists_and_revokes_tokens() {
    let env = start().await;
    let (code, t, err) = cli(
        &env,
        &[
            "create",
            "--max-uses",
            "2",
            "--expires-in",
            "600",
            "--label",
            "team=billing",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (id, secret) = (t["id"].as_str().unwrap(), t["token"].as_str().unwrap());
    assert_eq!(t["max_uses"], 2);
    assert_eq!(t["labels"]["team"], "billing");
    // It enrols.
    connect(&env, 40, secret).await.unwrap();

    let (code, list, err) = cli(&env, &["list"]);
    assert_eq!(code, 0, "{err}");
    let listed = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id)
        .unwrap()
        .clone();
    assert_eq!(listed["uses"], 1);
    assert!(listed.get("token").is_none(), "a secret was listed");

    let (code, r, err) = cli(&env, &["revoke", id]);
    assert_eq!(code, 0, "{err}");
    assert!(r["revoked_at"].is_i64(), "{r}");
    assert_eq!(
        refused(connect(&env, 41, secret).await),
        ErrorCode::EnrollTokenRevoked
    );

    // Errors are the API's, said plainly, with a non-zero exit.
    let (code, _, err) = cli(&env, &["revoke", "et_000000000000"]);
    assert_ne!(code, 0);
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = cli(&env, &["create", "--label", "nolabel"]);
    assert_ne!(code, 0);
    assert!(err.contains("KEY=VALUE"), "{err}");
    env.handle.shutdown().await;
}
