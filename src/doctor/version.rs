//! The etcd version rule: podlease needs 3.5.13 or later, the first 3.5 release without a
//! known bug that loses or keeps leases wrongly. Below that the doctor names the bugs the
//! member still has, from etcd's own changelogs (CHANGELOG-3.4.md, CHANGELOG-3.5.md).

use std::fmt;

use super::Finding;

/// The version podlease is tested against and needs.
pub const MINIMUM: Version = Version { major: 3, minor: 5, patch: 13 };

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    /// `3.5.30`, `v3.4.23`, `3.6.0-rc.1` (a pre-release counts as its release).
    pub fn parse(s: &str) -> Option<Version> {
        let core = s.trim().trim_start_matches('v').split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let v = Version { major: parts.next()??, minor: parts.next()??, patch: parts.next().unwrap_or(Some(0))? };
        parts.next().is_none().then_some(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A lease bug of etcd, fixed in a 3.4 and a 3.5 release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseBug {
    pub what: &'static str,
    /// etcd's pull request of the 3.5 fix.
    pub pr: u32,
    pub fixed_34: u64,
    pub fixed_35: u64,
}

/// The lease bugs fixed by 3.5.13, newest first.
pub const LEASE_BUGS: [LeaseBug; 4] = [
    LeaseBug { what: "leases wrongly revoked by the leader: an old leader's revoke is applied to leases kept alive since, so live keys vanish", pr: 17425, fixed_34: 31, fixed_35: 13 },
    LeaseBug { what: "a race between revoking leases and the revoke queue, and a lessor that keeps checkpointing after it stopped leading", pr: 14087, fixed_34: 19, fixed_35: 5 },
    LeaseBug { what: "a keepalive that arrives while its lease's grant is still being applied fails (lease not found)", pr: 13932, fixed_34: 20, fixed_35: 3 },
    LeaseBug { what: "leases' TTLs reset on every leader change, so keys of a dead podlease outlive their TTL (fixed only with --experimental-enable-lease-checkpoint-persist)", pr: 13508, fixed_34: 20, fixed_35: 2 },
];

/// The bugs of [`LEASE_BUGS`] that `v` still has (all of them before 3.4; none from 3.6).
pub fn known_lease_bugs(v: Version) -> Vec<&'static LeaseBug> {
    LEASE_BUGS
        .iter()
        .filter(|b| match (v.major, v.minor) {
            (3, 4) => v.patch < b.fixed_34,
            (3, 5) => v.patch < b.fixed_35,
            (major, minor) => (major, minor) < (3, 4),
        })
        .collect()
}

/// The finding for one member's version as it reports it.
pub fn version_finding(member: &str, reported: &str) -> Finding {
    const CHECK: &str = "etcd-version";
    let Some(v) = Version::parse(reported) else {
        return Finding::warn(CHECK, format!("{member} reports version {reported:?}, which is not a version"), format!("check that it is etcd, {MINIMUM} or later"));
    };
    if v >= MINIMUM {
        return Finding::ok(CHECK, format!("{member} runs etcd {v} (at least {MINIMUM})"));
    }
    let bugs = known_lease_bugs(v);
    if bugs.is_empty() {
        // 3.4.31+: the fixes are backported, but podlease is not tested on 3.4.
        return Finding::warn(
            CHECK,
            format!("{member} runs etcd {v}: it has the known lease fixes, but is older than {MINIMUM}, the version podlease is tested against"),
            format!("upgrade to {MINIMUM} or later"),
        );
    }
    let list: Vec<String> = bugs.iter().map(|b| format!("{} (etcd#{}, fixed in 3.5.{} and 3.4.{})", b.what, b.pr, b.fixed_35, b.fixed_34)).collect();
    Finding::fail(CHECK, format!("{member} runs etcd {v}, which has known lease bugs: {}", list.join("; ")), format!("upgrade every member to etcd {MINIMUM} or later"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn versions_parse_as_etcd_reports_them() {
        assert_eq!(v("3.5.30"), Version { major: 3, minor: 5, patch: 30 });
        assert_eq!(v("v3.4.23"), Version { major: 3, minor: 4, patch: 23 });
        assert_eq!(v("3.6.0-rc.1"), Version { major: 3, minor: 6, patch: 0 });
        assert_eq!(v("3.5"), Version { major: 3, minor: 5, patch: 0 });
        for bad in ["", "three", "3.x.1", "3.5.1.2"] {
            assert_eq!(Version::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn from_3_5_13_on_nothing_is_known_and_below_each_bug_is_named_where_it_applies() {
        for ok in ["3.5.13", "3.5.30", "3.6.0", "4.0.0"] {
            assert!(known_lease_bugs(v(ok)).is_empty(), "{ok}");
            assert_eq!(version_finding("m", ok).level, Level::Ok, "{ok}");
        }
        assert_eq!(version_finding("m", "3.5.12").level, Level::Fail);
        let prs = |s: &str| known_lease_bugs(v(s)).iter().map(|b| b.pr).collect::<Vec<_>>();
        assert_eq!(prs("3.5.12"), [17425]);
        assert_eq!(prs("3.5.4"), [17425, 14087]);
        assert_eq!(prs("3.5.0"), [17425, 14087, 13932, 13508]);
        assert_eq!(prs("3.4.23"), [17425], "Debian bookworm's etcd");
        assert_eq!(prs("3.4.19"), [17425, 13932, 13508]);
        assert_eq!(prs("3.3.27"), [17425, 14087, 13932, 13508]);
        let f = version_finding("https://e:2379", "3.4.23");
        assert_eq!(f.level, Level::Fail);
        assert!(f.found.contains("etcd#17425, fixed in 3.5.13 and 3.4.31") && f.todo.unwrap().contains("3.5.13"), "{}", f.found);
        // Backported fixes, but below the tested version: a warning.
        assert_eq!(version_finding("m", "3.4.31").level, Level::Warn);
        assert_eq!(version_finding("m", "weird").level, Level::Warn);
    }
}
