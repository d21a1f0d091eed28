//! Who may connect, and to what.

use herald::config::Algorithm;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use crate::helpers::{claims_token, now, spawn_node, spawn_node_with, token};

/// A key pair made for this run with `openssl` (PEM: PKCS#8 private key,
/// SPKI public key): no key written in the repository verifies a token.
struct KeyPair {
    private: String,
    public: String,
}

fn key_pair(algorithm: &[&str]) -> KeyPair {
    let dir = crate::helpers::temp_dir("keys");
    let private = dir.join("private.pem");
    let made = std::process::Command::new("openssl")
        .args(["genpkey", "-out"])
        .arg(&private)
        .args(algorithm)
        .output()
        .expect("openssl makes the test's key pairs (apt-get install openssl)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let public = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .output()
        .unwrap();
    assert!(public.status.success());
    let pair = KeyPair {
        private: std::fs::read_to_string(&private).unwrap(),
        public: String::from_utf8(public.stdout).unwrap(),
    };
    let _ = std::fs::remove_dir_all(dir);
    pair
}

fn rsa() -> &'static KeyPair {
    static PAIR: std::sync::OnceLock<KeyPair> = std::sync::OnceLock::new();
    PAIR.get_or_init(|| key_pair(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]))
}

fn ec() -> &'static KeyPair {
    static PAIR: std::sync::OnceLock<KeyPair> = std::sync::OnceLock::new();
    PAIR.get_or_init(|| key_pair(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]))
}

fn b64(v: &Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn handshake_accepts_the_token_in_the_query_or_the_authorization_header() {
    let node = spawn_node().await;
    let t = token("alice", &["alerts"], &[]);
    node.connect(&t).await.subscribe("alerts").await;
    node.handshake("")
        .bearer(&t)
        .open()
        .await
        .subscribe("alerts")
        .await;
}

#[tokio::test]
async fn handshake_without_token_is_401_with_a_json_error() {
    let node = spawn_node().await;
    let (status, body) = node.handshake("").try_open().await.err().unwrap();
    assert_eq!(status, 401);
    assert_eq!(body["error"], "unauthorized");
    assert!(body["message"].as_str().unwrap().contains("missing token"));
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_a_reason() {
    let node = spawn_node().await;
    let good = json!({"sub": "a", "exp": now() + 60, "topics": [">"]});
    let header = b64(&json!({"alg": "HS256", "typ": "JWT"}));
    let signed_with = |secret: &str, claims: &Value| {
        jsonwebtoken::encode(
            &Header::default(),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong signature",
            signed_with(&crate::helpers::random_secret(), &good),
            "signature",
        ),
        (
            "expired",
            claims_token(json!({"sub": "a", "exp": now() - 120})),
            "expired",
        ),
        (
            "not yet valid",
            claims_token(json!({"sub": "a", "exp": now() + 600, "nbf": now() + 300})),
            "not valid yet",
        ),
        ("missing exp", claims_token(json!({"sub": "a"})), "exp"),
        (
            "missing sub",
            claims_token(json!({"exp": now() + 60})),
            "sub",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&good)
            ),
            "",
        ),
        (
            "malformed base64",
            format!("{header}.{}.%%%", b64(&good)),
            "malformed",
        ),
        (
            "empty sub",
            claims_token(json!({"sub": "", "exp": now() + 60})),
            "sub",
        ),
        ("not a jwt", "hello".into(), "malformed"),
        (
            "invalid grant pattern",
            claims_token(json!({"sub": "a", "exp": now() + 60, "topics": ["a..b"]})),
            "a..b",
        ),
    ];
    for (case, bad, expected) in cases {
        let (status, body) = node
            .handshake(&format!("?token={bad}"))
            .try_open()
            .await
            .err()
            .unwrap_or_else(|| panic!("{case}: handshake should be refused"));
        assert_eq!(status, 401, "{case}");
        assert_eq!(body["error"], "unauthorized", "{case}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(expected), "{case}: {message}");
        assert!(!message.contains(&bad), "{case}: the token is echoed");
    }
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let node = spawn_node_with(|s| {
        s.auth.issuer = Some("https://auth.example".into());
        s.auth.audience = Some("herald".into());
    })
    .await;
    let claims = |iss: &str, aud: &str| {
        claims_token(
            json!({"sub": "a", "exp": now() + 60, "iss": iss, "aud": aud, "topics": [">"]}),
        )
    };
    node.connect(&claims("https://auth.example", "herald"))
        .await;
    for (bad, why) in [
        (claims("https://evil.example", "herald"), "issuer"),
        (claims("https://auth.example", "other"), "audience"),
    ] {
        let (status, body) = node
            .handshake(&format!("?token={bad}"))
            .try_open()
            .await
            .err()
            .unwrap();
        assert_eq!(status, 401);
        assert!(body["message"].as_str().unwrap().contains(why), "{body}");
    }
}

#[tokio::test]
async fn rs256_node_verifies_rsa_tokens_and_refuses_algorithm_confusion() {
    let node = spawn_node_with(|s| {
        s.auth.algorithm = Algorithm::RS256;
        s.auth.jwt_secret = None;
        s.auth.public_key_pem = Some(rsa().public.clone());
    })
    .await;
    let claims = json!({"sub": "a", "exp": now() + 60, "topics": ["alerts"]});
    let signed = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(rsa().private.as_bytes()).unwrap(),
    )
    .unwrap();
    node.connect(&signed).await.subscribe("alerts").await;

    // HS256 "signed" with the public key as the HMAC secret: the classic
    // confusion attack. It must not verify.
    let confused = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(rsa().public.as_bytes()),
    )
    .unwrap();
    let (status, _) = node
        .handshake(&format!("?token={confused}"))
        .try_open()
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn es256_node_verifies_ec_tokens() {
    let node = spawn_node_with(|s| {
        s.auth.algorithm = Algorithm::ES256;
        s.auth.jwt_secret = None;
        s.auth.public_key_pem = Some(ec().public.clone());
    })
    .await;
    let signed = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::ES256),
        &json!({"sub": "a", "exp": now() + 60, "topics": ["alerts"]}),
        &EncodingKey::from_ec_pem(ec().private.as_bytes()).unwrap(),
    )
    .unwrap();
    node.connect(&signed).await.subscribe("alerts").await;
    let hs = token("a", &["alerts"], &[]);
    let (status, _) = node
        .handshake(&format!("?token={hs}"))
        .try_open()
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn origins_outside_allowed_origins_get_403() {
    let node = spawn_node_with(|s| {
        s.server.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let t = token("a", &["alerts"], &[]);
    let q = format!("?token={t}");
    node.handshake(&q)
        .header("origin", "https://app.example")
        .open()
        .await;
    // Non-browser clients send no Origin and are let in.
    node.handshake(&q).open().await;
    let (status, body) = node
        .handshake(&q)
        .header("origin", "https://evil.example")
        .try_open()
        .await
        .err()
        .unwrap();
    assert_eq!(status, 403);
    assert_eq!(body["error"], "forbidden");
}

#[tokio::test]
async fn sub_placeholder_grants_only_the_subjects_own_topics() {
    let node = spawn_node().await;
    let mut ws = node.connect(&token("alice", &["user.{sub}.>"], &[])).await;
    ws.subscribe("user.alice.inbox").await;
    let reply = ws
        .request(json!({"op": "subscribe", "id": 2, "topic": "user.bob.inbox"}))
        .await;
    assert_eq!(reply["op"], "error");
    assert_eq!(reply["id"], 2);
    assert_eq!(reply["code"], "forbidden");
}

#[tokio::test]
async fn a_sub_outside_the_topic_alphabet_voids_sub_grants_and_the_refusal_says_why() {
    let node = spawn_node().await;
    let mut ws = node
        .connect(&token("alice@example.com", &["user.{sub}", "news"], &[]))
        .await;
    ws.subscribe("news").await;
    let reply = ws
        .request(json!({"op": "subscribe", "id": 3, "topic": "user.alice"}))
        .await;
    assert_eq!(reply["code"], "forbidden");
    assert!(
        reply["message"].as_str().unwrap().contains("{sub}"),
        "{reply}"
    );
}

#[tokio::test]
async fn a_configured_issuer_or_audience_is_required_on_every_path() {
    let node = spawn_node_with(|s| {
        s.auth.issuer = Some("https://auth.example".into());
        s.auth.audience = Some("herald".into());
    })
    .await;
    let base =
        || json!({"sub": "a", "exp": now() + 60, "topics": [">"], "publish": [">"], "admin": true});
    let with = |changes: Value| {
        let mut claims = base();
        for (key, value) in changes.as_object().unwrap() {
            claims[key] = value.clone();
        }
        claims_token(claims)
    };
    let cases = [
        (with(json!({"iss": "https://auth.example"})), "aud"),
        (
            with(json!({"iss": "https://auth.example", "aud": null})),
            "aud",
        ),
        (with(json!({"aud": "herald"})), "iss"),
        (with(json!({"aud": "herald", "iss": null})), "iss"),
        (claims_token(base()), "aud|iss"),
    ];
    for (bad, missing) in cases {
        let says = |message: &str| {
            missing
                .split('|')
                .any(|claim| message.contains(&format!("`{claim}`")))
        };
        // The handshake.
        let (status, body) = node.refused(&bad).await;
        assert_eq!(status, 401, "{body}");
        assert!(says(body["message"].as_str().unwrap()), "{missing}: {body}");
        // Publish, introspection and a stream.
        let published = node.publish(&bad, "t", &json!(1)).await;
        assert_eq!(published.status(), 401, "{missing}: publish");
        let node_info = node
            .http
            .get(node.url("/api/v1/node"))
            .bearer_auth(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(node_info.status(), 401, "{missing}: introspection");
        let stream = node
            .http
            .get(node.url(&format!("/api/v1/stream?topic=t&token={bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), 401, "{missing}: stream");
    }
    // `refresh` on an open connection.
    let good = with(json!({"iss": "https://auth.example", "aud": "herald"}));
    let mut ws = node.connect(&good).await;
    let no_aud = with(json!({"iss": "https://auth.example"}));
    let reply = ws
        .request(json!({"op": "refresh", "id": 1, "token": no_aud}))
        .await;
    assert_eq!(reply["code"], "unauthorized", "{reply}");
}

#[tokio::test]
async fn a_token_with_a_crit_header_is_refused() {
    let node = spawn_node().await;
    let claims = json!({"sub": "a", "exp": now() + 60, "topics": [">"]});
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.crit = Some(vec!["exp-ext".into()]);
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(crate::helpers::secret().as_bytes()),
    )
    .unwrap();
    let (status, body) = node.refused(&token).await;
    assert_eq!(status, 401);
    assert!(body["message"].as_str().unwrap().contains("crit"), "{body}");
}

#[tokio::test]
async fn a_route_that_takes_no_query_token_does_not_suggest_one() {
    let node = spawn_node().await;
    for path in [
        "/api/v1/node",
        "/api/v1/topics/t/events",
        "/api/v1/topics/t/presence",
    ] {
        let body: Value = node
            .http
            .get(node.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("Authorization: Bearer"),
            "{path}: {message}"
        );
        assert!(!message.contains("query"), "{path}: {message}");
    }
    // Where a query token is taken, the message says so.
    let (_, body) = node.handshake("").try_open().await.err().unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("`token` query"),
        "{body}"
    );
}
