//! The ServiceRegistration CRD as the cluster has it: absent (annotation mode only), the one
//! this binary generates, or another one: Helm installs a chart's CRDs but never upgrades
//! them, so after `helm upgrade` an older schema may still be what the API server enforces.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client, CustomResourceExt};
use serde_json::Value;

use crate::registration::ServiceRegistration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// No such CRD object: no ServiceRegistration can exist.
    Absent,
    /// Exactly what `podlease crd` prints (for the parts the API server enforces).
    Current,
    /// Installed, but not as this binary generates it; says what differs.
    Differs(String),
}

/// The CRD's name, `serviceregistrations.podlease.io`.
pub fn name() -> String {
    ServiceRegistration::crd_name().to_string()
}

/// Reads the installed CRD (RBAC: `get` on customresourcedefinitions/<name>, nothing else).
/// The read is authoritative, unlike a 404 from listing the resource, which an API server
/// that is still loading its CRDs also answers.
pub async fn installed(client: &Client) -> Result<Installed, kube::Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    Ok(match api.get_opt(&name()).await? {
        None => Installed::Absent,
        Some(crd) => match differences(&ServiceRegistration::crd(), &crd) {
            None => Installed::Current,
            Some(d) => Installed::Differs(d),
        },
    })
}

/// What the API server enforces differently from `want`, or None. Compares each of our
/// versions' schema, subresources, printer columns and served flag, as JSON values, so key
/// order and absent-versus-empty defaults on the server's side do not count.
pub fn differences(want: &CustomResourceDefinition, have: &CustomResourceDefinition) -> Option<String> {
    let mut found = Vec::new();
    if want.spec.scope != have.spec.scope {
        found.push(format!("scope {} instead of {}", have.spec.scope, want.spec.scope));
    }
    for w in &want.spec.versions {
        let Some(h) = have.spec.versions.iter().find(|h| h.name == w.name) else {
            found.push(format!("version {} missing", w.name));
            continue;
        };
        if w.served && !h.served {
            found.push(format!("version {} not served", w.name));
        }
        let parts = [
            ("schema differs", json(&w.schema), json(&h.schema)),
            ("subresources differ", json(&w.subresources), json(&h.subresources)),
            ("printer columns differ", columns(&w.additional_printer_columns), columns(&h.additional_printer_columns)),
        ];
        for (what, a, b) in parts {
            if a != b {
                found.push(format!("version {}: {what}", w.name));
            }
        }
    }
    (!found.is_empty()).then(|| found.join("; "))
}

fn json<T: serde::Serialize>(v: &T) -> Value {
    strip_empty(serde_json::to_value(v).unwrap_or(Value::Null))
}

/// The API server defaults `priority: 0` on printer columns.
fn columns<T: serde::Serialize>(v: &T) -> Value {
    let mut v = json(v);
    if let Value::Array(cols) = &mut v {
        for c in cols {
            if let Value::Object(m) = c
                && m.get("priority") == Some(&Value::from(0))
            {
                m.remove("priority");
            }
        }
    }
    v
}

/// Nulls, empty objects and empty arrays removed: a field left out and a field sent empty
/// are the same to the API server.
fn strip_empty(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let m: serde_json::Map<String, Value> = m.into_iter().map(|(k, v)| (k, strip_empty(v))).filter(|(_, v)| !is_empty(v)).collect();
            Value::Object(m)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(strip_empty).collect()),
        v => v,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_crd_does_not_differ_from_itself() {
        let crd = ServiceRegistration::crd();
        assert_eq!(differences(&crd, &crd), None);
    }

    #[test]
    fn a_changed_schema_or_a_missing_version_is_named() {
        let want = ServiceRegistration::crd();
        let mut have = want.clone();
        let version = have.spec.versions[0].name.clone();
        let schema = have.spec.versions[0].schema.as_mut().unwrap().open_api_v3_schema.as_mut().unwrap();
        schema.properties.as_mut().unwrap().remove("spec");
        assert_eq!(differences(&want, &have), Some(format!("version {version}: schema differs")));
        have.spec.versions[0].name = "v0".into();
        assert_eq!(differences(&want, &have), Some(format!("version {version} missing")));
    }

    #[test]
    fn server_defaults_are_not_differences() {
        let want = ServiceRegistration::crd();
        let mut have = serde_json::to_value(&want).unwrap();
        for c in have["spec"]["versions"][0]["additionalPrinterColumns"].as_array_mut().into_iter().flatten() {
            c["priority"] = 0.into();
        }
        let have: CustomResourceDefinition = serde_json::from_value(have).unwrap();
        assert_eq!(differences(&want, &have), None);
    }
}
