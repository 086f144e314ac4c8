//! The grammar of every string that reaches an etcd key or value, and the key space podlease
//! may write in.
//!
//! Who can create a pod sets its annotations, and who can create a ServiceRegistration sets
//! its spec: both are untrusted. podlease writes into a shared etcd with its own credentials,
//! so nothing they write may place a key outside the prefixes the cluster admin allowed, or a
//! malformed key or value anywhere (every consumer splits keys on `/`; etcd resolves no `..`).
//! The CRD's schema rejects what it can before a registration is stored (the patterns below
//! are shared with it); the controller validates everything again, because annotations have
//! no schema and a CRD can be applied without its schema.
//!
//! The grammar (the README repeats it):
//!
//! | what | grammar |
//! |---|---|
//! | label | DNS-1123: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters |
//! | service name | labels joined by `.`; etcd-naming and go-zero (whose consumers take a path) also join by `/`; at most 253 characters |
//! | prefix | empty, `/`, or segments of `[A-Za-z0-9._-]` (none `.` or `..`) joined by single `/`, with or without a leading `/` (one trailing `/` is dropped); at most 256 characters |
//! | zone (skydns) | labels joined by `.` (one trailing `.` allowed); `<service>.<namespace>.<zone>` at most 253 characters |
//! | version | `[A-Za-z0-9._+-]`, at most 128 characters |
//! | protocol | a URI scheme, `[a-z][a-z0-9+.-]*`, at most 32 characters |
//! | port name | an IANA service name, as Kubernetes requires of container ports: `[a-z0-9-]`, at most 15, a letter, no `-` at either end or twice in a row |
//! | metadata | at most 64 entries; keys are Kubernetes label keys; values at most 4 KiB without control characters; keys and values together at most 16 KiB |
//! | metadataFromLabels | at most 32 label keys |
//! | any key written | at most 2 KiB, no whitespace or control character, no empty, `.` or `..` segment, under its prefix, not under podlease's owner prefix nor under another allowed prefix nested in its own |
//! | any value written | at most 64 KiB (etcd refuses requests above 1.5 MiB) |

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::format::Format;

pub const MAX_LABEL: usize = 63;
pub const MAX_SERVICE: usize = 253;
pub const MAX_PREFIX: usize = 256;
pub const MAX_VERSION: usize = 128;
pub const MAX_PROTOCOL: usize = 32;
pub const MAX_PORT_NAME: usize = 15;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_VALUE: usize = 4 * 1024;
/// Keys and values of the static metadata together; also the most the raw
/// `podlease.io/metadata` annotation may hold.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
pub const MAX_LABEL_KEYS: usize = 32;
/// A Kubernetes label key: an optional DNS subdomain prefix (253), `/`, and a name (63).
pub const MAX_LABEL_KEY: usize = 253 + 1 + 63;
pub const MAX_KEY: usize = 2 * 1024;
pub const MAX_VALUE: usize = 64 * 1024;

/// OpenAPI patterns (RE2 syntax, as the API server evaluates them) for the CRD schema. The
/// controller's own checks below are the same grammar, written out by hand.
pub mod pattern {
    const LABEL: &str = "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?";
    /// Labels joined by `.` or `/` (the union over formats; the controller narrows it per format).
    pub fn service() -> String {
        format!("^{LABEL}([./]{LABEL})*$")
    }
    /// A segment of `[A-Za-z0-9._-]` that is neither `.` nor `..`.
    const SEGMENT: &str = r"([A-Za-z0-9_-]|\.[A-Za-z0-9_-]|\.\.[A-Za-z0-9._-])[A-Za-z0-9._-]*";
    pub fn prefix() -> String {
        format!("^(/|/?{SEGMENT}(/{SEGMENT})*/?)?$")
    }
    pub fn zone() -> String {
        format!(r"^({LABEL}(\.{LABEL})*\.?)?$")
    }
    pub const VERSION: &str = r"^[A-Za-z0-9._+-]*$";
    pub const PROTOCOL: &str = r"^([a-z][a-z0-9+.-]*)?$";
    /// A Kubernetes label key (qualified name).
    pub fn label_key() -> String {
        format!(r"^({LABEL}(\.{LABEL})*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$")
    }
}

/// How much of a value a message shows.
const SHOWN: usize = 64;

/// A string shown in a message: quoted, escaped, and cut after 64 bytes so a hostile
/// 256 KiB value never ends up whole in an Event, a condition or a log line.
pub fn shown(s: &str) -> String {
    if s.len() <= SHOWN { format!("{s:?}") } else { format!("{:?}… ({} bytes)", &s[..floor(s, SHOWN)], s.len()) }
}

/// The first 64 bytes of `s` (with `…` when cut), for error values printed with `{:?}`.
pub fn cut(s: &str) -> String {
    if s.len() <= SHOWN { s.to_string() } else { format!("{}…", &s[..floor(s, SHOWN)]) }
}

/// The largest char boundary of `s` at or below `i`.
pub fn floor(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn has_control_or_space(s: &str) -> bool {
    s.chars().any(|c| c.is_control() || c.is_whitespace())
}

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn label_error(l: &str) -> String {
    format!(
        "{} is not a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit, at most {MAX_LABEL} characters)",
        shown(l)
    )
}

/// Whether `format`'s consumers take a path as the service name (`/` joins its labels).
pub fn takes_paths(format: Format) -> bool {
    matches!(format, Format::EtcdNaming | Format::GoZero)
}

/// A service name valid for the format it was checked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

impl ServiceName {
    pub fn parse(s: &str, format: Format) -> Result<ServiceName, String> {
        if s.is_empty() {
            return Err("a service name may not be empty".into());
        }
        if s.len() > MAX_SERVICE {
            return Err(format!("a service name is at most {MAX_SERVICE} characters"));
        }
        if has_control_or_space(s) {
            return Err("a service name may not contain whitespace or control characters".into());
        }
        if s.split('/').any(|seg| seg == "." || seg == "..") {
            return Err("a service name may not have \".\" or \"..\" segments".into());
        }
        if s.contains('/') && !takes_paths(format) {
            return Err(format!("format {format} takes no '/' in a service name (only etcd-naming and go-zero take paths); join labels with '.'"));
        }
        for segment in s.split('/') {
            if segment.is_empty() {
                return Err("a service name may not start or end with '/' or have an empty segment".into());
            }
            for label in segment.split('.') {
                if label.is_empty() {
                    return Err("a service name may not start or end with '.' or have an empty label".into());
                }
                if !is_label(label) {
                    return Err(label_error(label));
                }
            }
        }
        Ok(ServiceName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A normalized key prefix: empty (keys without a leading slash, as etcd-naming and go-zero
/// write them), `/`, or clean segments with or without a leading `/`, never a trailing one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix(String);

impl Prefix {
    pub fn parse(s: &str) -> Result<Prefix, String> {
        if s.len() > MAX_PREFIX {
            return Err(format!("a prefix is at most {MAX_PREFIX} characters"));
        }
        if s.is_empty() || s == "/" {
            return Ok(Prefix(s.to_string()));
        }
        let absolute = s.starts_with('/');
        let body = s.strip_prefix('/').unwrap_or(s);
        let body = body.strip_suffix('/').unwrap_or(body);
        for seg in body.split('/') {
            if seg.is_empty() {
                return Err("a prefix may not have an empty segment (\"//\")".into());
            }
            if seg == "." || seg == ".." {
                return Err("a prefix may not have \".\" or \"..\" segments".into());
            }
            if let Some(c) = seg.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
                return Err(format!("a prefix segment holds only letters, digits, '.', '_' and '-', not {c:?}"));
            }
        }
        Ok(Prefix(if absolute { format!("/{body}") } else { body.to_string() }))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `path` is this prefix or lies below it (segment-wise: `/a` covers `/a/b`, not
    /// `/ab`; the empty prefix covers every key without a leading slash, `/` every key with one).
    pub fn covers(&self, path: &str) -> bool {
        match self.0.as_str() {
            "" => !path.starts_with('/'),
            "/" => path.starts_with('/'),
            p => path == p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/')),
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Prefix::parse(s).map_err(|e| format!("prefix {}: {e}", shown(s)))
    }
}

/// A skydns zone, without its trailing dot; `<service>.<namespace>.<zone>` must be a DNS name.
pub fn zone(zone: &str, service: &ServiceName, namespace: &str) -> Result<String, String> {
    if zone.len() > MAX_SERVICE {
        return Err(format!("a zone is at most {MAX_SERVICE} characters"));
    }
    let z = zone.strip_suffix('.').unwrap_or(zone);
    for label in z.split('.') {
        if !is_label(label) {
            return Err(if label.is_empty() { "a zone may not have an empty label".into() } else { label_error(label) });
        }
    }
    let name = service.as_str().len() + 1 + namespace.len() + 1 + z.len();
    if name > MAX_SERVICE {
        return Err(format!("the DNS name <service>.<namespace>.<zone> is {name} characters; at most {MAX_SERVICE}"));
    }
    Ok(z.to_string())
}

pub fn version(s: &str) -> Result<(), String> {
    if s.len() > MAX_VERSION {
        return Err(format!("a version is at most {MAX_VERSION} characters"));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'))) {
        return Err(format!("a version holds only letters, digits, '.', '_', '+' and '-', not {c:?}"));
    }
    Ok(())
}

pub fn protocol(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_PROTOCOL
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'+' | b'.' | b'-'));
    if ok { Ok(()) } else { Err(format!("a protocol is a URI scheme: [a-z][a-z0-9+.-]*, at most {MAX_PROTOCOL} characters")) }
}

/// A container port name as Kubernetes allows it (IANA_SVC_NAME): anything else can never
/// match a declared port.
pub fn port_name(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_PORT_NAME
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a port is a number in 1..65535 or a container port name (lowercase letters, digits and '-', at most {MAX_PORT_NAME}, with a letter)"
        ))
    }
}

/// A Kubernetes label key: `[prefix/]name`, prefix a DNS subdomain, name at most 63 of
/// `[A-Za-z0-9._-]` starting and ending alphanumeric.
pub fn label_key(s: &str) -> Result<(), String> {
    let bad = || Err(format!("{} is not a label key ([DNS subdomain/]name, name at most 63 of [A-Za-z0-9._-])", shown(s)));
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix
        && (p.len() > MAX_SERVICE || !p.split('.').all(is_label))
    {
        return bad();
    }
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_LABEL
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if ok { Ok(()) } else { bad() }
}

/// Static metadata: bounded in count and size, keys are label keys, values hold no control
/// characters.
pub fn metadata(m: &BTreeMap<String, String>) -> Result<(), String> {
    if m.len() > MAX_METADATA_ENTRIES {
        return Err(format!("{} entries; at most {MAX_METADATA_ENTRIES}", m.len()));
    }
    let mut total = 0;
    for (k, v) in m {
        label_key(k).map_err(|e| format!("key {e}"))?;
        if v.len() > MAX_METADATA_VALUE {
            return Err(format!("the value of {} is {} bytes; at most {MAX_METADATA_VALUE}", shown(k), v.len()));
        }
        if v.chars().any(char::is_control) {
            return Err(format!("the value of {} contains a control character", shown(k)));
        }
        total += k.len() + v.len();
    }
    if total > MAX_METADATA_BYTES {
        return Err(format!("keys and values hold {total} bytes; at most {MAX_METADATA_BYTES}"));
    }
    Ok(())
}

pub fn label_keys(keys: &[String]) -> Result<(), String> {
    if keys.len() > MAX_LABEL_KEYS {
        return Err(format!("{} label keys; at most {MAX_LABEL_KEYS}", keys.len()));
    }
    keys.iter().try_for_each(|k| label_key(k))
}

/// A namespace (DNS-1123 label) or pod name (DNS-1123 subdomain), as the API server
/// validates them: checked again because they are part of keys.
pub fn object_name(s: &str, subdomain: bool) -> Result<(), String> {
    let ok = if subdomain { !s.is_empty() && s.len() <= MAX_SERVICE && s.split('.').all(is_label) } else { is_label(s) };
    if ok { Ok(()) } else { Err(format!("{} is not a valid Kubernetes name", shown(s))) }
}

/// One entry of the admin's allowlist: a prefix for one format, or for all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedPrefix {
    pub format: Option<Format>,
    pub prefix: Prefix,
}

impl FromStr for AllowedPrefix {
    type Err = String;
    /// `PREFIX` (every format) or `FORMAT=PREFIX`, e.g. `/services/team-a`, `json=/services`,
    /// `etcd-naming=` (the empty prefix, for one format).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (format, prefix) = match s.split_once('=') {
            Some((f, p)) => (Some(f.trim().parse::<Format>()?), p.trim()),
            None => (None, s.trim()),
        };
        Ok(AllowedPrefix { format, prefix: prefix.parse()? })
    }
}

impl fmt::Display for AllowedPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.format {
            Some(format) => write!(f, "{format}={}", self.prefix.as_str()),
            None => f.write_str(self.prefix.as_str()),
        }
    }
}

/// Where podlease may write: the admin's allowed prefixes (flags and chart values, never a
/// registration or an annotation), minus the owner prefix it keeps for its own records.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySpace {
    allowed: Vec<AllowedPrefix>,
    owner: Prefix,
}

impl KeySpace {
    /// Each format's own prefix, for that format only; `default_prefix` too for `default_format`.
    pub fn default_allowlist(default_format: Format, default_prefix: Option<&Prefix>) -> Vec<AllowedPrefix> {
        let mut out: Vec<AllowedPrefix> = Format::ALL
            .iter()
            .map(|f| AllowedPrefix { format: Some(*f), prefix: Prefix(f.layout().default_prefix().to_string()) })
            .collect();
        if let Some(p) = default_prefix {
            out.push(AllowedPrefix { format: Some(default_format), prefix: p.clone() });
        }
        out
    }

    /// Refuses an owner prefix that is not absolute, and allowed prefixes inside it.
    pub fn new(allowed: Vec<AllowedPrefix>, owner: Prefix) -> Result<KeySpace, String> {
        if !owner.as_str().starts_with('/') || owner.as_str() == "/" {
            return Err(format!("the owner prefix {owner} must be absolute and not \"/\""));
        }
        if let Some(a) = allowed.iter().find(|a| owner.covers(a.prefix.as_str())) {
            return Err(format!("the allowed prefix {} lies inside the owner prefix {owner}, which only podlease writes", a.prefix));
        }
        Ok(KeySpace { allowed, owner })
    }

    pub fn allowed(&self) -> &[AllowedPrefix] {
        &self.allowed
    }

    pub fn owner(&self) -> &Prefix {
        &self.owner
    }

    /// Whether a registration or annotated pod of `format` may use `prefix`.
    pub fn permit(&self, format: Format, prefix: &Prefix) -> Result<(), String> {
        if self.owner.covers(prefix.as_str()) {
            return Err(format!("prefix {prefix} lies inside podlease's owner prefix {}", self.owner));
        }
        let mine = || self.allowed.iter().filter(|a| a.format.is_none_or(|f| f == format));
        if mine().any(|a| a.prefix == *prefix) {
            return Ok(());
        }
        let list: Vec<String> = mine().map(|a| format!("{}", a.prefix)).collect();
        Err(format!(
            "prefix {prefix} is not allowed for format {format}; the cluster admin allows {} (podlease --allowed-prefix, chart value allowedPrefixes)",
            if list.is_empty() { "none".to_string() } else { list.join(", ") }
        ))
    }

    /// The last check of every key (and read prefix) before it can be written: well formed,
    /// below `prefix`, not in the owner prefix, not in another allowed prefix nested inside
    /// `prefix` (the empty prefix must not reach into `kitex/registry-etcd`).
    pub fn check_key(&self, prefix: &Prefix, key: &str) -> Result<(), String> {
        if key.len() > MAX_KEY {
            return Err(format!("key {} is longer than {MAX_KEY} bytes", shown(key)));
        }
        if has_control_or_space(key) {
            return Err(format!("key {} contains whitespace or a control character", shown(key)));
        }
        let body = key.strip_prefix('/').unwrap_or(key);
        if body.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(format!("key {} has an empty, \".\" or \"..\" segment", shown(key)));
        }
        if key == prefix.as_str() || !prefix.covers(key) {
            return Err(format!("key {} is not below its prefix {prefix}", shown(key)));
        }
        if self.owner.covers(key) {
            return Err(format!("key {} lies inside podlease's owner prefix {}", shown(key), self.owner));
        }
        if let Some(other) = self.allowed.iter().find(|a| a.prefix != *prefix && prefix.covers(a.prefix.as_str()) && a.prefix.covers(key)) {
            return Err(format!("key {} lies inside {}, another allowed prefix; use that prefix or another name", shown(key), other.prefix));
        }
        Ok(())
    }
}

impl Default for KeySpace {
    fn default() -> Self {
        KeySpace::new(KeySpace::default_allowlist(Format::Json, None), Prefix("/podlease/owners".into())).expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests;
