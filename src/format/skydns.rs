//! CoreDNS etcd plugin (SkyDNS layout): the name `<svc>.<namespace>.<zone>` reversed into a
//! path, one key per pod below it, value `{"host":ip,"port":port}`.

use serde::Serialize;

use super::{FormatOptions, Instance, Key, Layout, join};

pub struct Skydns;

const DEFAULT_ZONE: &str = "cluster.local";

#[derive(Serialize)]
struct Value {
    host: String,
    port: u16,
}

/// `user.shop.cluster.local` → `local/cluster/shop/user`.
fn reversed(service: &str, namespace: &str, options: &FormatOptions) -> String {
    let zone = options.zone.as_deref().unwrap_or(DEFAULT_ZONE);
    let name = format!("{service}.{namespace}.{}", zone.trim_matches('.'));
    let mut labels: Vec<&str> = name.split('.').filter(|l| !l.is_empty()).collect();
    labels.reverse();
    labels.join("/")
}

impl Layout for Skydns {
    fn default_prefix(&self) -> &'static str {
        "/skydns"
    }
    fn service_prefix(&self, prefix: &str, service: &str, namespace: &str, options: &FormatOptions) -> String {
        join(prefix, &format!("{}/", reversed(service, namespace, options)))
    }
    fn key(&self, prefix: &str, i: &Instance) -> Key {
        // A dot would add a DNS label; pod names may contain dots.
        let id = i.pod.replace('.', "-");
        Key::Fixed(join(prefix, &format!("{}/{id}", reversed(i.service, i.namespace, i.options))))
    }
    fn value(&self, i: &Instance) -> Vec<u8> {
        serde_json::to_vec(&Value { host: i.ip.to_string(), port: i.port }).expect("serializes")
    }
}
