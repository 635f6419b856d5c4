//! How an upstream's instances are spoken to: `protocol` (http1, h2, h2c) and the `tls` table
//! (CA, client certificate, verification name). Files are read here, so `scalegate check` and a
//! reload name a bad one; the result is a ready rustls client config.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;

use super::Problems;
use crate::tls::client::{client_config, Verify};
use crate::tls::{load_certificate, load_certificates};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawUpstreamTls {
    /// PEM file of the CA(s) instance certificates must chain to; default the system roots.
    pub ca: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    /// Name sent as SNI and checked against the certificate; default the instance's IP.
    pub server_name: Option<String>,
    pub insecure_skip_verify: bool,
}

/// The wire protocol to the instances of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 on pooled connections, over TLS when `tls` is set.
    #[default]
    Http1,
    /// HTTP/2 over TLS (ALPN h2), one multiplexed connection per instance.
    H2,
    /// HTTP/2 over plain TCP with prior knowledge.
    H2c,
}

impl UpstreamProtocol {
    pub fn is_http2(self) -> bool {
        self != UpstreamProtocol::Http1
    }
}

/// TLS to the instances of an upstream, validated.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub client: Arc<rustls::ClientConfig>,
    /// SNI and verification name; `None` = each instance's IP address.
    pub server_name: Option<ServerName<'static>>,
    /// What the client config was built from, so a reload keeps pooled connections only when
    /// it and `server_name` are unchanged (files included).
    pub source: TlsSource,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsSource {
    ca: Option<Vec<CertificateDer<'static>>>,
    client_chain: Option<Vec<CertificateDer<'static>>>,
    insecure: bool,
}

/// Validates `protocol`, the `tls` table and `https://` on instances (`any_https`, `all_https`).
pub(super) fn validate(
    p: &mut Problems,
    key: &str,
    protocol: &str,
    raw: Option<&RawUpstreamTls>,
    any_https: bool,
    all_https: bool,
) -> (UpstreamProtocol, Option<UpstreamTls>) {
    let protocol = match protocol {
        "http1" => UpstreamProtocol::Http1,
        "h2" => UpstreamProtocol::H2,
        "h2c" => UpstreamProtocol::H2c,
        other => {
            p.push(
                format!("{key}.protocol"),
                format!("`{other}`: expected http1, h2 or h2c"),
            );
            UpstreamProtocol::Http1
        }
    };
    if any_https && !all_https {
        p.push(
            format!("{key}.instances"),
            "either every instance is https:// or none is (TLS is set per upstream)",
        );
    }
    let wants_tls = raw.is_some() || any_https || protocol == UpstreamProtocol::H2;
    if protocol == UpstreamProtocol::H2c && wants_tls {
        p.push(
            format!("{key}.protocol"),
            "h2c is HTTP/2 without TLS: use h2 for HTTP/2 over TLS, or drop the tls table and https://",
        );
        return (protocol, None);
    }
    if !wants_tls {
        return (protocol, None);
    }
    let default = RawUpstreamTls::default();
    let raw = raw.unwrap_or(&default);
    let tkey = format!("{key}.tls");
    if raw.insecure_skip_verify && raw.ca.is_some() {
        // Taken together, the CA went unused without a word: the operator meant one of them.
        p.push(
            format!("{tkey}.ca"),
            "has no effect with insecure_skip_verify = true (nothing is verified): set only one of them",
        );
    }
    let ca = match &raw.ca {
        Some(path) => match load_certificates(Path::new(path)) {
            Ok(certs) => Some(certs),
            Err(err) => {
                p.push(format!("{tkey}.ca"), err);
                return (protocol, None);
            }
        },
        None => None,
    };
    let verify = match &ca {
        _ if raw.insecure_skip_verify => Verify::Skip,
        Some(certs) => Verify::Ca(certs.clone()),
        None => Verify::System,
    };
    let identity = match (&raw.client_cert, &raw.client_key) {
        (Some(cert), Some(private)) => {
            match load_certificate(Path::new(cert), Path::new(private)) {
                Ok(identity) => Some(identity),
                Err(problems) => {
                    let (cert, key) = (format!("{tkey}.client_cert"), format!("{tkey}.client_key"));
                    for (key, err) in problems.keyed(cert, key) {
                        p.push(key, err);
                    }
                    return (protocol, None);
                }
            }
        }
        (None, None) => None,
        _ => {
            p.push(
                format!("{tkey}.client_cert"),
                "client_cert and client_key must be set together",
            );
            return (protocol, None);
        }
    };
    let server_name = match &raw.server_name {
        Some(name) => match ServerName::try_from(name.clone()) {
            Ok(name) => Some(name),
            Err(_) => {
                p.push(
                    format!("{tkey}.server_name"),
                    format!("`{name}` is not a DNS name or IP address"),
                );
                return (protocol, None);
            }
        },
        None => None,
    };
    let alpn: &[u8] = if protocol == UpstreamProtocol::H2 {
        b"h2"
    } else {
        b"http/1.1"
    };
    let client_chain = identity.as_ref().map(|certified| certified.cert.clone());
    match client_config(verify, identity, alpn) {
        Ok(client) => (
            protocol,
            Some(UpstreamTls {
                client,
                server_name,
                source: TlsSource {
                    ca,
                    client_chain,
                    insecure: raw.insecure_skip_verify,
                },
            }),
        ),
        Err(err) => {
            p.push(tkey, err);
            (protocol, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn errors(upstream_keys: &str) -> Vec<(String, String)> {
        let text = format!(
            "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n{upstream_keys}\n[[routes]]\nupstream = \"app\"\n"
        );
        match Config::from_toml(&text) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0.into_iter().map(|e| (e.key, e.message)).collect(),
        }
    }

    #[test]
    fn protocol_and_tls_errors_name_their_keys() {
        let cases = [
            ("protocol = \"spdy\"", "upstreams.app.protocol"),
            (
                "protocol = \"h2c\"\ntls = { insecure_skip_verify = true }",
                "upstreams.app.protocol",
            ),
            (
                "tls = { ca = \"/nonexistent/ca.pem\" }",
                "upstreams.app.tls.ca",
            ),
            (
                "tls = { client_cert = \"/nonexistent/c.pem\" }",
                "upstreams.app.tls.client_cert",
            ),
            (
                "tls = { insecure_skip_verify = true, server_name = \"bad name!\" }",
                "upstreams.app.tls.server_name",
            ),
            ("pipeline = 0", "upstreams.app.pipeline"),
            ("pipeline = 4\nprotocol = \"h2c\"", "upstreams.app.pipeline"),
            (
                "pipeline = 4\ntls = { insecure_skip_verify = true }",
                "upstreams.app.pipeline",
            ),
        ];
        for (keys, expected) in cases {
            let found = errors(keys);
            assert!(
                found.iter().any(|(key, _)| key == expected),
                "{keys}: expected an error on {expected}, got {found:?}"
            );
        }
        assert!(errors("pipeline = 32").is_empty());
        // A CA that loads, beside insecure_skip_verify, would go unused.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let both = format!(
            "tls = {{ insecure_skip_verify = true, ca = \"{}\" }}",
            ca.display()
        );
        let found = errors(&both);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "upstreams.app.tls.ca");
        assert!(errors(&format!("tls = {{ ca = \"{}\" }}", ca.display())).is_empty());
        let missing = errors("tls = { ca = \"/nonexistent/ca.pem\" }");
        assert!(missing[0].1.contains("/nonexistent/ca.pem"), "{missing:?}");
    }

    #[test]
    fn https_instances_h2_and_defaults() {
        let text = "[upstreams.a]\ninstances = [\"https://127.0.0.1:1\", \"https://127.0.0.1:2\"]\ntls = { insecure_skip_verify = true }\n\
                    [upstreams.b]\ninstances = [\"127.0.0.1:3\"]\nprotocol = \"h2c\"\n\
                    [upstreams.c]\ninstances = [\"127.0.0.1:4\"]\n\
                    [[routes]]\nupstream = \"a\"\n";
        let config = Config::from_toml(text).unwrap();
        let a = config.upstream("a").unwrap();
        assert_eq!(a.instances[1].addr, "127.0.0.1:2".parse().unwrap());
        let tls = a.tls.as_ref().expect("https:// turns TLS on");
        assert_eq!(tls.client.alpn_protocols, [b"http/1.1".to_vec()]);
        let b = config.upstream("b").unwrap();
        assert!(b.protocol.is_http2() && b.tls.is_none());
        let c = config.upstream("c").unwrap();
        assert!(!c.protocol.is_http2() && c.tls.is_none());
        // Only plain HTTP/1.1 instances are pipelined to unless the config says otherwise.
        let pipelines = [a.pipeline, b.pipeline, c.pipeline];
        assert_eq!(pipelines, [1, 1, crate::config::raw::DEFAULT_PIPELINE]);
        let unpooled = "[upstreams.a]\ninstances = [\"127.0.0.1:1\"]\nkeepalive = 0\n[[routes]]\nupstream = \"a\"\n";
        let unpooled = Config::from_toml(unpooled).unwrap();
        assert_eq!(unpooled.upstream("a").unwrap().pipeline, 1);
        let mixed = "[upstreams.a]\ninstances = [\"https://127.0.0.1:1\", \"127.0.0.1:2\"]\n[[routes]]\nupstream = \"a\"\n";
        let mixed = Config::from_toml(mixed).unwrap_err().0;
        assert_eq!(mixed[0].key, "upstreams.a.instances", "{mixed:?}");
    }
}
