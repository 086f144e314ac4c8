//! etcd's plain HTTP `/version` on its client port, with the same TLS material: with auth on,
//! etcd answers the Status RPC only to root, but `/version` to anyone. The HTTPS client is
//! kube's (already a dependency), pointed at etcd through a kubeconfig made for it, so the CA
//! and the client certificate are read from the same files as the etcd flags name.

use std::time::Duration;

use kube::client::Body;
use kube::config::{AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext};

use crate::etcd::EtcdConfig;

/// The URL of `endpoint` as podlease dials it: `https://` with TLS flags, else `http://`.
pub fn url(config: &EtcdConfig, endpoint: &str) -> String {
    let tls = config.ca.is_some() || config.cert.is_some() || config.key.is_some();
    match endpoint.contains("://") {
        true => endpoint.to_string(),
        false if tls => format!("https://{endpoint}"),
        false => format!("http://{endpoint}"),
    }
}

/// The server version `endpoint` reports on `/version` (`etcdserver`).
pub async fn version(config: &EtcdConfig, endpoint: &str, timeout: Duration) -> Result<String, String> {
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let kubeconfig = Kubeconfig {
        clusters: vec![NamedCluster {
            name: "etcd".into(),
            cluster: Some(Cluster { server: Some(url(config, endpoint)), certificate_authority: path(&config.ca), ..Default::default() }),
            ..Default::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: "etcd".into(),
            auth_info: Some(AuthInfo { client_certificate: path(&config.cert), client_key: path(&config.key), ..Default::default() }),
            ..Default::default()
        }],
        contexts: vec![NamedContext { name: "etcd".into(), context: Some(Context { cluster: "etcd".into(), user: Some("etcd".into()), ..Default::default() }), ..Default::default() }],
        current_context: Some("etcd".into()),
        ..Default::default()
    };
    let ask = async {
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.map_err(|e| e.to_string())?;
        let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
        let request = http::Request::get("/version").body(Body::empty()).expect("a valid request");
        let response = client.send(request).await.map_err(|e| super::chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("/version answered {}", response.status()));
        }
        let body = response.into_body().collect_bytes().await.map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("/version is not JSON: {e}"))?;
        v["etcdserver"].as_str().map(str::to_string).ok_or_else(|| "/version names no etcdserver version".to_string())
    };
    tokio::time::timeout(timeout, ask).await.map_err(|_| format!("/version did not answer within {timeout:?}"))?
}
