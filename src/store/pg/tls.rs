//! TLS for store connections, with libpq's `sslmode` / `sslrootcert` semantics (rustls, ring).
//!
//! - `sslmode=disable`: plain connections.
//! - `prefer` (the default, as in libpq): TLS when the server offers it, else plain; the
//!   certificate is not verified.
//! - `require`: TLS or fail; not verified, unless `sslrootcert` is given: then the chain is
//!   verified as with `verify-ca` (as libpq does).
//! - `verify-ca`: the chain must lead to a root in `sslrootcert`; the host name is not checked.
//! - `verify-full`: `verify-ca` plus the host name (or IP address) must match the certificate.
//! - `sslrootcert=PATH` (PEM, one or more CA certificates), `sslrootcert=system` (the Mozilla
//!   roots of `webpki-roots`; as in libpq it makes `verify-full` the default and weaker modes an
//!   error), absent: `~/.postgresql/root.crt` for the `verify-*` modes.
//!
//! Not supported (a clear error): `sslmode=allow`, client certificates (`sslcert`, `sslkey`).

use anyhow::{Result, anyhow, bail};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values that deeprank supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the trusted roots come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// `sslrootcert=system`: the Mozilla roots (`webpki-roots`).
    System,
    /// `sslrootcert=PATH`: a PEM file of one or more CA certificates.
    File(PathBuf),
}

/// A store URL's TLS settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub mode: SslMode,
    /// `sslrootcert` as given (`None`: absent).
    pub root: Option<RootCert>,
    /// Whether `sslmode` was given (the default is `prefer`, or `verify-full` with `system`).
    mode_given: bool,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            mode: SslMode::Prefer,
            root: None,
            mode_given: false,
        }
    }
}

/// `%XX` escapes of a URL query value decoded (as the driver does for its own parameters).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(x) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(x);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Tls {
    /// Takes a URL query parameter if it is a TLS one (`true`: consumed, leave it out of the
    /// driver's string). `shown` is the URL without its password, for messages.
    pub fn take_param(&mut self, key: &str, value: &str, shown: &str) -> Result<bool> {
        match key {
            "sslmode" => {
                if self.mode_given {
                    bail!("store URL {shown}: sslmode given twice");
                }
                self.mode = match percent_decode(value).as_str() {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    "allow" => bail!(
                        "store URL {shown}: sslmode=allow is not supported (it tries a plain connection first); \
                         use sslmode=prefer, or sslmode=disable for plain connections"
                    ),
                    other => bail!(
                        "store URL {shown}: unknown sslmode={other:?}; use disable, prefer, require, verify-ca or verify-full"
                    ),
                };
                self.mode_given = true;
                Ok(true)
            }
            "sslrootcert" => {
                if self.root.is_some() {
                    bail!("store URL {shown}: sslrootcert given twice");
                }
                let v = percent_decode(value);
                if v.is_empty() {
                    bail!(
                        "store URL {shown}: sslrootcert is empty; give sslrootcert=PATH (a PEM file of CA certificates) or sslrootcert=system"
                    );
                }
                self.root = Some(if v == "system" {
                    RootCert::System
                } else {
                    RootCert::File(PathBuf::from(v))
                });
                Ok(true)
            }
            "sslcert" | "sslkey" | "sslpassword" | "sslcertmode" => bail!(
                "store URL {shown}: client certificates ({key}) are not supported; \
                 authenticate with a password (postgres://user:password@host/db) instead"
            ),
            _ => Ok(false),
        }
    }

    /// Checks the combination once all parameters are read (libpq's rules for `system`).
    pub fn finish(&mut self, shown: &str) -> Result<()> {
        if self.root == Some(RootCert::System) {
            if !self.mode_given {
                self.mode = SslMode::VerifyFull;
            } else if self.mode != SslMode::VerifyFull {
                bail!(
                    "store URL {shown}: sslmode={} may not be used with sslrootcert=system (public CAs \
                     sign any host's certificate); use sslmode=verify-full",
                    self.mode.name()
                );
            }
        }
        Ok(())
    }

    /// Whether the server's certificate chain is checked.
    pub fn verifies(&self) -> bool {
        match self.mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require => self.root.is_some(),
            SslMode::Disable | SslMode::Prefer => false,
        }
    }

    /// The URL query parameters that give these settings back (for a rebuilt shard URL).
    pub fn params(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if self.mode_given {
            v.push(("sslmode", self.mode.name().to_string()));
        }
        match &self.root {
            Some(RootCert::System) => v.push(("sslrootcert", "system".into())),
            Some(RootCert::File(p)) => v.push(("sslrootcert", p.display().to_string())),
            None => {}
        }
        v
    }

    /// Where the roots come from, for messages.
    fn roots_shown(&self) -> String {
        match &self.root {
            Some(RootCert::System) => "the system roots (sslrootcert=system)".into(),
            Some(RootCert::File(p)) => format!("sslrootcert={}", p.display()),
            None => match default_root() {
                Some(p) => format!("{} (the default sslrootcert)", p.display()),
                None => "the default sslrootcert".into(),
            },
        }
    }

    /// The rustls connector for `mode` other than `disable`.
    pub fn connector(&self, shown: &str) -> Result<MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = if self.verifies() {
            let roots = Arc::new(self.roots(shown)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| anyhow!("store URL {shown}: cannot use the CA certificates: {e}"))?;
            if self.mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        } else {
            Arc::new(NoVerify(provider.clone()))
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("store URL {shown}: TLS set-up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    /// The trusted roots: `sslrootcert`, or libpq's default file.
    fn roots(&self, shown: &str) -> Result<RootCertStore> {
        let path = match &self.root {
            Some(RootCert::System) => {
                return Ok(RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                });
            }
            Some(RootCert::File(p)) => p.clone(),
            None => match default_root().filter(|p| p.is_file()) {
                Some(p) => p,
                None => bail!(
                    "store URL {shown}: sslmode={} needs the CA certificates to trust, and {} does not exist; \
                     give sslrootcert=PATH (a PEM file of the server's CA) or sslrootcert=system (public CAs)",
                    self.mode.name(),
                    default_root()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "~/.postgresql/root.crt ($HOME is not set)".into())
                ),
            },
        };
        load_roots(&path, shown)
    }
}

/// libpq's default root file, `~/.postgresql/root.crt`.
fn default_root() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(Path::new(&home).join(".postgresql/root.crt"))
}

/// The CA certificates of a PEM file.
fn load_roots(path: &Path, shown: &str) -> Result<RootCertStore> {
    let what = |e: &dyn std::fmt::Display| {
        anyhow!(
            "store URL {shown}: cannot read sslrootcert {}: {e}; give a PEM file of CA certificates",
            path.display()
        )
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| what(&e))? {
        let cert = cert.map_err(|e| what(&e))?;
        roots.add(cert).map_err(|e| what(&e))?;
    }
    if roots.is_empty() {
        return Err(what(&"no CERTIFICATE in it"));
    }
    Ok(roots)
}

/// Why a TLS connection failed, in words, when `e` is a TLS failure (else `None`).
pub fn explain(e: &postgres::Error, tls: &Tls) -> Option<String> {
    // tokio-postgres: "error performing TLS handshake", the reason in its source.
    let mut chain = std::iter::successors(Some(e as &dyn std::error::Error), |s| s.source());
    if chain.any(|s| s.to_string().contains("server does not support TLS")) {
        return Some(format!(
            "the server does not support TLS (sslmode={}); use sslmode=prefer or sslmode=disable \
             for a plain connection",
            tls.mode.name()
        ));
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let rustls_err = s.downcast_ref::<rustls::Error>().or_else(|| {
            s.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|i| i.downcast_ref::<rustls::Error>())
        });
        if let Some(r) = rustls_err {
            return Some(match r {
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                ) => format!(
                    "certificate not trusted: the server's certificate does not lead to a CA in {} \
                     (sslmode={}); give sslrootcert=PATH of the server's CA certificate, or \
                     sslrootcert=system for a public CA",
                    tls.roots_shown(),
                    tls.mode.name()
                ),
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                ) => format!(
                    "certificate does not match the host name (sslmode=verify-full): {r}; connect by \
                     the name the certificate is for, or use sslmode=verify-ca"
                ),
                rustls::Error::InvalidCertificate(c) => {
                    format!("certificate rejected (sslmode={}): {c:?}", tls.mode.name())
                }
                other => format!(
                    "TLS handshake failed (sslmode={}): {other}",
                    tls.mode.name()
                ),
            });
        }
        src = s.source();
    }
    None
}

/// `require`/`prefer` without roots: any certificate, but the handshake's signatures are checked
/// (the connection is encrypted to whoever holds the certificate's key).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: webpki's verification with the host-name check alone waived (webpki checks the
/// chain first, so a name error means the chain was good).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &[(&str, &str)]) -> Result<Tls> {
        let mut t = Tls::default();
        for (k, v) in q {
            t.take_param(k, v, "postgres://u:***@h/db")?;
        }
        t.finish("postgres://u:***@h/db")?;
        Ok(t)
    }

    #[test]
    fn modes_and_roots() {
        let t = parse(&[]).unwrap();
        assert_eq!(
            (t.mode, t.root.clone(), t.verifies()),
            (SslMode::Prefer, None, false)
        );
        assert!(t.params().is_empty());
        let t = parse(&[("sslmode", "require")]).unwrap();
        assert!(!t.verifies());
        let t = parse(&[("sslmode", "require"), ("sslrootcert", "/x/ca.pem")]).unwrap();
        assert!(t.verifies(), "require with a root file verifies the chain");
        assert_eq!(
            t.params(),
            vec![
                ("sslmode", "require".to_string()),
                ("sslrootcert", "/x/ca.pem".to_string())
            ]
        );
        let t = parse(&[("sslrootcert", "/a%20b/ca.pem"), ("sslmode", "verify-ca")]).unwrap();
        assert_eq!(t.root, Some(RootCert::File("/a b/ca.pem".into())));
        assert_eq!(t.mode, SslMode::VerifyCa);
        // libpq: sslrootcert=system makes verify-full the default and weaker modes an error.
        let t = parse(&[("sslrootcert", "system")]).unwrap();
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert!(parse(&[("sslrootcert", "system"), ("sslmode", "require")]).is_err());
        assert_eq!(
            parse(&[("sslmode", "disable")]).unwrap().mode,
            SslMode::Disable
        );
    }

    #[test]
    fn unsupported_settings_are_refused_naming_the_url() {
        for (q, says) in [
            (vec![("sslmode", "allow")], "sslmode=prefer"),
            (vec![("sslmode", "verify_full")], "unknown sslmode"),
            (vec![("sslcert", "/c.pem")], "client certificates"),
            (vec![("sslkey", "/k.pem")], "client certificates"),
            (vec![("sslrootcert", "")], "sslrootcert=system"),
            (
                vec![("sslmode", "require"), ("sslmode", "disable")],
                "twice",
            ),
        ] {
            let e = format!("{:#}", parse(&q).unwrap_err());
            assert!(e.contains("postgres://u:***@h/db"), "{e}");
            assert!(e.contains(says), "{q:?}: {e}");
        }
    }

    #[test]
    fn root_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let t = parse(&[
            ("sslmode", "verify-full"),
            ("sslrootcert", empty.to_str().unwrap()),
        ])
        .unwrap();
        let e = format!("{:#}", t.connector("URL").err().unwrap());
        assert!(
            e.contains("empty.pem") && e.contains("no CERTIFICATE"),
            "{e}"
        );
        let missing = dir.path().join("missing.pem");
        let t = parse(&[
            ("sslmode", "verify-ca"),
            ("sslrootcert", missing.to_str().unwrap()),
        ])
        .unwrap();
        let e = format!("{:#}", t.connector("URL").err().unwrap());
        assert!(e.contains("missing.pem"), "{e}");
        // No verification needs no roots.
        assert!(
            parse(&[("sslmode", "require")])
                .unwrap()
                .connector("URL")
                .is_ok()
        );
        assert!(
            parse(&[("sslrootcert", "system")])
                .unwrap()
                .connector("URL")
                .is_ok()
        );
    }
}
