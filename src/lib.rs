//! podlease: publishes Kubernetes pod readiness into etcd, one lease per ready pod.
//!
//! Layout: `registration` (the CRD), `annotations` and `pod` (inputs), `desired` (pure
//! desired state), `validate` (the grammar of every string that reaches etcd, and the key
//! space podlease may write in), `format` (consumer key/value layouts), `registry` (the only etcd
//! writer: leases, keepalive, ownership, adoption), `kubernetes` (watches, status, events),
//! `controller` (wiring), `etcd` and `credentials` (the connection, rotated
//! without a restart), `http` and `metrics`, `cli`, `get` and `doctor`.

pub mod annotations;
pub mod cli;
pub mod controller;
pub mod credentials;
pub mod desired;
pub mod doctor;
pub mod etcd;
pub mod failpoint;
pub mod format;
pub mod get;
pub mod http;
pub mod labels;
pub mod kubernetes;
pub mod leader;
pub mod memory;
pub mod metrics;
pub mod pod;
pub mod registration;
pub mod registry;
pub mod small;
pub mod validate;
