//! A throwaway CA with a server certificate for 127.0.0.1 (and the mini-cluster's node
//! address) and a client certificate, made
//! with openssl, for testing etcd over TLS.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn leaf(dir: &Path, name: &str, cn: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr"), "-subj", &format!("/CN={cn}")]);
    openssl(dir, &[
        "x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", &format!("{name}.crt"), "-days", "2", "-extfile", &format!("{name}.ext"),
    ]);
}

pub fn make(dir: &Path) -> Certs {
    std::fs::create_dir_all(dir).unwrap();
    openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=podlease-test-ca"]);
    // The server certificate also names the mini-cluster's node address: pods reach an etcd
    // the test runs on the host at NODE_ADDRESS (`MiniCluster::expose`) and verify that name.
    let server_ext = format!(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,IP:{}\n",
        super::node::NODE_ADDRESS
    );
    leaf(dir, "server", "127.0.0.1", &server_ext);
    leaf(dir, "client", "podlease", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n");
    Certs {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    }
}

/// A CA that issues certificates with any validity window (`openssl ca -startdate
/// -enddate`: `x509 -days` only counts whole days), for rotation and expiry tests.
pub struct Ca {
    pub dir: PathBuf,
    pub cert: PathBuf,
    key: PathBuf,
}

const CA_CONFIG: &str = "[ca]\ndefault_ca = podlease_test\n[podlease_test]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
default_md = sha256\npolicy = any\nunique_subject = no\ncopy_extensions = none\n[any]\ncommonName = supplied\n\
[client]\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature,keyEncipherment\nextendedKeyUsage = clientAuth\n\
[server]\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n\
subjectAltName = IP:127.0.0.1,DNS:localhost\n";

/// `t` as openssl ca's YYMMDDHHMMSSZ (UTC).
fn asn1_time(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let out = Command::new("date").args(["-u", "-d", &format!("@{secs}"), "+%y%m%d%H%M%SZ"]).output().expect("date");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl Ca {
    pub fn new(dir: &Path, cn: &str) -> Ca {
        std::fs::create_dir_all(dir).unwrap();
        openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", &format!("/CN={cn}")]);
        std::fs::write(dir.join("ca.cnf"), CA_CONFIG).unwrap();
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(dir.join("serial"), "01\n").unwrap();
        Ca { dir: dir.to_path_buf(), cert: dir.join("ca.crt"), key: dir.join("ca.key") }
    }

    /// A client certificate (CN `cn`) valid from `not_before` to `not_after`: (cert, key).
    pub fn client(&self, name: &str, cn: &str, not_before: std::time::SystemTime, not_after: std::time::SystemTime) -> (PathBuf, PathBuf) {
        self.issue(name, cn, "client", not_before, not_after)
    }

    /// A server certificate for 127.0.0.1 valid for two days: (cert, key).
    pub fn server(&self, name: &str) -> (PathBuf, PathBuf) {
        let now = std::time::SystemTime::now();
        self.issue(name, "127.0.0.1", "server", now - std::time::Duration::from_secs(60), now + std::time::Duration::from_secs(2 * 86_400))
    }

    fn issue(&self, name: &str, cn: &str, ext: &str, not_before: std::time::SystemTime, not_after: std::time::SystemTime) -> (PathBuf, PathBuf) {
        let dir = &self.dir;
        openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr"), "-subj", &format!("/CN={cn}")]);
        openssl(dir, &[
            "ca", "-batch", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key", "-in", &format!("{name}.csr"),
            "-out", &format!("{name}.crt"), "-startdate", &asn1_time(not_before), "-enddate", &asn1_time(not_after),
            "-extensions", ext, "-notext",
        ]);
        (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")))
    }
}

/// A directory laid out as the kubelet mounts a Secret: every file a symlink through
/// `..data`, which an update points at a new timestamped directory in one rename, so a
/// reader sees the old set or the new one, never a mix.
pub struct SecretDir {
    pub dir: PathBuf,
    version: usize,
}

impl SecretDir {
    pub fn new(dir: &Path, files: &[(&str, Vec<u8>)]) -> SecretDir {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = SecretDir { dir: dir.to_path_buf(), version: 0 };
        s.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        s
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Replaces every file at once.
    pub fn update(&mut self, files: &[(&str, Vec<u8>)]) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        for (name, content) in files {
            std::fs::write(self.dir.join(&version).join(name), content).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}
