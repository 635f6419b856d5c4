//! TLS towards instances: the rustls client config of an upstream (trusted roots, optional
//! client certificate, ALPN), built once when the config loads.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// How instance certificates are verified.
pub enum Verify {
    /// They must chain to the operating system's store (read once per process).
    System,
    /// They must chain to these certificates (`ca`).
    Ca(Vec<CertificateDer<'static>>),
    /// Not at all (`insecure_skip_verify`); handshake signatures are still checked.
    Skip,
}

fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// The client config for one upstream: TLS 1.2 and 1.3, offering `alpn`, presenting
/// `identity` (a client certificate and its key, checked to match when loaded) if any.
pub fn client_config(
    verify: Verify,
    identity: Option<Arc<CertifiedKey>>,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = super::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?;
    let builder = match verify {
        Verify::Skip => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider))),
        Verify::System | Verify::Ca(_) => {
            let certs = match &verify {
                Verify::Ca(certs) => certs.as_slice(),
                _ => system_roots(),
            };
            let mut store = rustls::RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(certs.iter().cloned());
            if added == 0 {
                return Err(match verify {
                    Verify::System => "no system root certificates were found: set ca".to_owned(),
                    _ => "no usable CA certificate in ca".to_owned(),
                });
            }
            builder.with_root_certificates(store)
        }
    };
    let mut config = match identity {
        Some(certified) => {
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any certificate but still checks the handshake signatures, so the connection is at
/// least encrypted to the holder of the presented key.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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
