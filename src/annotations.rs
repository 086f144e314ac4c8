//! Annotation mode: `podlease.io/service` on a pod publishes it with the controller's
//! defaults, overridable per pod by the other `podlease.io/` annotations.
//!
//! Parsing here reads the values (numbers, the format, the metadata JSON) and bounds their
//! size; `desired` validates what reaches a key or value with the same grammar as a
//! ServiceRegistration's spec ([`crate::validate`]).

use std::collections::BTreeMap;

use crate::small::SmallMap;

use thiserror::Error;

use crate::format::{Format, FormatOptions};
use crate::registration::{MAX_TTL_SECONDS, MIN_TTL_SECONDS};
use crate::validate::{self, cut};

pub const ANNOTATION_PREFIX: &str = "podlease.io/";
pub const SERVICE: &str = "podlease.io/service";
pub const PORT: &str = "podlease.io/port";
pub const FORMAT: &str = "podlease.io/format";
pub const PREFIX: &str = "podlease.io/prefix";
pub const TTL: &str = "podlease.io/ttl";
pub const METADATA: &str = "podlease.io/metadata";
pub const VERSION: &str = "podlease.io/version";
pub const PROTOCOL: &str = "podlease.io/protocol";
pub const WEIGHT: &str = "podlease.io/weight";
pub const ZONE: &str = "podlease.io/zone";
pub const DNS_TTL: &str = "podlease.io/dns-ttl";

/// Every annotation podlease reads; a pod keeps no other.
pub const ALL: [&str; 11] = [SERVICE, PORT, FORMAT, PREFIX, TTL, METADATA, VERSION, PROTOCOL, WEIGHT, ZONE, DNS_TTL];

/// The longest value podlease accepts for annotation `key`: the metadata limit for
/// `podlease.io/metadata`, 1 KiB for the others (whose grammars allow at most 256
/// characters). A pod's copy keeps at most one byte more (see [`crate::pod`]), so a pod
/// with a 256 KiB annotation costs a bounded amount of memory and is still refused as
/// too long.
pub fn max_len(key: &str) -> usize {
    if key == METADATA { validate::MAX_METADATA_BYTES } else { 1024 }
}

/// A container port by name or number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortRef {
    Number(i32),
    Name(String),
}

impl PortRef {
    pub fn parse(s: &str) -> PortRef {
        match s.parse::<i32>() {
            Ok(n) => PortRef::Number(n),
            Err(_) => PortRef::Name(s.to_string()),
        }
    }
}

/// What a pod's annotations ask for (unset fields fall back to the controller's defaults).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AnnotationSpec {
    pub service: String,
    pub port: Option<PortRef>,
    pub format: Option<Format>,
    pub prefix: Option<String>,
    pub ttl: Option<i64>,
    pub metadata: BTreeMap<String, String>,
    pub options: FormatOptions,
}

#[derive(Debug, Error, PartialEq)]
pub enum AnnotationError {
    #[error("annotation {SERVICE} is empty")]
    EmptyService,
    #[error("annotation {PORT}={0:?} is not a port name or a number in 1..65535")]
    Port(String),
    #[error("annotation {FORMAT}: {0}")]
    Format(String),
    #[error("annotation {TTL}={0:?} is not a number of seconds in {MIN_TTL_SECONDS}..{MAX_TTL_SECONDS}")]
    Ttl(String),
    #[error("annotation {METADATA} is not a JSON object of strings: {0}")]
    Metadata(String),
    #[error("annotation {0}={1:?} is not a non-negative number")]
    Number(&'static str, String),
    #[error("annotation {0} is longer than {1} bytes")]
    TooLong(&'static str, usize),
}

/// Reads the annotation spec of a pod: `Ok(None)` when it has no `podlease.io/service`.
pub fn parse(annotations: &SmallMap<String, String>) -> Result<Option<AnnotationSpec>, AnnotationError> {
    let Some(service) = annotations.get(SERVICE) else {
        return Ok(None);
    };
    // Sizes first: nothing below reads more than a bounded value.
    for name in ALL {
        if annotations.get(name).is_some_and(|v| v.len() > max_len(name)) {
            return Err(AnnotationError::TooLong(name, max_len(name)));
        }
    }
    let service = service.trim();
    if service.is_empty() {
        return Err(AnnotationError::EmptyService);
    }
    let port = match annotations.get(PORT).map(|s| s.trim()) {
        None => None,
        Some(s) => match PortRef::parse(s) {
            PortRef::Number(n) if !(1..=65535).contains(&n) => return Err(AnnotationError::Port(cut(s))),
            PortRef::Name(n) if validate::port_name(&n).is_err() => return Err(AnnotationError::Port(cut(s))),
            p => Some(p),
        },
    };
    let format = annotations
        .get(FORMAT)
        .map(|s| s.trim().parse::<Format>().map_err(AnnotationError::Format))
        .transpose()?;
    let ttl = annotations
        .get(TTL)
        .map(|s| {
            s.trim()
                .trim_end_matches('s')
                .parse::<i64>()
                .ok()
                .filter(|t| (MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(t))
                .ok_or_else(|| AnnotationError::Ttl(cut(s)))
        })
        .transpose()?;
    let metadata = match annotations.get(METADATA) {
        None => BTreeMap::new(),
        Some(s) => serde_json::from_str::<BTreeMap<String, String>>(s).map_err(|e| AnnotationError::Metadata(e.to_string()))?,
    };
    let number = |name: &'static str| -> Result<Option<u32>, AnnotationError> {
        annotations
            .get(name)
            .map(|s| s.trim().parse::<u32>().map_err(|_| AnnotationError::Number(name, cut(s))))
            .transpose()
    };
    let text = |name: &str| annotations.get(name).map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let options = FormatOptions {
        version: text(VERSION),
        protocol: text(PROTOCOL),
        weight: number(WEIGHT)?.map(|w| w.min(i32::MAX as u32) as i32),
        zone: text(ZONE),
        dns_ttl: number(DNS_TTL)?.filter(|t| *t > 0),
    };
    Ok(Some(AnnotationSpec {
        service: service.to_string(),
        port,
        format,
        prefix: annotations.get(PREFIX).map(|s| s.trim().to_string()),
        ttl,
        metadata,
        options,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> SmallMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn no_service_annotation_means_not_annotated() {
        assert_eq!(parse(&ann(&[(PORT, "80")])), Ok(None));
    }

    #[test]
    fn every_override_is_read() {
        let spec = parse(&ann(&[
            (SERVICE, "user.rpc"),
            (PORT, "grpc"),
            (FORMAT, "go-zero"),
            (PREFIX, "/x"),
            (TTL, "10"),
            (METADATA, r#"{"zone":"a"}"#),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(spec.service, "user.rpc");
        assert_eq!(spec.port, Some(PortRef::Name("grpc".into())));
        assert_eq!(spec.format, Some(Format::GoZero));
        assert_eq!(spec.prefix.as_deref(), Some("/x"));
        assert_eq!(spec.ttl, Some(10));
        assert_eq!(spec.metadata.get("zone").map(String::as_str), Some("a"));
    }

    #[test]
    fn format_options_come_from_their_own_annotations() {
        let spec = parse(&ann(&[(SERVICE, "s"), (VERSION, "v1"), (PROTOCOL, "http"), (WEIGHT, "3"), (ZONE, "corp"), (DNS_TTL, "7")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            spec.options,
            FormatOptions { version: Some("v1".into()), protocol: Some("http".into()), weight: Some(3), zone: Some("corp".into()), dns_ttl: Some(7) }
        );
        assert_eq!(parse(&ann(&[(SERVICE, "s"), (WEIGHT, "-1")])), Err(AnnotationError::Number(WEIGHT, "-1".into())));
    }

    #[test]
    fn bad_values_are_reported_with_the_annotation_name() {
        let e = parse(&ann(&[(SERVICE, "s"), (TTL, "2")])).unwrap_err();
        assert!(e.to_string().contains("podlease.io/ttl=\"2\""), "{e}");
        let e = parse(&ann(&[(SERVICE, "s"), (FORMAT, "zk")])).unwrap_err();
        assert!(e.to_string().contains("expected one of json"), "{e}");
        let e = parse(&ann(&[(SERVICE, "s"), (METADATA, r#"{"a":1}"#)])).unwrap_err();
        assert!(matches!(e, AnnotationError::Metadata(_)));
        assert_eq!(parse(&ann(&[(SERVICE, "s"), (PORT, "70000")])), Err(AnnotationError::Port("70000".into())));
        assert_eq!(parse(&ann(&[(SERVICE, " ")])), Err(AnnotationError::EmptyService));
    }

    #[test]
    fn values_are_bounded_before_they_are_read() {
        let huge = "x".repeat(256 * 1024);
        assert_eq!(parse(&ann(&[(SERVICE, "s"), (METADATA, &huge)])), Err(AnnotationError::TooLong(METADATA, 16384)));
        assert_eq!(parse(&ann(&[(SERVICE, &huge)])), Err(AnnotationError::TooLong(SERVICE, 1024)));
        let e = parse(&ann(&[(SERVICE, "s"), (TTL, &"9".repeat(1000))])).unwrap_err().to_string();
        assert!(e.len() < 200, "the message quotes a bounded part of the value: {e}");
    }

    #[test]
    fn port_names_follow_the_container_port_grammar() {
        assert_eq!(parse(&ann(&[(SERVICE, "s"), (PORT, "grpc-web")])).unwrap().unwrap().port, Some(PortRef::Name("grpc-web".into())));
        for bad in ["a/b", "GRPC", "a b", "-x", "toolongportname1"] {
            assert_eq!(parse(&ann(&[(SERVICE, "s"), (PORT, bad)])), Err(AnnotationError::Port(bad.into())), "{bad}");
        }
    }
}
