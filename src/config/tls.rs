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
        if !is_hsts(value) {
            p.push(
                "tls.hsts",
                "expected max-age=SECONDS, then includeSubDomains or preload if wanted (RFC 6797)",
            );
            return None;
        }
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

/// Whether `value` is a Strict-Transport-Security value a browser takes: one `max-age` with a
/// number of seconds (quoted or not), and `includeSubDomains` or `preload` at most once each.
/// Browsers ignore a field without max-age, so a typo would turn HSTS off unnoticed.
fn is_hsts(value: &str) -> bool {
    let mut seen = [0u8; 3];
    for directive in value.split(';').map(str::trim).filter(|d| !d.is_empty()) {
        let (name, argument) = directive
            .split_once('=')
            .map_or((directive, None), |(n, a)| (n.trim(), Some(a.trim())));
        let slot = match (name.to_ascii_lowercase().as_str(), argument) {
            ("max-age", Some(seconds)) => {
                let seconds = seconds.trim_matches('"');
                if seconds.is_empty() || !seconds.bytes().all(|b| b.is_ascii_digit()) {
                    return false;
                }
                0
            }
            ("includesubdomains", None) => 1,
            ("preload", None) => 2,
            _ => return false,
        };
        seen[slot] += 1;
    }
    seen[0] == 1 && seen[1] <= 1 && seen[2] <= 1
}

#[cfg(test)]
mod tests {
    use super::is_hsts;

    #[test]
    fn hsts_values_need_one_max_age() {
        for good in [
            "max-age=31536000",
            "max-age=0",
            "max-age=\"600\"; includeSubDomains",
            "Max-Age=63072000; includeSubDomains; preload",
        ] {
            assert!(is_hsts(good), "{good}");
        }
        for bad in [
            "bogus value",
            "",
            "includeSubDomains",
            "max-age=abc",
            "max-age=1; max-age=2",
            "max-age=1; preload; preload",
            "max-age",
        ] {
            assert!(!is_hsts(bad), "{bad}");
        }
    }
}
