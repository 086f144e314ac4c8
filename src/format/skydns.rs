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

/// The longest DNS label (RFC 1035).
const MAX_LABEL: usize = 63;

/// The pod's own DNS label in the SRV target: its name with dots as dashes (a dot would add a
/// label), at most 63 bytes. A longer one is cut and ends in a hash of the whole name, so it
/// stays unique: CoreDNS answers no SRV query at all for a name with one label over 63
/// bytes, which would take the whole service out of DNS, not just that pod.
fn label(pod: &str) -> String {
    let id = pod.replace('.', "-");
    if id.len() <= MAX_LABEL {
        return id;
    }
    // FNV-1a, 32 bits: stable across releases (a key must not move when podlease upgrades).
    let hash = pod.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
    format!("{}-{hash:08x}", &id[..MAX_LABEL - 9])
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
        Key::Fixed(join(prefix.as_str(), &format!("{}/{}", reversed(i.service, i.namespace, i.options), label(i.pod))))
    }
    fn value(&self, i: &Instance) -> Vec<u8> {
        // Always set ttl: CoreDNS serves min(the lease's time left clamped to [min-lease-ttl
        // 30 s, max-lease-ttl 24 h], ttl), and 300 s for a value without one (CoreDNS 1.15
        // plugin/etcd TTL(), measured by its own server in tests/frameworks.rs).
        let ttl = i.options.dns_ttl.unwrap_or(DEFAULT_DNS_TTL);
        serde_json::to_vec(&Value { host: i.ip.to_string(), port: i.port, ttl }).expect("serializes")
    }
}
