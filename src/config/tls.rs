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

impl TlsConfig {
    /// What clients would refuse of the certificates as of `now` (expired, not yet valid, or
    /// not covering a name they are served for) or will soon, by the key of their file: said
    /// by `check`, at start and at each reload, as they still serve.
    pub fn warnings(&self, now: std::time::SystemTime) -> Vec<(String, String)> {
        let now = (crate::clock::unix_ms(now) / 1000) as i64;
        let mut warnings = Vec::new();
        for certificate in &self.certificates {
            for problem in certificate
                .leaf
                .iter()
                .flat_map(|leaf| leaf.problems(&certificate.names, now))
            {
                warnings.push((format!("{}.cert", certificate.config_key), problem));
            }
        }
        warnings
    }
}

pub(super) fn validate_tls(p: &mut Problems, raw: &RawTls) -> TlsConfig {
    let mut files: Vec<(String, &str, &str, &[String])> = Vec::new();
    match (&raw.cert, &raw.key) {
        (Some(cert), Some(key)) => files.push(("tls".into(), cert, key, &[])),
        (None, None) => {}
        _ => p.push("tls", "cert and key must be set together"),
    }
    // The first certificate serves clients no name matches; any other serves only its names,
    // and a name an earlier one has already takes no client to it.
    let mut named: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, c) in raw.certificates.iter().enumerate() {
        let key = format!("tls.certificates[{i}]");
        if c.names.is_empty() && (i > 0 || !files.is_empty()) {
            p.push(
                format!("{key}.names"),
                "is empty: only the first certificate is served without a matching name",
            );
        }
        for name in &c.names {
            // As nginx's `server_name`: a name no client could send is refused, not kept
            // to match nothing.
            let problem = if name.parse::<std::net::IpAddr>().is_ok() {
                Some("is an IP address, which clients never send as a server name (SNI)")
            } else {
                super::raw::host_problem(&name.to_ascii_lowercase())
            };
            if let Some(problem) = problem {
                p.push(format!("{key}.names"), format!("`{name}` {problem}"));
            }
            if let Some(first) = named.insert(name.to_ascii_lowercase(), i) {
                p.push(
                    format!("{key}.names"),
                    format!("`{name}` is already a name of tls.certificates[{first}]"),
                );
            }
        }
        files.push((key, &c.cert, &c.key, &c.names));
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
                    leaf: crate::tls::LeafFacts::of(&certified.cert),
                    key: certified,
                    config_key: key,
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
    use crate::config::Config;

    /// A certificate no client could be given is refused: one without names after the first,
    /// or a name an earlier one has.
    #[test]
    fn every_certificate_but_the_first_needs_names_of_its_own() {
        let entry = |names: &str| {
            format!("[[tls.certificates]]\ncert = \"/none/c.pem\"\nkey = \"/none/k.pem\"\nnames = [{names}]\n")
        };
        let config = |entries: &[String]| {
            format!(
                "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\nupstream = \"app\"\n\
                 [tls]\nlisten = \"127.0.0.1:0\"\n{}",
                entries.concat()
            )
        };
        // The keys of the `names` problems.
        let refused_names = |text: &str| -> Vec<String> {
            let errors = Config::from_toml(text).unwrap_err().0;
            let keys = errors.iter().map(|e| e.key.clone());
            keys.filter(|key| key.ends_with(".names")).collect()
        };
        let text = config(&[
            entry(""),
            entry("\"a.test\""),
            entry("\"b.test\", \"A.test\""),
        ]);
        assert_eq!(refused_names(&text), ["tls.certificates[2].names"]);
        let text = text.replacen("names = []", "names = [\"c.test\"]", 1);
        let text = text.replacen("names = [\"a.test\"]", "names = []", 1);
        let errors = Config::from_toml(&text).unwrap_err().0;
        assert!(
            errors.iter().any(|e| e.key == "tls.certificates[1].names"),
            "{errors:?}"
        );
        // Nor is a name no client sends: each of these is refused, alone.
        for name in [
            "*",
            "a.*.test",
            "https://b.test",
            "",
            "foo bar",
            "a.test.",
            "10.0.0.1",
        ] {
            let text = config(&[entry(""), entry(&format!("\"*.fine.test\", \"{name}\""))]);
            assert_eq!(
                refused_names(&text),
                ["tls.certificates[1].names"],
                "{name}"
            );
        }
        let text = config(&[entry(""), entry("\"https://b.test\"")]);
        let errors = Config::from_toml(&text).unwrap_err().0;
        let said = errors
            .iter()
            .any(|e| e.message.ends_with("names a scheme: give the host alone"));
        assert!(said, "{errors:?}");
    }

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
