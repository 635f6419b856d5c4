//! The `[tls]` table: where to listen for HTTPS and which certificates to serve.

use std::net::SocketAddr;
use std::path::Path;

use http::HeaderValue;
use serde::Deserialize;

use super::Problems;
use crate::tls::{load_certificate, TlsCertificate};

#[derive(Debug, Deserialize)]
pub struct RawTls {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Shorthand for one certificate.
    pub cert: Option<String>,
    pub key: Option<String>,
    #[serde(default)]
    pub certificates: Vec<RawCertificate>,
    #[serde(default)]
    pub redirect_http: bool,
    pub hsts: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawCertificate {
    pub cert: String,
    pub key: String,
    #[serde(default)]
    pub names: Vec<String>,
}

fn default_listen() -> String {
    "127.0.0.1:8443".into()
}

/// HTTPS termination, validated: certificates are loaded and checked here.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub certificates: Vec<TlsCertificate>,
    /// Answer plain-HTTP requests with a 308 to the same URL on HTTPS.
    pub redirect_http: bool,
    /// `Strict-Transport-Security` value added to HTTPS responses.
    pub hsts: Option<HeaderValue>,
}

pub(super) fn validate_tls(p: &mut Problems, raw: &RawTls) -> TlsConfig {
    let mut files: Vec<(String, &str, &str, &[String])> = Vec::new();
    match (&raw.cert, &raw.key) {
        (Some(cert), Some(key)) => files.push(("tls".into(), cert, key, &[])),
        (None, None) => {}
        _ => p.push("tls", "cert and key must be set together"),
    }
    for (i, c) in raw.certificates.iter().enumerate() {
        files.push((format!("tls.certificates[{i}]"), &c.cert, &c.key, &c.names));
    }
    if files.is_empty() {
        p.push(
            "tls",
            "needs a certificate: cert and key, or [[tls.certificates]]",
        );
    }
    let certificates = files
        .into_iter()
        .filter_map(|(key, cert, private, names)| {
            match load_certificate(Path::new(cert), Path::new(private)) {
                Ok(certified) => Some(TlsCertificate {
                    names: names.to_vec(),
                    key: certified,
                }),
                Err(problems) => {
                    for (key, err) in problems.keyed(format!("{key}.cert"), format!("{key}.key")) {
                        p.push(key, err);
                    }
                    None
                }
            }
        })
        .collect();
    let hsts = raw.hsts.as_deref().and_then(|value| {
        HeaderValue::from_str(value)
            .map_err(|_| p.push("tls.hsts", "not a valid header value"))
            .ok()
    });
    TlsConfig {
        listen: p.addr("tls.listen", &raw.listen),
        certificates,
        redirect_http: raw.redirect_http,
        hsts,
    }
}
