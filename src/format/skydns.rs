//! CoreDNS etcd plugin (SkyDNS layout): the name `<svc>.<namespace>.<zone>` reversed into a
//! path, one key per pod below it, value `{"host":ip,"port":port,"ttl":30}`.

use serde::Serialize;

use super::{FormatOptions, Instance, Key, Layout, join};
use crate::validate::{Prefix, ServiceName};

pub struct Skydns;

pub const DEFAULT_ZONE: &str = "cluster.local";

/// DNS TTL when the registration sets none.
const DEFAULT_DNS_TTL: u32 = 30;

/// msg.Service's fields in its order, all omitempty upstream.
#[derive(Serialize)]
struct Value {
    host: String,
    port: u16,
    ttl: u32,
}

/// `user.shop.cluster.local` → `local/cluster/shop/user`.
fn reversed(service: &ServiceName, namespace: &str, options: &FormatOptions) -> String {
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
    fn service_prefix(&self, prefix: &Prefix, service: &ServiceName, namespace: &str, options: &FormatOptions) -> String {
        // Etcd.get appends "/" for a recursive lookup.
        join(prefix.as_str(), &format!("{}/", reversed(service, namespace, options)))
    }
    fn key(&self, prefix: &Prefix, i: &Instance) -> Key {
        // A dot would add a DNS label; pod names may contain dots.
        let id = i.pod.replace('.', "-");
        Key::Fixed(join(prefix.as_str(), &format!("{}/{id}", reversed(i.service, i.namespace, i.options))))
    }
    fn value(&self, i: &Instance) -> Vec<u8> {
        // Always set ttl: CoreDNS takes min(uint32(lease id), ttl) as the record TTL, and a
        // lease id truncated to 32 bits is usually a huge number of seconds.
        let ttl = i.options.dns_ttl.unwrap_or(DEFAULT_DNS_TTL);
        serde_json::to_vec(&Value { host: i.ip.to_string(), port: i.port, ttl }).expect("serializes")
    }
}
