//! TLS termination with rustls: certificates loaded from PEM files when the config loads (so
//! `scalegate check` and a reload catch bad ones), chosen per connection by SNI, ALPN `h2` and
//! `http/1.1`. A reload builds a new `ServerConfig`; connections already open keep theirs.
//! `client` is the other direction: TLS from the gateway to instances.

pub mod client;

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// One certificate with the host names it serves (`*.example.com` covers one label).
#[derive(Debug, Clone)]
pub struct TlsCertificate {
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
    /// Where the config gives it: `tls` or `tls.certificates[N]`.
    pub config_key: String,
    /// What its leaf says of itself; `None` when it cannot be read as X.509.
    pub leaf: Option<LeafFacts>,
}

/// What the gateway reads of a served certificate: when it is valid and the DNS names it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFacts {
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub dns_names: Vec<String>,
}

impl LeafFacts {
    /// The facts of the first certificate of `chain` (the leaf).
    pub fn of(chain: &[CertificateDer<'_>]) -> Option<LeafFacts> {
        use x509_parser::extensions::GeneralName;
        let (_, leaf) = x509_parser::parse_x509_certificate(chain.first()?).ok()?;
        let validity = leaf.validity();
        let dns_names = leaf
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|names| {
                names
                    .value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(LeafFacts {
            not_before_unix: validity.not_before.timestamp(),
            not_after_unix: validity.not_after.timestamp(),
            dns_names,
        })
    }

    /// What a client would refuse in serving this certificate for `names` at `now_unix`, or
    /// soon will (it expires within [`EXPIRY_WARNING`]). nginx and HAProxy serve such a
    /// certificate without a word: a renewal that failed shows only as clients failing.
    pub fn problems(&self, names: &[String], now_unix: i64) -> Vec<String> {
        let date = |unix: i64| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
            httpdate::fmt_http_date(at)
        };
        let mut problems = Vec::new();
        if self.not_after_unix < now_unix {
            problems.push(format!(
                "its certificate expired on {}: clients refuse it",
                date(self.not_after_unix)
            ));
        } else if self.not_after_unix - now_unix < EXPIRY_WARNING.as_secs() as i64 {
            problems.push(format!(
                "its certificate expires on {}",
                date(self.not_after_unix)
            ));
        }
        if self.not_before_unix > now_unix {
            problems.push(format!(
                "its certificate is not valid before {}: clients refuse it",
                date(self.not_before_unix)
            ));
        }
        for name in names {
            let covered = self.dns_names.iter().any(|dns| {
                if name.starts_with("*.") {
                    dns.eq_ignore_ascii_case(name)
                } else {
                    name_matches(dns, name)
                }
            });
            if !covered {
                problems.push(format!(
                    "its certificate does not cover `{name}` (it names {}): clients asking for \
                     it refuse it",
                    if self.dns_names.is_empty() {
                        "no DNS name".to_owned()
                    } else {
                        self.dns_names.join(", ")
                    }
                ));
            }
        }
        problems
    }
}

/// How long before its end a certificate's expiry is warned of.
pub const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(14 * 86_400);

/// Reads the certificates of a PEM file (at least one).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("cannot read {}: {err}", crate::config::shown_path(path)))?
        .collect::<Result<_, _>>()
        .map_err(|err| format!("{}: not a PEM certificate: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in the file{}",
            path.display(),
            unfit_pem(path, Pem::Certificate)
        ));
    }
    Ok(certs)
}

/// What a PEM file is expected to hold.
#[derive(Clone, Copy)]
enum Pem {
    Certificate,
    PrivateKey,
}

/// Why the file at `path` did not give the `wanted` PEM item, when its text shows it (an
/// encrypted key, the other kind of item, DER rather than PEM), else "".
fn unfit_pem(path: &Path, wanted: Pem) -> &'static str {
    std::fs::read(path).map_or("", |text| pem_mismatch(&text, wanted))
}

fn pem_mismatch(text: &[u8], wanted: Pem) -> &'static str {
    let has = |needle: &str| text.windows(needle.len()).any(|w| w == needle.as_bytes());
    if text.trim_ascii().is_empty() {
        return " (the file is empty)";
    }
    if !has("-----BEGIN ") {
        return " (it is not PEM: a DER file? `openssl x509 -inform DER` converts a certificate, \
                `openssl pkey -inform DER` a key)";
    }
    match wanted {
        Pem::PrivateKey if has("ENCRYPTED PRIVATE KEY-----") || has("Proc-Type: 4,ENCRYPTED") => {
            " (the key is encrypted: give it unencrypted, as `openssl pkey -in KEY -out PLAIN` \
             writes it)"
        }
        Pem::PrivateKey if has("-----BEGIN CERTIFICATE-----") => {
            " (it holds a certificate, not a private key)"
        }
        Pem::Certificate if has(" PRIVATE KEY-----") => {
            " (it holds a private key, not a certificate)"
        }
        _ => "",
    }
}

/// What is wrong with a certificate and key pair: the certificate file's problem, the key
/// file's, or both, each read whatever the other's state, so that a config check names every
/// bad file at once, under its own key.
#[derive(Debug)]
pub struct PairProblems {
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl PairProblems {
    /// Each problem under the config key of its file.
    pub fn keyed(
        self,
        cert_key: String,
        key_key: String,
    ) -> impl Iterator<Item = (String, String)> {
        let cert = self.cert.map(|err| (cert_key, err));
        let key = self.key.map(|err| (key_key, err));
        cert.into_iter().chain(key)
    }
}

impl std::fmt::Display for PairProblems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let problems: Vec<&str> = [&self.cert, &self.key]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        f.write_str(&problems.join("; "))
    }
}

impl From<PairProblems> for String {
    fn from(problems: PairProblems) -> String {
        problems.to_string()
    }
}

/// Reads a PEM certificate chain and its private key.
pub fn load_certificate(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, PairProblems> {
    let chain = load_certificates(cert);
    let signing = PrivateKeyDer::from_pem_file(key)
        .map_err(|err| {
            let shown = crate::config::shown_path(key);
            let unfit = unfit_pem(key, Pem::PrivateKey);
            format!("cannot read a private key from {shown}: {err}{unfit}")
        })
        .and_then(|key_der| {
            any_supported_type(&key_der)
                .map_err(|err| format!("{}: unsupported private key: {err}", key.display()))
        });
    let (chain, signing) = match (chain, signing) {
        (Ok(chain), Ok(signing)) => (chain, signing),
        (chain, signing) => {
            return Err(PairProblems {
                cert: chain.err(),
                key: signing.err(),
            })
        }
    };
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|err| PairProblems {
        cert: None,
        key: Some(format!(
            "{} does not match {}: {err}",
            key.display(),
            cert.display()
        )),
    })?;
    Ok(Arc::new(certified))
}

/// Index of the certificate for `sni`: the first that names it exactly, else the first whose
/// wildcard covers it (as nginx, HAProxy and Envoy prefer), else the first one.
pub fn pick_certificate(certificates: &[TlsCertificate], sni: Option<&str>) -> usize {
    let Some(sni) = sni else { return 0 };
    let first = |matches: &dyn Fn(&str) -> bool| {
        certificates
            .iter()
            .position(|c| c.names.iter().any(|name| matches(name)))
    };
    first(&|name| name.eq_ignore_ascii_case(sni))
        .or_else(|| first(&|name| name_matches(name, sni)))
        .unwrap_or(0)
}

fn name_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

#[derive(Debug)]
struct SniResolver(Vec<TlsCertificate>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let index = pick_certificate(&self.0, hello.server_name());
        self.0.get(index).map(|c| c.key.clone())
    }
}

/// The crypto (ring) behind every TLS config of the gateway.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls server settings for these certificates: TLS 1.2 and 1.3, ALPN h2 then http/1.1;
/// clients must present a certificate `client_verifier` accepts, when there is one.
pub fn server_config(
    certificates: &[TlsCertificate],
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Arc<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = match client_verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver(certificates.to_vec())));
    // http/1.0 too: a client that offers only it (curl --http1.0) is served, not refused.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    let (sessions, tickets) = resumption();
    config.session_storage = sessions;
    config.ticketer = tickets;
    Arc::new(config)
}

/// Sessions the listeners' clients may resume, the same across reloads (a new config for each
/// reload started every client over with a full handshake): TLS 1.3 tickets, encrypted under
/// keys rustls rotates, so they take no memory here; and TLS 1.2 session IDs, remembered for
/// the last 8,192 clients (rustls' default of 256 forgot a client after a few hundred others).
fn resumption() -> (
    Arc<dyn rustls::server::StoresServerSessions>,
    Arc<dyn rustls::server::ProducesTickets>,
) {
    static SHARED: OnceLock<(
        Arc<dyn rustls::server::StoresServerSessions>,
        Arc<dyn rustls::server::ProducesTickets>,
    )> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            (
                rustls::server::ServerSessionMemoryCache::new(8192),
                rustls::crypto::ring::Ticketer::new().expect("ring makes ticket keys"),
            )
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(names: &[&str]) -> TlsCertificate {
        let generated = rcgen::generate_simple_self_signed(vec!["x.test".to_string()]).unwrap();
        let key = PrivateKeyDer::try_from(generated.key_pair.serialize_der()).unwrap();
        TlsCertificate {
            names: names.iter().map(|n| n.to_string()).collect(),
            key: Arc::new(CertifiedKey::new(
                vec![generated.cert.der().clone()],
                any_supported_type(&key).unwrap(),
            )),
            config_key: "tls".into(),
            leaf: None,
        }
    }

    #[test]
    fn a_certificate_out_of_date_or_names_is_said_to_be() {
        let mut params =
            rcgen::CertificateParams::new(vec!["a.test".to_owned(), "*.b.test".to_owned()])
                .unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2026, 12, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let facts = LeafFacts::of(&[cert.der().clone()]).unwrap();
        assert_eq!(facts.dns_names, ["a.test", "*.b.test"]);
        let day = 86_400;
        let (start, end) = (facts.not_before_unix, facts.not_after_unix);
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let covered = names(&["a.test", "x.b.test", "*.b.test"]);
        assert!(facts.problems(&covered, start + day).is_empty());
        let said = |names: &[String], now| facts.problems(names, now).join(" | ");
        assert!(said(&covered, end - 3 * day).contains("expires on Tue, 01 Dec 2026"));
        assert!(said(&covered, end + 1).contains("expired on"));
        assert!(said(&covered, start - 1).contains("not valid before"));
        let stray = names(&["c.test", "x.y.b.test", "*.a.test"]);
        let problems = facts.problems(&stray, start + day);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("does not cover `c.test` (it names a.test, *.b.test)"));
    }

    #[test]
    fn a_file_holding_the_wrong_item_says_what_it_holds() {
        let generated = rcgen::generate_simple_self_signed(vec!["x.test".to_string()]).unwrap();
        let cert = generated.cert.pem();
        let key = generated.key_pair.serialize_pem();
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let said = |text: &str, wanted| pem_mismatch(text.as_bytes(), wanted);
        assert_eq!(said(&cert, Pem::Certificate), "");
        assert_eq!(said(&key, Pem::PrivateKey), "");
        assert!(said(encrypted, Pem::PrivateKey).contains("encrypted"));
        assert!(said(&cert, Pem::PrivateKey).contains("holds a certificate"));
        assert!(said(&key, Pem::Certificate).contains("holds a private key"));
        let der = generated.cert.der().to_vec();
        assert!(pem_mismatch(&der, Pem::Certificate).contains("not PEM"));
        assert_eq!(pem_mismatch(b"\n", Pem::PrivateKey), " (the file is empty)");
    }

    #[test]
    fn sni_picks_the_matching_certificate_else_the_first() {
        let certs = [
            certificate(&["a.test"]),
            certificate(&["b.test", "*.b.test"]),
        ];
        assert_eq!(pick_certificate(&certs, Some("a.test")), 0);
        assert_eq!(pick_certificate(&certs, Some("B.TEST")), 1);
        assert_eq!(pick_certificate(&certs, Some("api.b.test")), 1);
        assert_eq!(pick_certificate(&certs, Some("deep.api.b.test")), 0);
        assert_eq!(pick_certificate(&certs, Some("other.test")), 0);
        assert_eq!(pick_certificate(&certs, None), 0);
        // A name listed exactly wins over a wildcard listed before it.
        let certs = [certificate(&["*.b.test"]), certificate(&["x.b.test"])];
        assert_eq!(pick_certificate(&certs, Some("x.b.test")), 1);
        assert_eq!(pick_certificate(&certs, Some("y.b.test")), 0);
    }

    #[test]
    fn mismatched_files_are_refused_with_the_paths() {
        let dir = tempfile::tempdir().unwrap();
        let one = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        let two = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, one.cert.pem()).unwrap();
        std::fs::write(&key, two.key_pair.serialize_pem()).unwrap();
        let err = load_certificate(&cert, &key).unwrap_err();
        assert!(err.key.unwrap().contains("does not match"));
        std::fs::write(&key, one.key_pair.serialize_pem()).unwrap();
        assert!(load_certificate(&cert, &key).is_ok());
        let missing = load_certificate(&dir.path().join("nope.pem"), &key).unwrap_err();
        assert!(missing.cert.unwrap().contains("nope.pem"));
        assert!(missing.key.is_none());
        // Both files bad: each is named.
        let both = dir.path().join("nokey.pem");
        let missing = load_certificate(&dir.path().join("nope.pem"), &both).unwrap_err();
        assert!(missing.cert.unwrap().contains("nope.pem"));
        assert!(missing.key.unwrap().contains("nokey.pem"));
    }
}
