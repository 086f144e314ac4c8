//! The image: the Dockerfile's build context is complete (its build stage, run on exactly the
//! files it COPYs, compiles podlease), and scripts/image.sh, which makes the image the test
//! node runs without a container engine, makes the Dockerfile's final stage.

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One Dockerfile instruction: keyword (upper case) and its arguments.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

/// The Dockerfile's stages, each a list of instructions from its FROM on.
fn stages() -> Vec<Vec<Instruction>> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    for line in text.replace("\\\n", " ").lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let i = Instruction { keyword: keyword.to_uppercase(), args: args.trim().to_string() };
        if i.keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages.last_mut().expect("the Dockerfile starts with FROM").push(i);
    }
    stages
}

/// .dockerignore's patterns (`!` exceptions kept in order, as Docker applies them).
fn dockerignore() -> Vec<(bool, regex::Regex)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (keep, pat) = match l.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, l),
            };
            let pat = pat.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/');
            // Docker's filepath.Match plus `**`; a match on a directory excludes what is in it.
            let mut re = String::from("^");
            let mut chars = pat.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '*' if chars.peek() == Some(&'*') => {
                        chars.next();
                        re.push_str(".*");
                    }
                    '*' => re.push_str("[^/]*"),
                    '?' => re.push_str("[^/]"),
                    c => re.push_str(&regex::escape(&c.to_string())),
                }
            }
            re.push_str("(/.*)?$");
            (keep, regex::Regex::new(&re).unwrap())
        })
        .collect()
}

fn ignored(rel: &str, patterns: &[(bool, regex::Regex)]) -> bool {
    let mut out = false;
    for (keep, re) in patterns {
        if re.is_match(rel) {
            out = !keep;
        }
    }
    out
}

/// Copies `src` (a path in the build context) to `dest` as Docker's COPY does: a directory's
/// contents into `dest`, a file to `dest` (or into it when `dest` ends with '/').
fn copy_into(rel: &str, dest: &Path, dest_is_dir: bool, patterns: &[(bool, regex::Regex)]) {
    let src = Path::new(ROOT).join(rel);
    assert!(src.exists(), "COPY {rel}: not in the build context");
    if src.is_dir() {
        std::fs::create_dir_all(dest).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            let child = format!("{}/{name}", rel.trim_end_matches('/'));
            if !ignored(&child, patterns) {
                copy_into(&child, &dest.join(&name), false, patterns);
            }
        }
    } else if !ignored(rel, patterns) {
        let to = if dest_is_dir { dest.join(src.file_name().unwrap()) } else { dest.to_path_buf() };
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&src, &to).unwrap();
    }
}

/// Runs the build stage on a copy of exactly what it COPYs: every COPY from the context in
/// order, and every RUN as written except what provisions the image itself (apt-get; protoc
/// is on this machine from scripts/testbed.sh) and `strip` of the output. The release
/// profile is compiled at opt-level 0 (set in a Cargo config beside the context, not in it),
/// into a target dir of its own under the project's: whether the context is complete does
/// not depend on optimisation, and an optimised build of the whole tree on a fresh clone
/// takes longer than the rest of the suite (it timed out in CI); target/release stays the
/// benches'.
#[test]
fn the_dockerfiles_build_stage_compiles_from_exactly_the_files_it_copies() {
    let stages = stages();
    assert!(stages.len() >= 2, "a build stage and a final stage");
    let build = &stages[0];
    let tmp = tempfile::Builder::new().prefix("podlease-docker-").tempdir().unwrap();
    std::fs::create_dir(tmp.path().join(".cargo")).unwrap();
    std::fs::write(tmp.path().join(".cargo/config.toml"), "[profile.release]\nopt-level = 0\ndebug = false\ncodegen-units = 256\n").unwrap();
    let ctx = tmp.path().join("context");
    std::fs::create_dir(&ctx).unwrap();
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(ROOT).join("target")).join("dockerfile-build");
    let patterns = dockerignore();
    let mut ran = Vec::new();
    for i in build {
        match i.keyword.as_str() {
            "COPY" => {
                assert!(!i.args.starts_with("--from"), "the build stage copies from the context only: {}", i.args);
                let parts: Vec<&str> = i.args.split_whitespace().filter(|a| !a.starts_with("--")).collect();
                let (dest, sources) = parts.split_last().unwrap();
                let dest_is_dir = dest.ends_with('/') || sources.len() > 1;
                let dest = ctx.as_path().join(dest.trim_start_matches("./"));
                for s in sources {
                    copy_into(s, &dest, dest_is_dir, &patterns);
                }
            }
            "RUN" => {
                let steps: Vec<&str> = i
                    .args
                    .split("&&")
                    .map(str::trim)
                    .filter(|s| !s.starts_with("apt-get") && !s.starts_with("rm -rf /var/lib/apt") && !s.starts_with("strip "))
                    .collect();
                if steps.is_empty() {
                    continue;
                }
                let script = steps.join(" && ");
                let out = Command::new("nice")
                    .args(["sh", "-c", &script])
                    .current_dir(ctx.as_path())
                    .env("CARGO_TARGET_DIR", &target)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "RUN {script}\nin a context of {:?}:\n{}",
                    listing(ctx.as_path()),
                    String::from_utf8_lossy(&out.stderr)
                );
                ran.push(script);
            }
            _ => {}
        }
    }
    assert!(ran.iter().any(|s| s.contains("cargo build --release --locked --bin podlease")), "the build stage builds podlease: {ran:?}");
    // What the final stage copies out of the build stage is there, and it is podlease.
    let out = Command::new(target.join("release/podlease")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("podlease "), "{out:?}");
    // The context holds nothing the build does not need (no tests, examples, chart, .git).
    for absent in ["tests", "examples", "charts", ".git", "target"] {
        assert!(!ctx.as_path().join(absent).exists(), "{absent} was copied into the build context");
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.file_name().to_string_lossy().to_string());
    }
    out.sort();
    out
}

/// The final stage: non-root 65532, the binary at the path it is copied to, the entrypoint.
#[test]
fn the_final_stage_runs_podlease_as_65532() {
    let stages = stages();
    let last = stages.last().unwrap();
    let get = |k: &str| last.iter().filter(|i| i.keyword == k).map(|i| i.args.clone()).last();
    assert_eq!(get("USER").as_deref(), Some("65532:65532"));
    assert_eq!(get("ENTRYPOINT").as_deref(), Some(r#"["/usr/local/bin/podlease"]"#));
    assert_eq!(get("CMD").as_deref(), Some(r#"["run"]"#));
    let copy = get("COPY").unwrap();
    assert!(copy.ends_with(" /usr/local/bin/podlease") && copy.starts_with("--from=build "), "{copy}");
}

/// scripts/image.sh's docker-archive has the final stage's USER, ENTRYPOINT, CMD, EXPOSE and
/// binary path, and podlease runs in its root filesystem as 65532 (its libraries are there).
/// The binary is this build's (a release build is the build-stage test's and the benches').
#[test]
fn image_sh_makes_the_dockerfiles_final_stage() {
    let dir = tempfile::Builder::new().prefix("podlease-image-").tempdir().unwrap();
    let out = dir.path().join("podlease.tar");
    let run = Command::new("bash")
        .arg(Path::new(ROOT).join("scripts/image.sh"))
        .arg(&out)
        .arg("local/podlease:test")
        .env("PODLEASE_BIN", env!("CARGO_BIN_EXE_podlease"))
        .output()
        .unwrap();
    assert!(run.status.success(), "scripts/image.sh: {}", String::from_utf8_lossy(&run.stderr));

    let unpacked = dir.path().join("archive");
    std::fs::create_dir(&unpacked).unwrap();
    tar_x(&out, &unpacked);
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(unpacked.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest[0]["RepoTags"][0], "local/podlease:test");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(unpacked.join(manifest[0]["Config"].as_str().unwrap())).unwrap()).unwrap();
    let c = &config["config"];

    let stages = stages();
    let last = stages.last().unwrap();
    let get = |k: &str| last.iter().filter(|i| i.keyword == k).map(|i| i.args.clone()).last().unwrap();
    assert_eq!(c["User"], get("USER"));
    assert_eq!(c["Entrypoint"], serde_json::from_str::<serde_json::Value>(&get("ENTRYPOINT")).unwrap());
    assert_eq!(c["Cmd"], serde_json::from_str::<serde_json::Value>(&get("CMD")).unwrap());
    assert!(c["ExposedPorts"].get(format!("{}/tcp", get("EXPOSE"))).is_some(), "{c}");

    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let layers = manifest[0]["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    tar_x(&unpacked.join(layers[0].as_str().unwrap()), &rootfs);
    let binary = get("COPY").rsplit(' ').next().unwrap().to_string();
    assert!(rootfs.join(binary.trim_start_matches('/')).is_file(), "{binary} not in the image");
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains(":65532:65532:"), "{passwd}");
    assert!(std::fs::metadata(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap().len() > 100_000, "a CA bundle");
    let ran = Command::new("chroot").arg("--userspec=65532:65532").arg(&rootfs).arg(&binary).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&ran.stdout).starts_with("podlease "),
        "podlease in the image's root as 65532: {}",
        String::from_utf8_lossy(&ran.stderr)
    );
}

fn tar_x(archive: &Path, into: &Path) {
    let out = Command::new("tar").arg("-xf").arg(archive).arg("-C").arg(into).output().unwrap();
    assert!(out.status.success(), "tar -xf {}: {}", archive.display(), String::from_utf8_lossy(&out.stderr));
}
