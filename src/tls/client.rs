//! TLS towards instances: the rustls client config of an upstream (trusted roots, optional
//! client certificate, ALPN), built once when the config loads.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Which certificates instance certificates must chain to.
pub enum Roots {
    /// The operating system's store (read once per process).
    System,
    Ca(Vec<CertificateDer<'static>>),
    /// Nothing is verified (`insecure_skip_verify` without a CA).
    None,
}

/// A client certificate chain and its key, checked to match.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ClientIdentity {
    pub fn load(cert: &Path, key: &Path) -> Result<ClientIdentity, String> {
        let certified = super::load_certificate(cert, key)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|err| format!("cannot read a private key from {}: {err}", key.display()))?;
        Ok(ClientIdentity {
            chain: certified.cert.clone(),
            key,
        })
    }
}

fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client config for one upstream: TLS 1.2 and 1.3, offering `alpn`.
pub fn client_config(
    roots: Roots,
    identity: Option<ClientIdentity>,
    insecure_skip_verify: bool,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?;
    let builder = if insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut store = rustls::RootCertStore::empty();
        let certs = match &roots {
            Roots::System => system_roots(),
            Roots::Ca(certs) => certs.as_slice(),
            Roots::None => &[],
        };
        let (added, _) = store.add_parsable_certificates(certs.iter().cloned());
        if added == 0 {
            return Err(match roots {
                Roots::System => "no system root certificates were found: set ca".to_owned(),
                _ => "no usable CA certificate in ca".to_owned(),
            });
        }
        builder.with_root_certificates(store)
    };
    let mut config = match identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.chain, identity.key)
            .map_err(|err| format!("client certificate: {err}"))?,
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
