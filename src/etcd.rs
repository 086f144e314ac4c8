//! The etcd connection: every endpoint of the cluster, TLS with server-name verification,
//! username/password auth, HTTP/2 keepalive pings so a dead path is noticed in seconds.
//! [`Connection`] is the one in use, replaced when rotated credentials arrive
//! (`credentials`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, KvClient, LeaseClient, TlsOptions, WatchClient};
use thiserror::Error;

/// The etcd connection in use. Cheap to clone; every clone sees a replacement. Each request
/// takes the current connection, so after a credential rotation new requests use the new
/// material while streams already open finish on the old one (no lease is touched).
#[derive(Clone)]
pub struct Connection {
    current: Arc<RwLock<Current>>,
    /// How many times the connection was replaced: a long-lived stream that reopens after
    /// a change must reopen on the new material too.
    generation: Arc<AtomicU64>,
    /// How it was made (None: from a bare client, as tests do).
    config: Option<EtcdConfig>,
}

struct Current {
    client: Client,
    /// The credentials it was made with: every further connection (the keepalive stream's
    /// own) is made from these, never from files that etcd may not accept yet.
    material: Arc<Material>,
}

impl From<Client> for Connection {
    fn from(client: Client) -> Connection {
        Connection { current: Arc::new(RwLock::new(Current { client, material: Arc::default() })), generation: Arc::default(), config: None }
    }
}

impl Connection {
    /// The current connection.
    pub fn client(&self) -> Client {
        self.current.read().unwrap_or_else(|e| e.into_inner()).client.clone()
    }

    pub fn kv_client(&self) -> KvClient {
        self.client().kv_client()
    }

    pub fn lease_client(&self) -> LeaseClient {
        self.client().lease_client()
    }

    pub fn watch_client(&self) -> WatchClient {
        self.client().watch_client()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The credentials in use.
    pub fn material(&self) -> Arc<Material> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).material.clone()
    }

    /// The deadline of every unary call (the default for a connection made from a client).
    pub fn call_timeout(&self) -> Duration {
        self.config.as_ref().map_or(EtcdConfig::default().call_timeout, |c| c.call_timeout)
    }

    /// A new connection (its own TCP connections) with the credentials in use; the current
    /// one where there is no configuration to make one from.
    pub async fn fresh(&self) -> Result<Client, ConfigError> {
        match &self.config {
            Some(config) => config.connect_with(&self.material()).await,
            None => Ok(self.client()),
        }
    }

    /// Makes `client`, made with `material`, the connection every later request uses.
    pub fn replace(&self, client: Client, material: Material) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Current { client, material: Arc::new(material) };
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// The credentials as read from their files at one moment: the CA, the client certificate
/// and key, the password.
#[derive(Default, PartialEq, Eq, Hash)]
pub struct Material {
    pub ca: Option<Vec<u8>>,
    pub cert: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
    pub password: Option<String>,
}

impl std::fmt::Debug for Material {
    // Never the key or the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Material {{ ca: {}, cert: {}, key: {}, password: {} }}", self.ca.is_some(), self.cert.is_some(), self.key.is_some(), self.password.is_some())
    }
}

impl Material {
    /// A hash of every file's content: a change of any of them is a rotation.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Deadline of every unary etcd call.
    pub call_timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ca: None,
            cert: None,
            key: None,
            username: None,
            password_file: None,
            call_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("no etcd endpoints configured (--etcd-endpoints)")]
    NoEndpoints,
    #[error("reading {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("--etcd-cert and --etcd-key go together")]
    CertWithoutKey,
    #[error("--etcd-username needs --etcd-password-file")]
    UserWithoutPassword,
    #[error("TLS options are set but endpoint {0} is not https://")]
    PlainEndpointWithTls(String),
    #[error("connecting to etcd: {0}")]
    Connect(#[from] etcd_client::Error),
    /// With a username, connecting authenticates, which waits for an endpoint to answer.
    #[error("connecting to etcd did not finish within {0:?} (no endpoint answered)")]
    ConnectTimeout(Duration),
    #[error("the etcd endpoints belong to different clusters ({0}): list the members of one cluster")]
    MixedClusters(String),
}

impl ConfigError {
    /// Whether this may go away by itself (etcd unreachable, not answering, refusing the
    /// credentials until a rotated Secret arrives), as opposed to a configuration to fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, ConfigError::Connect(_) | ConfigError::ConnectTimeout(_))
    }
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read { what, path: path.clone(), source })
}

impl EtcdConfig {
    /// The files the credentials are read from (CA, client certificate and key, password):
    /// Secrets that an operator or cert-manager rotates.
    pub fn files(&self) -> Vec<&PathBuf> {
        [&self.ca, &self.cert, &self.key, &self.password_file].into_iter().flatten().collect()
    }

    /// Reads every credential file once: what a connection is then made from.
    pub fn read_material(&self) -> Result<Material, ConfigError> {
        let file = |what, p: &Option<PathBuf>| p.as_ref().map(|p| read(what, p)).transpose();
        let password = match (&self.username, &self.password_file) {
            (Some(_), Some(pw)) => Some(String::from_utf8_lossy(&read("etcd password file", pw)?).trim().to_string()),
            (Some(_), None) => return Err(ConfigError::UserWithoutPassword),
            _ => None,
        };
        Ok(Material { ca: file("etcd CA", &self.ca)?, cert: file("etcd client cert", &self.cert)?, key: file("etcd client key", &self.key)?, password })
    }

    fn tls(&self, m: &Material) -> Result<Option<TlsOptions>, ConfigError> {
        if self.ca.is_none() && self.cert.is_none() && self.key.is_none() {
            return Ok(None);
        }
        let mut tls = TlsOptions::new();
        if let Some(ca) = &m.ca {
            tls = tls.ca_certificate(Certificate::from_pem(ca.clone()));
        }
        match (&m.cert, &m.key) {
            (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(c.clone(), k.clone())),
            (None, None) => {}
            _ => return Err(ConfigError::CertWithoutKey),
        }
        Ok(Some(tls))
    }

    /// Endpoints with a scheme: `https://` when TLS is configured, `http://` otherwise.
    fn urls(&self, tls: bool) -> Result<Vec<String>, ConfigError> {
        let urls: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.contains("://") {
                    e.to_string()
                } else if tls {
                    format!("https://{e}")
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        if urls.is_empty() {
            return Err(ConfigError::NoEndpoints);
        }
        if tls && let Some(plain) = urls.iter().find(|u| u.starts_with("http://")) {
            return Err(ConfigError::PlainEndpointWithTls(plain.clone()));
        }
        Ok(urls)
    }

    /// Connects with the files as they are now (lazily without auth: an unreachable etcd is
    /// not an error here, calls fail later). With a username it authenticates, within the
    /// call timeout.
    pub async fn connect(&self) -> Result<Client, ConfigError> {
        self.connect_with(&self.read_material()?).await
    }

    /// Connects with `material`.
    pub async fn connect_with(&self, material: &Material) -> Result<Client, ConfigError> {
        let (urls, opts) = self.options(material)?;
        self.bounded(Client::connect(urls, Some(opts))).await
    }

    async fn bounded(&self, connect: impl std::future::Future<Output = Result<Client, etcd_client::Error>>) -> Result<Client, ConfigError> {
        Ok(tokio::time::timeout(self.call_timeout, connect).await.map_err(|_| ConfigError::ConnectTimeout(self.call_timeout))??)
    }

    /// Connects after checking that every reachable endpoint reports the same cluster id:
    /// requests are balanced over all endpoints, so a list mixing clusters would grant a
    /// lease in one and write under it in another.
    pub async fn connect_checked(&self) -> Result<Client, ConfigError> {
        Ok(self.connection().await?.client())
    }

    /// [`connect_checked`](Self::connect_checked), as the connection in use: it remembers the
    /// credentials it was made with and can make more connections with them.
    pub async fn connection(&self) -> Result<Connection, ConfigError> {
        let material = self.read_material()?;
        let (urls, opts) = self.options(&material)?;
        if urls.len() > 1 {
            let ids = futures::future::join_all(urls.iter().map(|u| {
                let opts = opts.clone();
                async move {
                    let probe = async {
                        let mut c = Client::connect([u.as_str()], Some(opts)).await.ok()?;
                        // The member list, not a status call: with auth on, Status is for
                        // root only, and the check would compare nothing.
                        c.member_list().await.ok()?.header().map(|h| h.cluster_id())
                    };
                    (u.clone(), tokio::time::timeout(self.call_timeout, probe).await.ok().flatten())
                }
            }))
            .await;
            let known: Vec<(String, u64)> = ids.into_iter().filter_map(|(u, id)| id.map(|id| (u, id))).collect();
            if known.iter().any(|(_, id)| *id != known[0].1) {
                let list: Vec<String> = known.iter().map(|(u, id)| format!("{u} is in cluster {id:x}")).collect();
                return Err(ConfigError::MixedClusters(list.join(", ")));
            }
        }
        let client = self.bounded(Client::connect(urls, Some(opts))).await?;
        Ok(Connection {
            current: Arc::new(RwLock::new(Current { client, material: Arc::new(material) })),
            generation: Arc::default(),
            config: Some(self.clone()),
        })
    }

    fn options(&self, material: &Material) -> Result<(Vec<String>, ConnectOptions), ConfigError> {
        let tls = self.tls(material)?;
        let urls = self.urls(tls.is_some())?;
        let mut opts = ConnectOptions::new()
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_connect_timeout(Duration::from_secs(3))
            .with_tcp_keepalive(Duration::from_secs(30));
        if let Some(tls) = tls {
            opts = opts.with_tls(tls);
        }
        match (&self.username, &material.password) {
            (Some(user), Some(password)) => opts = opts.with_user(user.clone(), password.clone()).with_auto_token_refresh(true),
            (Some(_), None) => return Err(ConfigError::UserWithoutPassword),
            _ => {}
        }
        Ok((urls, opts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_endpoints_get_a_scheme() {
        let c = EtcdConfig { endpoints: vec!["a:2379".into(), " https://b:2379 ".into()], ..Default::default() };
        assert_eq!(c.urls(false).unwrap(), vec!["http://a:2379", "https://b:2379"]);
        assert_eq!(c.urls(true).unwrap(), vec!["https://a:2379", "https://b:2379"]);
        let c = EtcdConfig { endpoints: vec!["http://a:2379".into()], ..Default::default() };
        assert!(matches!(c.urls(true), Err(ConfigError::PlainEndpointWithTls(u)) if u == "http://a:2379"));
        let c = EtcdConfig { endpoints: vec!["a:2379".into()], ..Default::default() };
        assert_eq!(c.urls(true).unwrap(), vec!["https://a:2379"]);
    }

    #[test]
    fn empty_endpoints_are_an_error() {
        let c = EtcdConfig { endpoints: vec![" ".into()], ..Default::default() };
        assert!(matches!(c.urls(false), Err(ConfigError::NoEndpoints)));
    }
}
