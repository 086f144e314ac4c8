//! Is the ServiceRegistration CRD installed, and is it this version's? (Helm installs a
//! chart's CRDs but never upgrades them.)

use kube::Client;

use crate::kubernetes::crd::{self, Installed};

use super::{Finding, KUBE_TIMEOUT};

const CHECK: &str = "crd";
const APPLY: &str = "podlease crd | kubectl apply -f -";

/// The finding, and whether ServiceRegistrations can exist (so their TTLs can be listed).
pub async fn check(client: &Client) -> (Finding, bool) {
    let name = crd::name();
    match tokio::time::timeout(KUBE_TIMEOUT, crd::installed(client)).await {
        Err(_) => (Finding::fail(CHECK, format!("reading the CRD {name} did not answer within {KUBE_TIMEOUT:?}"), "check the API server"), false),
        Ok(Err(e)) => (Finding::fail(CHECK, format!("cannot read the CRD {name}: {e}"), "grant get on it (see the rbac line), or check the API server"), false),
        Ok(Ok(Installed::Absent)) => (
            Finding::warn(CHECK, format!("the CRD {name} is not installed: annotated pods are published, ServiceRegistrations cannot exist"), format!("to use ServiceRegistrations: {APPLY}")),
            false,
        ),
        Ok(Ok(Installed::Current)) => (Finding::ok(CHECK, format!("the CRD {name} is installed and is this version's")), true),
        Ok(Ok(Installed::Differs(d))) => (
            Finding::fail(CHECK, format!("the installed CRD {name} is not this version's ({d}): the API server enforces that one, so fields this podlease reads or writes may be pruned or refused"), format!("{APPLY} (Helm does not upgrade CRDs)")),
            true,
        ),
    }
}
