//! go-micro registry/etcd: key `/micro/registry/<svc>/<node id>`, value a `registry.Service`
//! holding this one node. Service-level metadata is null, endpoints empty.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{FormatOptions, Instance, Key, Layout, join};
use crate::validate::{Prefix, ServiceName};

pub struct GoMicro;

#[derive(Serialize)]
struct Value<'a> {
    name: &'a str,
    version: &'a str,
    metadata: Option<()>,
    endpoints: [(); 0],
    nodes: [Node<'a>; 1],
}

#[derive(Serialize)]
struct Node<'a> {
    id: String,
    address: String,
    metadata: BTreeMap<&'a str, &'a str>,
}

fn node_id(i: &Instance) -> String {
    format!("{}-{}", i.service.as_str().replace('/', "-"), i.id())
}

impl Layout for GoMicro {
    fn default_prefix(&self) -> &'static str {
        "/micro/registry"
    }
    fn service_prefix(&self, prefix: &Prefix, service: &ServiceName, _: &str, _: &FormatOptions) -> String {
        // GetService reads servicePath(name) + "/".
        join(prefix.as_str(), &format!("{}/", service.as_str().replace('/', "-")))
    }
    fn key(&self, prefix: &Prefix, i: &Instance) -> Key {
        Key::Fixed(join(prefix.as_str(), &format!("{}/{}", i.service.as_str().replace('/', "-"), node_id(i))))
    }
    fn value(&self, i: &Instance) -> Vec<u8> {
        let mut metadata: BTreeMap<&str, &str> = i.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        metadata.entry("protocol").or_insert(i.options.protocol.as_deref().unwrap_or("grpc"));
        let v = Value {
            name: i.service.as_str(),
            version: i.options.version.as_deref().unwrap_or("latest"),
            metadata: None,
            endpoints: [],
            nodes: [Node { id: node_id(i), address: i.addr(), metadata }],
        };
        serde_json::to_vec(&v).expect("serializes")
    }
}
