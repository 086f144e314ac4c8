//! Consumer formats: the exact key and value bytes each discovery client reads.
//!
//! One small module per format behind [`Layout`]. A key is fixed by the instance, except
//! go-zero's, which ends in the lease id and so is only known once the lease is granted.
//! Keys are made in one place, [`build`], from validated parts only (a [`ServiceName`] and a
//! [`Prefix`] by type, the pod's names checked there), and checked against the key space
//! before anyone can write them.

mod etcd_naming;
mod go_micro;
mod go_zero;
mod json;
mod kitex;
mod kratos;
mod skydns;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{self, KeySpace, Prefix, ServiceName};

pub use skydns::DEFAULT_ZONE;

/// Which consumer reads the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// podlease's own JSON document under `/services/<svc>/<namespace>/<pod>`.
    #[default]
    Json,
    /// go.etcd.io/etcd/client/v3/naming (grpc-go `etcd:///` resolver).
    EtcdNaming,
    /// go-zero core/discov.
    GoZero,
    /// go-kratos contrib/registry/etcd.
    Kratos,
    /// go-micro registry/etcd.
    GoMicro,
    /// kitex-contrib/registry-etcd.
    Kitex,
    /// hertz-contrib/registry etcd.
    Hertz,
    /// CoreDNS etcd plugin (SkyDNS layout).
    Skydns,
}

impl Format {
    pub const ALL: [Format; 8] = [
        Format::Json,
        Format::EtcdNaming,
        Format::GoZero,
        Format::Kratos,
        Format::GoMicro,
        Format::Kitex,
        Format::Hertz,
        Format::Skydns,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::EtcdNaming => "etcd-naming",
            Format::GoZero => "go-zero",
            Format::Kratos => "kratos",
            Format::GoMicro => "go-micro",
            Format::Kitex => "kitex",
            Format::Hertz => "hertz",
            Format::Skydns => "skydns",
        }
    }

    /// The layout that writes this format.
    pub fn layout(self) -> &'static dyn Layout {
        match self {
            Format::Json => &json::Json,
            Format::EtcdNaming => &etcd_naming::EtcdNaming,
            Format::GoZero => &go_zero::GoZero,
            Format::Kratos => &kratos::Kratos,
            Format::GoMicro => &go_micro::GoMicro,
            Format::Kitex => &kitex::Kitex::KITEX,
            Format::Hertz => &kitex::Kitex::HERTZ,
            Format::Skydns => &skydns::Skydns,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL.into_iter().find(|f| f.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = Format::ALL.iter().map(|f| f.as_str()).collect();
            format!("unknown format {}; expected one of {}", validate::shown(s), names.join(", "))
        })
    }
}

/// Settings some consumers need, each with that consumer's own default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FormatOptions {
    /// Service version (kratos `version`, go-micro `version`; default "" and "latest").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = validate::pattern::VERSION), length(max = validate::MAX_VERSION))]
    pub version: Option<String>,
    /// Endpoint scheme for kratos (`grpc` or `http`; default `grpc`) and go-micro node
    /// metadata `protocol` (default `grpc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = validate::pattern::PROTOCOL), length(max = validate::MAX_PROTOCOL))]
    pub protocol: Option<String>,
    /// Kitex / Hertz instance weight (default 10). Both clients serve a weight of 0 as 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub weight: Option<i32>,
    /// DNS zone for skydns (default `cluster.local`): the name is `<svc>.<namespace>.<zone>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = validate::pattern::zone()), length(max = validate::MAX_SERVICE))]
    pub zone: Option<String>,
    /// DNS record TTL for skydns, seconds (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub dns_ttl: Option<u32>,
}

impl FormatOptions {
    pub fn is_empty(&self) -> bool {
        *self == FormatOptions::default()
    }
}

/// Everything a format may put into a key or value for one (pod, registration).
#[derive(Debug, Clone, Copy)]
pub struct Instance<'a> {
    pub service: &'a ServiceName,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub node: &'a str,
    pub ip: IpAddr,
    pub port: u16,
    pub metadata: &'a BTreeMap<String, String>,
    pub options: &'a FormatOptions,
}

impl Instance<'_> {
    /// `ip:port`, with IPv6 bracketed as every consumer's net.SplitHostPort expects.
    pub fn addr(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.port),
        }
    }

    /// A per-pod id, unique across namespaces (namespaces cannot contain dots).
    pub fn id(&self) -> String {
        format!("{}.{}", self.namespace, self.pod)
    }
}

/// Where an instance's key lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A key known before the lease exists.
    Fixed(String),
    /// The key is this text followed by the lease id in decimal (go-zero).
    LeaseSuffixed(String),
}

impl Key {
    /// The concrete key under `lease`.
    pub fn with_lease(&self, lease: i64) -> String {
        match self {
            Key::Fixed(k) => k.clone(),
            Key::LeaseSuffixed(p) => format!("{p}{lease}"),
        }
    }

    /// Whether `key` is this key under some lease.
    pub fn matches(&self, key: &str) -> bool {
        match self {
            Key::Fixed(k) => k == key,
            Key::LeaseSuffixed(p) => key
                .strip_prefix(p.as_str())
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())),
        }
    }
}

/// One consumer's layout.
pub trait Layout: Sync {
    /// The key root used when the registration sets no prefix.
    fn default_prefix(&self) -> &'static str;
    /// The prefix a consumer of `service` reads (Get with prefix, then Watch).
    fn service_prefix(&self, prefix: &Prefix, service: &ServiceName, namespace: &str, options: &FormatOptions) -> String;
    /// The instance's key (only [`build`] calls it: it checks the result).
    fn key(&self, prefix: &Prefix, inst: &Instance) -> Key;
    /// The value bytes.
    fn value(&self, inst: &Instance) -> Vec<u8>;
}

/// An instance's key and value, as [`build`] made and checked them.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub key: Key,
    pub value: Vec<u8>,
}

/// The one place keys and values are made: validated parts in, a key checked against the
/// key space (well formed, below `prefix`, outside the owner prefix and other allowed
/// prefixes) and a bounded value out.
pub fn build(format: Format, prefix: &Prefix, inst: &Instance, space: &KeySpace) -> Result<Built, String> {
    validate::object_name(inst.namespace, false).map_err(|e| format!("namespace {e}"))?;
    validate::object_name(inst.pod, true).map_err(|e| format!("pod {e}"))?;
    let layout = format.layout();
    let key = layout.key(prefix, inst);
    // A go-zero key ends in a lease id: decimal digits, which cannot spoil a key.
    space.check_key(prefix, &key.with_lease(1))?;
    let value = layout.value(inst);
    if value.len() > validate::MAX_VALUE {
        return Err(format!("the value would be {} bytes; at most {} (metadata too large)", value.len(), validate::MAX_VALUE));
    }
    Ok(Built { key, value })
}

/// Joins a prefix and a relative path with exactly one `/` (an empty prefix adds nothing).
pub fn join(prefix: &str, rest: &str) -> String {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() && !prefix.starts_with('/') {
        rest.to_string()
    } else {
        format!("{p}/{rest}")
    }
}

#[cfg(test)]
mod tests;
