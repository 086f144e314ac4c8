//! go.etcd.io/etcd/client/v3/naming/endpoints: key `<svc>/<addr>`, value an `endpoints.Update`
//! (`{"Op":0,"Addr":…,"Metadata":null}`). Metadata stays null: some grpc-go resolver
//! versions panic on object metadata.

use super::{FormatOptions, Instance, Key, Layout, join};

pub struct EtcdNaming;

impl Layout for EtcdNaming {
    fn default_prefix(&self) -> &'static str {
        ""
    }
    fn service_prefix(&self, prefix: &str, service: &str, _: &str, _: &FormatOptions) -> String {
        // endpoints.NewWatchChannel reads the target with no trailing slash.
        join(prefix, service)
    }
    fn key(&self, prefix: &str, i: &Instance) -> Key {
        Key::Fixed(join(prefix, &format!("{}/{}", i.service, i.addr())))
    }
    fn value(&self, i: &Instance) -> Vec<u8> {
        format!(r#"{{"Op":0,"Addr":{},"Metadata":null}}"#, serde_json::to_string(&i.addr()).unwrap()).into_bytes()
    }
}
