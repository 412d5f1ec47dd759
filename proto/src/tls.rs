//! Pinned TLS: a client accepts exactly the coordinator whose certificate public key hashes to the
//! pin it was given (see [`crate::api::pin_from_spki`]), whatever name or CA the certificate has.
//! This is how a self-signed coordinator without a domain is trusted safely.

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;

/// Extracts the SubjectPublicKeyInfo (DER) from an X.509 certificate (DER) with a minimal DER walk:
/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version?, serial, sigAlg, issuer,
/// validity, subject, subjectPublicKeyInfo, ... } ... }
pub fn spki_of_cert(cert: &[u8]) -> Option<&[u8]> {
    fn tlv(d: &[u8]) -> Option<(u8, usize, usize)> {
        // returns (tag, header_len, content_len)
        let tag = *d.first()?;
        let l0 = *d.get(1)? as usize;
        if l0 < 0x80 {
            return Some((tag, 2, l0));
        }
        let n = l0 & 0x7f;
        if n == 0 || n > 4 || d.len() < 2 + n {
            return None;
        }
        let mut len = 0usize;
        for b in &d[2..2 + n] {
            len = (len << 8) | *b as usize;
        }
        Some((tag, 2 + n, len))
    }
    let (t, h, _) = tlv(cert)?;
    if t != 0x30 {
        return None;
    }
    let tbs_all = cert.get(h..)?;
    let (t, h, l) = tlv(tbs_all)?;
    if t != 0x30 {
        return None;
    }
    let mut rest = tbs_all.get(h..h + l)?;
    let mut idx = 0;
    // Skip the optional explicit [0] version.
    if rest.first() == Some(&0xa0) {
        let (_, h, l) = tlv(rest)?;
        rest = rest.get(h + l..)?;
    }
    // serial, signature alg, issuer, validity, subject, then SPKI.
    loop {
        let (_, h, l) = tlv(rest)?;
        if idx == 5 {
            return rest.get(..h + l);
        }
        rest = rest.get(h + l..)?;
        idx += 1;
    }
}

/// A rustls verifier that accepts the server only if its leaf certificate's public key matches
/// the pin. Signatures on the handshake are still verified with the certificate's key.
#[derive(Debug)]
pub struct PinVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    pub fn new(pin: &str) -> Self {
        PinVerifier {
            pin: pin.trim().to_string(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }
}

/// Checks the shape of a pin string before it is used; the error says what is accepted.
pub fn validate_pin(pin: &str) -> Result<(), String> {
    let ok = pin
        .strip_prefix("sha256/")
        .map(|b| b.len() == 44 && b.ends_with('='))
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid pin {pin:?}: expected \"sha256/\" followed by 44 base64 characters, as printed by `homeport-coordinator pin`"
        ))
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let spki = spki_of_cert(end_entity.as_ref()).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        if crate::api::pin_from_spki(spki) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "coordinator certificate does not match pin {} (got {})",
                self.pin,
                crate::api::pin_from_spki(spki)
            )))
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config that trusts exactly the pinned coordinator.
pub fn pinned_client_config(pin: &str) -> Result<rustls::ClientConfig, String> {
    validate_pin(pin)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier::new(pin)))
        .with_no_client_auth();
    Ok(cfg)
}
