//! The docs say what the binary does: the README's `podlease run` flags table lists exactly
//! the flags `podlease run --help` has, each with the environment variable clap reads for
//! it, and every default clap applies. Pure: runs the built binary's `--help`, no test bed.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// One option of `--help`: its environment variable and default, as clap prints them.
#[derive(Debug, Default, PartialEq)]
struct Flag {
    env: Option<String>,
    default: Option<String>,
}

/// `podlease run --help`, with an empty environment (clap shows the value of a set variable
/// beside its name; nothing here may depend on the caller's environment).
fn run_help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_podlease")).args(["run", "--help"]).env_clear().output().expect("podlease runs");
    assert!(out.status.success(), "podlease run --help failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// Every long option of the help text with its `[env: …]` and `[default: …]`.
fn help_flags(help: &str) -> BTreeMap<String, Flag> {
    // An option's own line: indented less than its description, `-x, ` then `--name`.
    let header = regex::Regex::new(r"^ {1,8}(?:-[A-Za-z], )?--([a-z0-9][a-z0-9-]*)").unwrap();
    let env = regex::Regex::new(r"\[env: ([A-Za-z0-9_]+)=[^\]]*\]").unwrap();
    let default = regex::Regex::new(r"\[default: ([^\]]*)\]").unwrap();
    // An option's description runs until the next option (or the end).
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        if let Some(c) = header.captures(line) {
            blocks.push((c[1].to_string(), line[c.get(0).unwrap().end()..].to_string()));
        } else if let Some((_, text)) = blocks.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    let mut flags = BTreeMap::new();
    for (flag, text) in blocks {
        if flag == "help" || flag == "version" {
            continue;
        }
        let f = Flag { env: env.captures(&text).map(|c| c[1].to_string()), default: default.captures(&text).map(|c| c[1].to_string()) };
        assert!(flags.insert(flag.clone(), f).is_none(), "--{flag} twice in the help");
    }
    flags
}

/// One row of the README's table: the flags of its first cell (each with the variable in
/// brackets after it, if any) and the backticked values of its default cell.
#[derive(Debug)]
struct Row {
    line: usize,
    flags: Vec<(String, Option<String>)>,
    default_cell: String,
    defaults: Vec<String>,
}

/// The rows of the table that follows "`podlease run` flags" in the README.
fn readme_rows(readme: &str) -> Vec<Row> {
    let flag = regex::Regex::new(r"`--([a-z0-9][a-z0-9-]*)`(?:\s*\[`([A-Za-z0-9_]+)`\])?").unwrap();
    let ticked = regex::Regex::new(r"`([^`]*)`").unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let start = lines.iter().position(|l| l.starts_with("`podlease run` flags")).expect("the README has a `podlease run` flags table");
    let mut rows = Vec::new();
    let mut in_table = false;
    for (i, line) in lines.iter().enumerate().skip(start + 1) {
        if !line.starts_with('|') {
            if in_table {
                break; // the table ends at its first line that is not a row
            }
            assert!(line.trim().is_empty(), "README line {}: expected the table, found {line:?}", i + 1);
            continue;
        }
        in_table = true;
        let cells: Vec<&str> = line.split('|').collect();
        assert_eq!(cells.len(), 5, "README line {}: a row of three cells: {line:?}", i + 1);
        let (first, default) = (cells[1].trim(), cells[2].trim());
        if first == "flag" || first.starts_with("---") {
            continue; // header and separator
        }
        let flags: Vec<(String, Option<String>)> = flag.captures_iter(first).map(|c| (c[1].to_string(), c.get(2).map(|m| m.as_str().to_string()))).collect();
        assert!(!flags.is_empty(), "README line {}: no flag in {first:?}", i + 1);
        let defaults = ticked.captures_iter(default).map(|c| c[1].to_string()).collect();
        rows.push(Row { line: i + 1, flags, default_cell: default.to_string(), defaults });
    }
    rows
}

/// What is wrong with the table against the help (empty: nothing).
fn table_errors(readme: &str, help: &str) -> Vec<String> {
    let help = help_flags(help);
    let rows = readme_rows(readme);
    let mut errors = Vec::new();
    let mut listed: BTreeSet<String> = BTreeSet::new();
    for row in &rows {
        for (name, env) in &row.flags {
            if !listed.insert(name.clone()) {
                errors.push(format!("line {}: --{name} is listed twice", row.line));
            }
            let Some(f) = help.get(name) else {
                errors.push(format!("line {}: --{name} is not a flag of `podlease run`", row.line));
                continue;
            };
            if env != &f.env {
                errors.push(format!("line {}: --{name} reads {:?} from the environment, the table says {:?}", row.line, f.env, env));
            }
            if let Some(d) = &f.default
                && !row.defaults.contains(d)
            {
                errors.push(format!("line {}: --{name} defaults to `{d}`, the table's default is {:?}", row.line, row.default_cell));
            }
        }
        // A lone value is read as the default: it must be the one clap applies.
        if let ([(name, _)], [value]) = (&row.flags[..], &row.defaults[..])
            && row.default_cell == format!("`{value}`")
            && help.get(name).is_some_and(|f| f.default.is_none())
        {
            errors.push(format!("line {}: --{name} has no default `{value}` (the table says it has)", row.line));
        }
    }
    for name in help.keys().filter(|n| !listed.contains(*n)) {
        errors.push(format!("--{name} is a flag of `podlease run` the table does not list"));
    }
    errors
}

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

#[test]
fn the_readme_lists_exactly_the_flags_of_podlease_run_with_their_variables_and_defaults() {
    let help = run_help();
    let flags = help_flags(&help);
    assert!(flags.len() > 20 && flags.contains_key("etcd-endpoints") && flags.contains_key("log-level"), "the help was not read: {flags:#?}");
    assert_eq!(flags["default-ttl"], Flag { env: Some("PODLEASE_DEFAULT_TTL".into()), default: Some("30".into()) });
    let errors = table_errors(&readme(), &help);
    assert!(errors.is_empty(), "README's `podlease run` flags table against `podlease run --help`:\n{}", errors.join("\n"));
}

/// The check itself fails on each kind of drift: a row left out, a flag the binary does not
/// have, a wrong variable, a wrong default.
#[test]
fn the_flags_table_check_finds_each_kind_of_drift() {
    let help = run_help();
    let readme = readme();
    assert!(table_errors(&readme, &help).is_empty(), "the README itself must pass (see the other test)");
    let row = |flag: &str| readme.lines().find(|l| l.starts_with(&format!("| `--{flag}`"))).unwrap_or_else(|| panic!("no row for --{flag}")).to_string();
    let verify = row("verify-interval");
    let drifted = [
        (readme.replace(&format!("{verify}\n"), ""), "does not list"),
        (readme.replace(&verify, "| `--verify-every` [`PODLEASE_VERIFY_INTERVAL`] | `30` | |"), "not a flag"),
        (readme.replace(&verify, &verify.replace("PODLEASE_VERIFY_INTERVAL", "PODLEASE_VERIFY")), "from the environment"),
        (readme.replace(&verify, &verify.replace("| `30` |", "| `60` |")), "defaults to `30`"),
        (readme.replace(&row("migrate-from"), &row("migrate-from").replace("| none |", "| `/podlease/owners` |")), "has no default"),
    ];
    for (text, expected) in drifted {
        let errors = table_errors(&text, &help);
        assert!(errors.iter().any(|e| e.contains(expected)), "expected an error with {expected:?}, got {errors:#?}");
    }
}

/// Every test the README's failure model names (a backticked `snake_case` name with at least
/// three words; `…` stands for a part left out) is a test function of this crate, so that a
/// renamed or deleted test cannot leave a guarantee pointing at nothing.
#[test]
fn every_test_the_failure_model_names_exists() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("**What is guaranteed").expect("the failure model's guarantees");
    let end = start + readme[start..].find("\n## ").expect("the section after the failure model");
    let named = regex::Regex::new(r"`([a-z0-9_…]+)`").unwrap();
    let mut fns = Vec::new();
    let test_fn = regex::Regex::new(r"(?m)^\s*(?:async )?fn ([a-z0-9_]+)").unwrap();
    for e in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(e.path()).unwrap();
            fns.extend(test_fn.captures_iter(&text).map(|c| c[1].to_string()));
        }
    }
    let mut cited = 0;
    let mut missing = Vec::new();
    for c in named.captures_iter(&readme[start..end]) {
        let name = &c[1];
        if name.matches('_').count() < 3 {
            continue;
        }
        cited += 1;
        let parts: Vec<&str> = name.split('…').map(|p| p.trim_matches('_')).filter(|p| !p.is_empty()).collect();
        let found = fns.iter().any(|f| {
            let mut rest = f.as_str();
            parts.iter().all(|p| match rest.find(p) {
                Some(i) => {
                    rest = &rest[i + p.len()..];
                    true
                }
                None => false,
            })
        });
        if !found {
            missing.push(name.to_string());
        }
    }
    assert!(cited >= 20, "only {cited} tests named: did the section move?");
    assert_eq!(missing, Vec::<String>::new(), "the README names tests that do not exist");
}
