//! go.etcd.io/etcd/client/v3/naming/endpoints: key `<svc>/<addr>`, value an `endpoints.Update`
//! (`{"Op":0,"Addr":…,"Metadata":null}`). Metadata stays null: some grpc-go resolver
//! versions panic on object metadata.

use super::{FormatOptions, Instance, Key, Layout, join};
use crate::validate::{Prefix, ServiceName};

pub struct EtcdNaming;

impl Layout for EtcdNaming {
    fn default_prefix(&self) -> &'static str {
        ""
    }
    fn service_prefix(&self, prefix: &Prefix, service: &ServiceName, _: &str, _: &FormatOptions) -> String {
        // endpoints.NewWatchChannel reads the target with no trailing slash.
        join(prefix.as_str(), service.as_str())
    }
    fn key(&self, prefix: &Prefix, i: &Instance) -> Key {
        Key::Fixed(join(prefix.as_str(), &format!("{}/{}", i.service, i.addr())))
    }
    fn value(&self, i: &Instance) -> Vec<u8> {
        format!(r#"{{"Op":0,"Addr":{},"Metadata":null}}"#, serde_json::to_string(&i.addr()).unwrap()).into_bytes()
    }
}
