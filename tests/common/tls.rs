//! Certificates for TLS tests, made at test time with the `openssl` CLI in a directory of their
//! own (readable by the `rabbitmq` user, deleted when dropped):
//! * `ca.pem` / `ca.key`: the test CA;
//! * `other-ca.pem` / `other-ca.key`: a second, unrelated CA (the "wrong CA" cases);
//! * `server.pem` / `server.key`: signed by the CA for `DNS:localhost,IP:127.0.0.1`, valid now;
//! * `expired.pem` / `expired.key`: the same names and CA, valid only on 1-2 January 2020;
//! * `client.pem` / `client.key`: a client certificate signed by the CA whose CN is
//!   [`Pki::client_user`] (EXTERNAL login);
//! * `stranger.pem` / `stranger.key`: a client certificate with the same CN signed by the other
//!   CA;
//! * `nobody.pem` / `nobody.key`: a client certificate signed by the CA whose CN is
//!   [`Pki::nobody_user`], a user the broker does not have.
//!
//! Private keys are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, openssl 3's default).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Pki {
    dir: PathBuf,
    /// The CN of `client.pem` (a broker user for EXTERNAL login).
    pub client_user: String,
    /// The CN of `nobody.pem` (no such broker user).
    pub nobody_user: String,
}

/// The subject alternative names of the server certificates.
pub const SERVER_SAN: &str = "DNS:localhost,IP:127.0.0.1";

impl Pki {
    /// Generates every file (about a second: seven RSA 2048 keys).
    pub fn generate(label: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "warren-pki-{label}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).expect("PKI dir");
        let pki = Pki {
            dir,
            client_user: format!("wt-tls-external-{label}"),
            nobody_user: format!("wt-tls-nobody-{label}"),
        };
        pki.make_ca("ca", "warren-test-ca");
        pki.make_ca("other-ca", "warren-other-ca");
        let server_ext = format!(
            "subjectAltName={SERVER_SAN}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
        );
        let client_ext = "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n";
        pki.make_leaf("server", "localhost", "ca", &server_ext);
        pki.make_expired("expired", "localhost", &server_ext);
        pki.make_leaf("client", &pki.client_user, "ca", client_ext);
        pki.make_leaf("stranger", &pki.client_user, "other-ca", client_ext);
        pki.make_leaf("nobody", &pki.nobody_user, "ca", client_ext);
        // The Debian wrapper runs RabbitMQ as the rabbitmq user: it must read the files.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&pki.dir)
            .status();
        pki
    }

    /// The absolute path of `file` (`ca.pem`, `client.key`...).
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `rabbitmq.conf` lines for a TLS listener on `port` serving `cert` (`server` or
    /// `expired`) that accepts clients with or without a certificate from the CA, and EXTERNAL
    /// login by the certificate's CN (with the `rabbitmq_auth_mechanism_ssl` plugin) besides
    /// PLAIN and AMQPLAIN.
    pub fn rabbitmq_conf(&self, port: u16, cert: &str) -> String {
        format!(
            "listeners.ssl.default = {port}\n\
             ssl_options.cacertfile = {ca}\n\
             ssl_options.certfile = {cert_file}\n\
             ssl_options.keyfile = {key_file}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = false\n\
             auth_mechanisms.1 = PLAIN\n\
             auth_mechanisms.2 = AMQPLAIN\n\
             auth_mechanisms.3 = EXTERNAL\n\
             ssl_cert_login_from = common_name\n",
            ca = self.path("ca.pem"),
            cert_file = self.path(&format!("{cert}.pem")),
            key_file = self.path(&format!("{cert}.key")),
        )
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("the openssl CLI runs (Debian: apt-get install openssl)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join(file), text).expect("PKI file");
    }

    /// A self-signed CA certificate `<name>.pem` and key `<name>.key`.
    fn make_ca(&self, name: &str, cn: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// A key `<name>.key` and its certificate signing request `<name>.csr` for `cn`.
    fn make_request(&self, name: &str, cn: &str) {
        self.openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
    }

    /// `<name>.pem` for `cn` signed by the CA `<ca>` with the extensions `ext`, valid for 2
    /// days from now.
    fn make_leaf(&self, name: &str, cn: &str, ca: &str, ext: &str) {
        self.make_request(name, cn);
        self.write(&format!("{name}.ext"), ext);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &format!("0x{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// `<name>.pem` for `cn` signed by the CA `ca` with the extensions `ext`, valid from 1 to
    /// 2 January 2020 only. `openssl x509 -req` (openssl 3.0) cannot set a start date in the
    /// past, `openssl ca` can (`-startdate`/`-enddate`); it needs a minimal CA configuration
    /// and database.
    fn make_expired(&self, name: &str, cn: &str, ext: &str) {
        self.make_request(name, cn);
        self.write(&format!("{name}.ext"), ext);
        self.write(
            "openssl-ca.cnf",
            "[ ca ]\n\
             default_ca = test_ca\n\
             [ test_ca ]\n\
             database = index.txt\n\
             new_certs_dir = .\n\
             serial = serial.txt\n\
             default_md = sha256\n\
             policy = any_name\n\
             unique_subject = no\n\
             [ any_name ]\n\
             commonName = supplied\n",
        );
        self.write("index.txt", "");
        self.write("serial.txt", "1000\n");
        self.openssl(&[
            "ca",
            "-batch",
            "-notext",
            "-config",
            "openssl-ca.cnf",
            "-cert",
            "ca.pem",
            "-keyfile",
            "ca.key",
            "-in",
            &format!("{name}.csr"),
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200102000000Z",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
