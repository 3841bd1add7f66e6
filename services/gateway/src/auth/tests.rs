//! Keys, bearer parsing, the file's checks and the quota buckets.
use super::*;

fn file_with(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(id, secret, extra)| {
            format!(
                "[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\n{extra}\n",
                hex(&Sha256::digest(secret.as_bytes()))
            )
        })
        .collect()
}

fn authenticator(text: &str) -> Authenticator {
    let dir = std::env::temp_dir().join(format!(
        "kosmos-auth-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("keys.toml");
    std::fs::write(&path, text).expect("write");
    Authenticator::from_file(&path, Duration::ZERO).expect("keys")
}

#[test]
fn bearer_secrets_find_their_key_and_nothing_else_does() {
    let auth = authenticator(&file_with(&[("a", "secret-a", ""), ("b", "secret-b", "")]));
    let caller = auth.authenticate(Some(b"Bearer secret-b")).expect("b");
    assert_eq!(caller.tenant(), "b");
    assert_eq!(
        auth.authenticate(Some(b"bearer   secret-a "))
            .expect("a")
            .tenant(),
        "a"
    );
    assert_eq!(
        auth.authenticate(None).expect_err("none"),
        AuthError::Missing
    );
    assert_eq!(
        auth.authenticate(Some(b"Basic eA==")).expect_err("basic"),
        AuthError::Malformed
    );
    assert_eq!(
        auth.authenticate(Some(b"Bearer")).expect_err("empty"),
        AuthError::Malformed
    );
    assert_eq!(
        auth.authenticate(Some(b"Bearer secret-c")).expect_err("c"),
        AuthError::Unknown
    );
    assert_eq!(
        auth.authenticate(Some(b"Bearer secret-a2"))
            .expect_err("close"),
        AuthError::Unknown
    );
    assert_eq!(
        Authenticator::open()
            .authenticate(None)
            .expect("open")
            .tenant(),
        ""
    );
}

#[test]
fn the_file_is_checked_and_errors_name_the_key_and_field() {
    let digest = hex(&Sha256::digest(b"x"));
    for (text, expected) in [
        (
            format!("[[keys]]\nid = \"a b\"\nsha256 = \"{digest}\""),
            "`id`",
        ),
        (
            "[[keys]]\nid = \"a\"\nsha256 = \"12\"".to_string(),
            "`sha256`",
        ),
        (
            format!("[[keys]]\nid = \"a\"\nsha256 = \"{digest}\"\nrequests_per_minute = 0"),
            "requests_per_minute",
        ),
        (
            format!(
                "[[keys]]\nid = \"a\"\nsha256 = \"{digest}\"\n[[keys]]\nid = \"a\"\nsha256 = \"{}\"",
                "0".repeat(64)
            ),
            "used twice",
        ),
        (
            format!("[[keys]]\nid = \"a\"\nsha256 = \"{digest}\"\nsecret = \"x\""),
            "secret",
        ),
    ] {
        let err = KeySet::parse(&text).expect_err(expected);
        assert!(err.contains(expected), "{expected}: {err}");
    }
}

#[test]
fn request_and_concurrency_quotas_refuse_with_a_retry_time() {
    let auth = authenticator(&file_with(&[(
        "q",
        "s",
        "requests_per_minute = 2\nmax_concurrent_requests = 1",
    )]));
    let caller = auth.authenticate(Some(b"Bearer s")).expect("q");
    let first = caller.admit().expect("first");
    match caller.admit().expect_err("one at a time") {
        RequestError::QuotaExceeded { quota, .. } => {
            assert_eq!(quota, "max_concurrent_requests")
        }
        other => panic!("{other:?}"),
    }
    drop(first);
    let second = caller.admit().expect("second");
    drop(second);
    match caller.admit().expect_err("two per minute") {
        RequestError::QuotaExceeded {
            quota, retry_after, ..
        } => {
            assert_eq!(quota, "requests_per_minute");
            // One request refills in 30 s at 2 per minute.
            assert!(
                retry_after > Duration::from_secs(25) && retry_after <= Duration::from_secs(30),
                "{retry_after:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The quota state is the key's, not the caller value's.
    let again = auth.authenticate(Some(b"Bearer s")).expect("q");
    assert!(again.admit().is_err());
}

#[test]
fn a_token_quota_admits_while_positive_and_charges_what_was_used() {
    let auth = authenticator(&file_with(&[("t", "s", "tokens_per_minute = 100")]));
    let caller = auth.authenticate(Some(b"Bearer s")).expect("t");
    let permit = caller.admit().expect("full bucket");
    permit.charge(150);
    match caller.admit().expect_err("overdrawn") {
        RequestError::QuotaExceeded {
            quota, retry_after, ..
        } => {
            assert_eq!(quota, "tokens_per_minute");
            // 50 tokens below zero refill in 30 s at 100 per minute.
            assert!(
                retry_after > Duration::from_secs(25) && retry_after <= Duration::from_secs(31),
                "{retry_after:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn new_keys_authenticate_through_their_entry() {
    let (secret, entry) = new_key("svc-1").expect("key");
    assert!(secret.starts_with("ksk_") && secret.len() == 68, "{secret}");
    let auth = authenticator(&entry);
    let header = format!("Bearer {secret}");
    assert_eq!(
        auth.authenticate(Some(header.as_bytes()))
            .expect("new key")
            .tenant(),
        "svc-1"
    );
    assert!(new_key("no spaces").is_err());
}
