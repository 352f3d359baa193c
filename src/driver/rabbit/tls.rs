//! TLS to the broker: a native-tls (OpenSSL) connector built once per transport from oslo's
//! `ssl*` options, and the failures that are permanent (not retried).
//!
//! The CA file replaces the system's roots (oslo passes it as the only `ca_certs`); without
//! one the system's roots are used. The host name of each host is checked as it is connected
//! to, so failover verifies every broker against its own name; IP addresses are checked
//! against the certificate's IP entries.

use std::fs;
use std::path::Path;

use native_tls::{Certificate, Identity, Protocol, TlsConnector};

use crate::error::{Error, Result};
use crate::options::{TlsOptions, TlsVersion};

/// The connector for `options`, `None` without TLS. Reads the files now, so a missing or
/// unreadable one is reported when the transport is built.
pub(crate) fn connector(options: &TlsOptions) -> Result<Option<TlsConnector>> {
    if !options.enabled {
        return Ok(None);
    }
    let mut builder = TlsConnector::builder();
    if let Some(ca_file) = &options.ca_file {
        let pem = read("ssl_ca_file", ca_file)?;
        let certificates = pem_blocks(&pem, "CERTIFICATE");
        if certificates.is_empty() {
            return Err(Error::invalid_option(
                "ssl_ca_file",
                format!("{} holds no PEM certificate", ca_file.display()),
            ));
        }
        builder.disable_built_in_roots(true);
        for block in certificates {
            let certificate = Certificate::from_pem(block.as_bytes()).map_err(|e| {
                Error::invalid_option(
                    "ssl_ca_file",
                    format!("{}: bad certificate: {e}", ca_file.display()),
                )
            })?;
            builder.add_root_certificate(certificate);
        }
    }
    if let (Some(cert_file), Some(key_file)) = (&options.cert_file, &options.key_file) {
        let cert = read("ssl_cert_file", cert_file)?;
        let key = read("ssl_key_file", key_file)?;
        let identity = Identity::from_pkcs8(&cert, &key).map_err(|e| {
            Error::invalid_option(
                "ssl_key_file",
                format!(
                    "{} and {} are not a PEM certificate and its PKCS#8 key \
                     (convert an RSA key with `openssl pkcs8 -topk8 -nocrypt`): {e}",
                    cert_file.display(),
                    key_file.display()
                ),
            )
        })?;
        builder.identity(identity);
    }
    builder.min_protocol_version(options.min_version.map(|version| match version {
        TlsVersion::Tls10 => Protocol::Tlsv10,
        TlsVersion::Tls11 => Protocol::Tlsv11,
        TlsVersion::Tls12 => Protocol::Tlsv12,
        TlsVersion::Tls13 => Protocol::Tlsv13,
    }));
    builder
        .build()
        .map(Some)
        .map_err(|e| Error::invalid_option("ssl", format!("cannot set up TLS: {e}")))
}

fn read(option: &str, path: &Path) -> Result<Vec<u8>> {
    fs::read(path)
        .map_err(|e| Error::invalid_option(option, format!("cannot read {}: {e}", path.display())))
}

/// The PEM blocks of one label in `pem` (a CA bundle holds several certificates).
fn pem_blocks(pem: &[u8], label: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(pem);
    let (begin, end) = (
        format!("-----BEGIN {label}-----"),
        format!("-----END {label}-----"),
    );
    let mut blocks = Vec::new();
    let mut rest = text.as_ref();
    while let Some(start) = rest.find(&begin) {
        let Some(stop) = rest[start..].find(&end) else {
            break;
        };
        let stop = start + stop + end.len();
        blocks.push(rest[start..stop].to_string());
        rest = &rest[stop..];
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_split_into_certificates() {
        let bundle = "junk\n-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\
                      -----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let blocks = pem_blocks(bundle.as_bytes(), "CERTIFICATE");
        assert_eq!(blocks.len(), 2);
        assert!(blocks[1].contains("BBB") && !blocks[1].contains("AAA"));
        assert!(pem_blocks(b"nothing", "CERTIFICATE").is_empty());
    }

    #[test]
    fn unreadable_files_name_their_option() {
        let options = TlsOptions {
            enabled: true,
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsOptions::default()
        };
        match connector(&options) {
            Err(Error::InvalidOption { name, reason }) => {
                assert_eq!(name, "ssl_ca_file");
                assert!(reason.contains("/nonexistent/ca.pem"), "{reason}");
            }
            other => panic!("{:?}", other.map(|c| c.is_some())),
        }
        assert!(connector(&TlsOptions::default()).unwrap().is_none());
    }
}
