//! go-kratos contrib/registry/etcd: key `/microservices/<svc>/<id>`, value a
//! `registry.ServiceInstance` with `<scheme>://ip:port` endpoints.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{FormatOptions, Instance, Key, Layout, join};
use crate::validate::{Prefix, ServiceName};

pub struct Kratos;

#[derive(Serialize)]
struct Value<'a> {
    id: String,
    name: &'a str,
    version: &'a str,
    metadata: &'a BTreeMap<String, String>,
    endpoints: [String; 1],
}

impl Layout for Kratos {
    fn default_prefix(&self) -> &'static str {
        "/microservices"
    }
    fn service_prefix(&self, prefix: &Prefix, service: &ServiceName, _: &str, _: &FormatOptions) -> String {
        // Registry.GetService / newWatcher read `<namespace>/<name>` with no trailing slash.
        join(prefix.as_str(), service.as_str())
    }
    fn key(&self, prefix: &Prefix, i: &Instance) -> Key {
        Key::Fixed(join(prefix.as_str(), &format!("{}/{}", i.service, i.id())))
    }
    fn value(&self, i: &Instance) -> Vec<u8> {
        let scheme = i.options.protocol.as_deref().unwrap_or("grpc");
        let v = Value {
            id: i.id(),
            name: i.service.as_str(),
            version: i.options.version.as_deref().unwrap_or(""),
            metadata: i.metadata,
            endpoints: [format!("{scheme}://{}", i.addr())],
        };
        serde_json::to_vec(&v).expect("serializes")
    }
}
