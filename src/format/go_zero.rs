//! go-zero core/discov: key `<svc>/<lease id in decimal>`, value the plain `ip:port`.

use super::{FormatOptions, Instance, Key, Layout, join};
use crate::validate::{Prefix, ServiceName};

pub struct GoZero;

impl Layout for GoZero {
    fn default_prefix(&self) -> &'static str {
        ""
    }
    fn service_prefix(&self, prefix: &Prefix, service: &ServiceName, _: &str, _: &FormatOptions) -> String {
        // makeKeyPrefix: `<key>/`.
        join(prefix.as_str(), &format!("{service}/"))
    }
    fn key(&self, prefix: &Prefix, i: &Instance) -> Key {
        Key::LeaseSuffixed(join(prefix.as_str(), &format!("{}/", i.service)))
    }
    fn value(&self, i: &Instance) -> Vec<u8> {
        i.addr().into_bytes()
    }
}
