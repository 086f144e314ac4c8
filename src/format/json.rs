//! podlease's own format: one JSON document per pod, everything a custom client needs.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{FormatOptions, Instance, Key, Layout, join};
use crate::validate::{Prefix, ServiceName};

pub struct Json;

#[derive(Serialize)]
struct Value<'a> {
    addr: String,
    namespace: &'a str,
    pod: &'a str,
    node: &'a str,
    metadata: &'a BTreeMap<String, String>,
}

impl Layout for Json {
    fn default_prefix(&self) -> &'static str {
        "/services"
    }
    fn service_prefix(&self, prefix: &Prefix, service: &ServiceName, _: &str, _: &FormatOptions) -> String {
        join(prefix.as_str(), &format!("{service}/"))
    }
    fn key(&self, prefix: &Prefix, i: &Instance) -> Key {
        Key::Fixed(join(prefix.as_str(), &format!("{}/{}/{}", i.service, i.namespace, i.pod)))
    }
    fn value(&self, i: &Instance) -> Vec<u8> {
        let v = Value { addr: i.addr(), namespace: i.namespace, pod: i.pod, node: i.node, metadata: i.metadata };
        serde_json::to_vec(&v).expect("serializes")
    }
}
