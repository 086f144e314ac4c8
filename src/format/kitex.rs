//! kitex-contrib/registry-etcd and hertz-contrib/registry etcd share one layout: key
//! `<root>/<svc>/<addr>` with no leading slash, value `{"network","address","weight","tags"}`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{FormatOptions, Instance, Key, Layout, join};
use crate::validate::{Prefix, ServiceName};

pub struct Kitex {
    root: &'static str,
}

impl Kitex {
    pub const KITEX: Kitex = Kitex { root: "kitex/registry-etcd" };
    pub const HERTZ: Kitex = Kitex { root: "hertz/registry-etcd" };
}

/// Both frameworks' `discovery.DefaultWeight`.
const DEFAULT_WEIGHT: i32 = 10;

#[derive(Serialize)]
struct Value<'a> {
    network: &'static str,
    address: String,
    weight: i32,
    tags: &'a BTreeMap<String, String>,
}

impl Layout for Kitex {
    fn default_prefix(&self) -> &'static str {
        self.root
    }
    fn service_prefix(&self, prefix: &Prefix, service: &ServiceName, _: &str, _: &FormatOptions) -> String {
        // The resolvers themselves read `<root>/<svc>/` (registry-etcd's common.go: prefix +
        // "/%v/"; Hertz's alike; tests/frameworks.rs). podlease keeps the prefix without the
        // slash: it is the service's claim (stored in etcd, see registry/claim.rs), and the
        // wider claim only refuses names that nest (`user`, `user2`), never lets a reader see
        // another's keys.
        join(prefix.as_str(), service.as_str())
    }
    fn key(&self, prefix: &Prefix, i: &Instance) -> Key {
        Key::Fixed(join(prefix.as_str(), &format!("{}/{}", i.service, i.addr())))
    }
    fn value(&self, i: &Instance) -> Vec<u8> {
        let v = Value {
            network: "tcp",
            address: i.addr(),
            weight: i.options.weight.unwrap_or(DEFAULT_WEIGHT),
            tags: i.metadata,
        };
        serde_json::to_vec(&v).expect("serializes")
    }
}
