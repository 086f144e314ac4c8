//! go-zero core/discov: key `<svc>/<lease id in decimal>`, value the plain `ip:port`.

use super::{FormatOptions, Instance, Key, Layout, join};

pub struct GoZero;

impl Layout for GoZero {
    fn default_prefix(&self) -> &'static str {
        ""
    }
    fn service_prefix(&self, prefix: &str, service: &str, _: &str, _: &FormatOptions) -> String {
        // makeKeyPrefix: `<key>/`.
        join(prefix, &format!("{service}/"))
    }
    fn key(&self, prefix: &str, i: &Instance) -> Key {
        Key::LeaseSuffixed(join(prefix, &format!("{}/", i.service)))
    }
    fn value(&self, i: &Instance) -> Vec<u8> {
        i.addr().into_bytes()
    }
}
