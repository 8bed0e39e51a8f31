//! Checks of the Dockerfile against the workspace, with no Docker engine: its
//! syntax (stages, references, arguments), that every file it copies out of
//! the build stage is one `cargo build` makes there, that the build context
//! keeps what cargo reads, and that the runtime has the programs kproxy runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One instruction, continuation lines joined.
#[derive(Debug, Clone)]
struct Instruction {
    line: usize,
    keyword: String,
    args: String,
}

#[derive(Debug, Default)]
struct Stage {
    name: Option<String>,
    image: String,
    instructions: Vec<Instruction>,
}

#[derive(Debug, Default)]
struct Dockerfile {
    /// ARGs before the first FROM, with their defaults.
    global_args: BTreeMap<String, Option<String>>,
    stages: Vec<Stage>,
}

const KEYWORDS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

fn instructions(text: &str) -> Result<Vec<Instruction>, String> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = raw.trim();
        // Comments may sit between continuation lines too.
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_none()) {
            continue;
        }
        let (start, mut joined) = pending.take().unwrap_or((number, String::new()));
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(body) => (body.trim_end(), true),
            None => (trimmed, false),
        };
        if !joined.is_empty() && !body.is_empty() {
            joined.push(' ');
        }
        joined.push_str(body);
        if continues {
            pending = Some((start, joined));
            continue;
        }
        let (keyword, args) = joined
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("line {start}: {joined:?} has no arguments"))?;
        let keyword = keyword.to_ascii_uppercase();
        if !KEYWORDS.contains(&keyword.as_str()) {
            return Err(format!("line {start}: unknown instruction {keyword}"));
        }
        out.push(Instruction {
            line: start,
            keyword,
            args: args.trim().to_string(),
        });
    }
    if let Some((line, _)) = pending {
        return Err(format!(
            "line {line}: a continuation runs off the end of the file"
        ));
    }
    Ok(out)
}

fn parse_dockerfile(text: &str) -> Result<Dockerfile, String> {
    let mut file = Dockerfile::default();
    for ins in instructions(text)? {
        match ins.keyword.as_str() {
            "FROM" => {
                let words: Vec<&str> = ins.args.split_whitespace().collect();
                let (image, name) = match words.as_slice() {
                    [image] => (*image, None),
                    [image, as_, name] if as_.eq_ignore_ascii_case("as") => (*image, Some(*name)),
                    _ => return Err(format!("line {}: FROM {}", ins.line, ins.args)),
                };
                file.stages.push(Stage {
                    name: name.map(str::to_string),
                    image: image.to_string(),
                    instructions: Vec::new(),
                });
            }
            "ARG" if file.stages.is_empty() => {
                let (name, default) = match ins.args.split_once('=') {
                    Some((name, value)) => (name, Some(value.to_string())),
                    None => (ins.args.as_str(), None),
                };
                file.global_args.insert(name.to_string(), default);
            }
            _ => match file.stages.last_mut() {
                Some(stage) => stage.instructions.push(ins),
                None => {
                    return Err(format!(
                        "line {}: {} before the first FROM",
                        ins.line, ins.keyword
                    ));
                }
            },
        }
    }
    if file.stages.is_empty() {
        return Err("no FROM".into());
    }
    Ok(file)
}

/// `${NAME}` and `$NAME` references in `text`.
fn variables(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let name: String = match rest.strip_prefix('{') {
            Some(inner) => inner
                .chars()
                .take_while(|c| *c != '}' && *c != ':')
                .collect(),
            None => rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect(),
        };
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// COPY's flags and its sources and destination (JSON form or not).
fn copy_parts(args: &str) -> (BTreeMap<String, String>, Vec<String>, String) {
    let mut flags = BTreeMap::new();
    let mut words: Vec<String> = Vec::new();
    let mut rest = args.trim();
    while let Some(flag) = rest.strip_prefix("--") {
        let (word, tail) = flag.split_once(char::is_whitespace).unwrap_or((flag, ""));
        let (name, value) = word.split_once('=').unwrap_or((word, ""));
        flags.insert(name.to_string(), value.to_string());
        rest = tail.trim_start();
    }
    if rest.starts_with('[') {
        words = serde_json::from_str(rest).expect("COPY in JSON form");
    } else {
        words.extend(rest.split_whitespace().map(str::to_string));
    }
    let dest = words.pop().expect("COPY has a destination");
    (flags, words, dest)
}

fn dockerfile() -> Dockerfile {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).expect("Dockerfile");
    parse_dockerfile(&text).unwrap_or_else(|err| panic!("Dockerfile: {err}"))
}

fn stage<'a>(file: &'a Dockerfile, name: &str) -> &'a Stage {
    file.stages
        .iter()
        .find(|s| s.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no stage named {name}"))
}

/// The packages' bin targets, by package name, from `cargo metadata`.
fn bin_targets() -> BTreeMap<String, Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(ROOT)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut bins = BTreeMap::new();
    for package in meta["packages"].as_array().unwrap() {
        let names = package["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        bins.insert(package["name"].as_str().unwrap().to_string(), names);
    }
    bins
}

/// The workspace members' directories, relative to the root.
fn workspace_members() -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(ROOT)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .expect("run cargo metadata");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let root = Path::new(meta["workspace_root"].as_str().unwrap());
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let manifest = Path::new(p["manifest_path"].as_str().unwrap());
            manifest
                .parent()
                .unwrap()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// What `cargo build` run in `workdir` with `command`'s flags leaves behind:
/// `{workdir}/target/{profile}/{bin}` for the bins of the selected packages.
fn cargo_outputs(workdir: &str, command: &str) -> BTreeSet<String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let at = words
        .windows(2)
        .position(|w| w == ["cargo", "build"])
        .expect("a cargo build");
    let flags = &words[at + 2..];
    let profile = if flags.contains(&"--release") {
        "release"
    } else {
        "debug"
    };
    let packages: Vec<&str> = flags
        .windows(2)
        .filter(|w| w[0] == "-p" || w[0] == "--package")
        .map(|w| w[1])
        .collect();
    assert!(
        !packages.is_empty(),
        "the build names its package (-p): {command}"
    );
    let bins = bin_targets();
    let mut outputs = BTreeSet::new();
    for package in packages {
        let names = bins
            .get(package)
            .unwrap_or_else(|| panic!("cargo build -p {package}: no such workspace package"));
        for bin in names {
            outputs.insert(format!(
                "{}/target/{profile}/{bin}",
                workdir.trim_end_matches('/')
            ));
        }
    }
    outputs
}

/// `.dockerignore` as Docker reads it, for the patterns it holds: paths
/// relative to the context with `*`, `?` and `**`, `!` to re-include; the
/// last matching pattern wins, and an excluded directory excludes its
/// contents.
struct DockerIgnore(Vec<(bool, Vec<String>)>);

impl DockerIgnore {
    fn load() -> DockerIgnore {
        let text =
            std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap_or_default();
        DockerIgnore(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| {
                    let (include, pattern) = match l.strip_prefix('!') {
                        Some(p) => (true, p),
                        None => (false, l),
                    };
                    let parts = pattern
                        .trim_start_matches("./")
                        .trim_matches('/')
                        .split('/')
                        .map(str::to_string)
                        .collect();
                    (include, parts)
                })
                .collect(),
        )
    }

    fn excludes(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        // A path is out when it or a directory above it is.
        (1..=parts.len()).any(|n| self.excludes_exactly(&parts[..n]))
    }

    fn excludes_exactly(&self, path: &[&str]) -> bool {
        let mut excluded = false;
        for (include, pattern) in &self.0 {
            let pattern: Vec<&str> = pattern.iter().map(String::as_str).collect();
            if path_matches(&pattern, path) {
                excluded = !include;
            }
        }
        excluded
    }
}

fn path_matches(pattern: &[&str], path: &[&str]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => {
            path_matches(&pattern[1..], path)
                || (!path.is_empty() && path_matches(pattern, &path[1..]))
        }
        (Some(p), Some(s)) => {
            name_matches(p.as_bytes(), s.as_bytes()) && path_matches(&pattern[1..], &path[1..])
        }
        _ => false,
    }
}

fn name_matches(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            name_matches(&pattern[1..], name)
                || (!name.is_empty() && name_matches(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => name_matches(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) => p == n && name_matches(&pattern[1..], &name[1..]),
        _ => false,
    }
}

#[test]
fn the_dockerfile_parses_into_named_stages() {
    let file = dockerfile();
    let names: Vec<_> = file.stages.iter().map(|s| s.name.clone()).collect();
    assert_eq!(
        names,
        [Some("build".to_string()), Some("runtime".to_string())]
    );
    let unique: BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "stage names are unique");
    for stage in &file.stages {
        assert!(!stage.image.is_empty());
        // Arguments used in FROM are declared before the first FROM, with a
        // default, or the build fails without --build-arg.
        for var in variables(&stage.image) {
            assert!(
                matches!(file.global_args.get(&var), Some(Some(_))),
                "FROM {} uses ${var}, which has no global ARG with a default",
                stage.image
            );
        }
    }
    // The image that runs is the last stage.
    assert_eq!(file.stages.last().unwrap().name.as_deref(), Some("runtime"));
}

#[test]
fn every_copy_from_refers_to_an_earlier_stage() {
    let file = dockerfile();
    let mut earlier: Vec<String> = Vec::new();
    for (index, stage) in file.stages.iter().enumerate() {
        for ins in stage.instructions.iter().filter(|i| i.keyword == "COPY") {
            let (flags, _, _) = copy_parts(&ins.args);
            if let Some(from) = flags.get("from") {
                let known =
                    earlier.contains(from) || from.parse::<usize>().is_ok_and(|n| n < index);
                assert!(
                    known,
                    "line {}: COPY --from={from} names no earlier stage",
                    ins.line
                );
            }
        }
        earlier.extend(stage.name.clone());
    }
}

#[test]
fn the_runtime_copies_only_what_the_build_makes() {
    let file = dockerfile();
    let build = stage(&file, "build");
    let workdir = build
        .instructions
        .iter()
        .rev()
        .find(|i| i.keyword == "WORKDIR")
        .map(|i| i.args.clone())
        .expect("the build stage has a WORKDIR");
    assert!(
        !build
            .instructions
            .iter()
            .any(|i| i.keyword == "ENV" && i.args.contains("CARGO_TARGET_DIR")),
        "the binaries are under {workdir}/target"
    );
    let mut made = BTreeSet::new();
    for ins in build.instructions.iter().filter(|i| i.keyword == "RUN") {
        if ins.args.contains("cargo build") {
            assert!(
                ins.args.contains("--locked"),
                "the image builds what Cargo.lock pins"
            );
            made.extend(cargo_outputs(&workdir, &ins.args));
        }
    }
    assert!(
        made.contains(&format!("{workdir}/target/release/kproxy")),
        "{made:?}"
    );

    let runtime = stage(&file, "runtime");
    let mut copied = Vec::new();
    for ins in runtime.instructions.iter().filter(|i| i.keyword == "COPY") {
        let (flags, sources, dest) = copy_parts(&ins.args);
        if flags.get("from").map(String::as_str) == Some("build") {
            for source in sources {
                assert!(
                    made.contains(&source),
                    "line {}: COPY --from=build {source}: the build makes only {made:?}",
                    ins.line
                );
                copied.push(dest.clone());
            }
        }
    }
    assert_eq!(copied, ["/usr/local/bin/kproxy"]);

    // The entrypoint is the copied binary.
    let entrypoint = runtime
        .instructions
        .iter()
        .rev()
        .find(|i| i.keyword == "ENTRYPOINT")
        .expect("an ENTRYPOINT");
    let argv: Vec<String> =
        serde_json::from_str(&entrypoint.args).expect("ENTRYPOINT in exec form");
    assert_eq!(argv.first(), copied.first());
}

#[test]
fn the_build_context_keeps_what_cargo_reads() {
    let file = dockerfile();
    let ignore = DockerIgnore::load();
    let build = stage(&file, "build");
    let context_copies: Vec<_> = build
        .instructions
        .iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| copy_parts(&i.args))
        .filter(|(flags, _, _)| !flags.contains_key("from"))
        .collect();
    assert!(
        context_copies
            .iter()
            .any(|(_, sources, _)| sources == &["."]),
        "the build stage copies the workspace"
    );
    let mut needed = vec!["Cargo.toml".to_string(), "Cargo.lock".to_string()];
    for member in workspace_members() {
        let dir = if member.is_empty() {
            String::new()
        } else {
            format!("{member}/")
        };
        needed.push(format!("{dir}Cargo.toml"));
        needed.push(format!("{dir}src"));
    }
    for path in &needed {
        assert!(
            Path::new(ROOT).join(path).exists(),
            "{path} is missing from the workspace"
        );
        assert!(!ignore.excludes(path), ".dockerignore leaves out {path}");
    }
    for (_, sources, _) in &context_copies {
        for source in sources.iter().filter(|s| *s != ".") {
            assert!(
                Path::new(ROOT).join(source).exists(),
                "COPY {source}: no such file"
            );
            assert!(
                !ignore.excludes(source),
                "COPY {source}: .dockerignore leaves it out"
            );
        }
    }
    // What the context should not carry: the build output and git history.
    for heavy in [
        "target",
        "target/release/kproxy",
        ".git",
        "modes/iptables/target",
    ] {
        assert!(
            ignore.excludes(heavy),
            "{heavy} goes into the build context"
        );
    }
}

#[test]
fn the_runtime_has_the_programs_kproxy_runs() {
    let file = dockerfile();
    let runtime = stage(&file, "runtime");
    let installed: BTreeSet<&str> = runtime
        .instructions
        .iter()
        .filter(|i| i.keyword == "RUN")
        .flat_map(|i| i.args.split("&&"))
        .filter_map(|cmd| cmd.trim().strip_prefix("apt-get install"))
        .flat_map(|rest| rest.split_whitespace().filter(|w| !w.starts_with('-')))
        .collect();
    // iptables-{nft,legacy}{,-save,-restore}, ip6tables-*: Debian's iptables
    // package; modprobe: kmod; ip: iproute2.
    for package in ["iptables", "ipset", "kmod", "conntrack", "iproute2"] {
        assert!(
            installed.contains(package),
            "the runtime lacks {package}: {installed:?}"
        );
    }
    assert!(
        runtime.image.starts_with("debian:") && runtime.image.contains("-slim"),
        "a small Debian runtime: {}",
        runtime.image
    );
}

#[test]
fn the_parser_rejects_what_docker_rejects() {
    assert!(parse_dockerfile("RUN true\nFROM x").is_err());
    assert!(parse_dockerfile("FROM x AS\n").is_err());
    assert!(parse_dockerfile("FROM x\nCOPPY a b\n").is_err());
    assert!(parse_dockerfile("FROM x\nRUN a \\\n").is_err());
    assert!(parse_dockerfile("# nothing\n").is_err());
    let file = parse_dockerfile("ARG A=1\nFROM x:${A} AS b\nRUN a \\\n  # c\n  && b\n").unwrap();
    assert_eq!(file.stages[0].instructions[0].args, "a && b");
    assert_eq!(variables("x:${A}-$B"), ["A", "B"]);
}

#[test]
fn dockerignore_patterns_match_as_docker_matches_them() {
    let ignore = DockerIgnore(
        ["target", "**/target", "*.md", "!README.md", "docs/*.png"]
            .iter()
            .map(|l| {
                let (include, p) = match l.strip_prefix('!') {
                    Some(p) => (true, p),
                    None => (false, *l),
                };
                (include, p.split('/').map(str::to_string).collect())
            })
            .collect(),
    );
    assert!(ignore.excludes("target/debug/kproxy"));
    assert!(ignore.excludes("modes/ipvs/target"));
    assert!(ignore.excludes("CHANGELOG.md"));
    assert!(!ignore.excludes("README.md"));
    assert!(!ignore.excludes("modes/README.md"));
    assert!(ignore.excludes("docs/a.png"));
    assert!(!ignore.excludes("docs/a.md"));
    assert!(!ignore.excludes("src/main.rs"));
}
