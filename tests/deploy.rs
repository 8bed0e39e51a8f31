//! The `deploy/` overlays, built with `kubectl kustomize` and read back into
//! Kubernetes types: RBAC exactly as kproxy needs it, the DaemonSet's node
//! settings, mounts, probes and update strategy, and a configuration that
//! kproxy itself reads, with the flags the DaemonSet passes.
//!
//! kubectl comes from `$KUBECTL`, else the PATH. Without it the tests are
//! skipped with a message, except in CI (`CI` set), where they fail.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kproxy::cli::{self, BindAddress, ProxyMode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const NAMESPACE: &str = "kube-system";
const OVERLAYS: &[&str] = &["iptables", "ipvs", "kubeadm"];
const KUBEADM_FIXTURE: &str = "tests/fixtures/kubeadm-kube-proxy-config.yaml";

/// One built overlay.
#[derive(Default)]
struct Built {
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

fn kubectl() -> Option<String> {
    let program = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let found = Command::new(&program)
        .args(["version", "--client"])
        .output()
        .is_ok_and(|out| out.status.success());
    if found {
        return Some(program);
    }
    let why = format!("{program} cannot run: the deploy/ manifests are not checked");
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI installs kubectl: see .ci/run)");
    }
    eprintln!("skipped: {why}; install kubectl (Debian: kubernetes-client)");
    None
}

fn build(kubectl: &str, overlay: &str) -> Built {
    let dir = Path::new(ROOT).join("deploy/overlays").join(overlay);
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 manifests");
    let mut built = Built::default();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(document).expect("a YAML document");
        if value.is_null() {
            continue;
        }
        match value["kind"].as_str().unwrap_or_default() {
            "ServiceAccount" => built.service_accounts.push(typed(overlay, value)),
            "ClusterRole" => built.cluster_roles.push(typed(overlay, value)),
            "ClusterRoleBinding" => built.bindings.push(typed(overlay, value)),
            "ConfigMap" => built.config_maps.push(typed(overlay, value)),
            "DaemonSet" => built.daemon_sets.push(typed(overlay, value)),
            other => panic!("{overlay}: unexpected object of kind {other:?}"),
        }
    }
    built
}

/// One object as its Kubernetes type.
fn typed<T: DeserializeOwned>(overlay: &str, value: Value) -> T {
    let kind = value["kind"].as_str().unwrap_or_default().to_string();
    serde_yaml::from_value(value)
        .unwrap_or_else(|err| panic!("{overlay}: a {kind} that does not parse: {err}"))
}

/// Runs `check` on every overlay, built.
fn each_overlay(check: impl Fn(&str, &Built)) {
    let Some(kubectl) = kubectl() else { return };
    for overlay in OVERLAYS {
        check(overlay, &build(&kubectl, overlay));
    }
}

fn only<'a, T>(overlay: &str, what: &str, items: &'a [T]) -> &'a T {
    assert_eq!(items.len(), 1, "{overlay}: one {what}");
    &items[0]
}

fn daemon_set(overlay: &str, built: &Built) -> (DaemonSet, PodSpec, Container) {
    let ds = only(overlay, "DaemonSet", &built.daemon_sets).clone();
    let pod = ds.spec.clone().unwrap().template.spec.unwrap();
    let container = only(overlay, "container", &pod.containers).clone();
    (ds, pod, container)
}

fn volume<'a>(pod: &'a PodSpec, name: &str) -> &'a Volume {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

#[test]
fn the_cluster_role_grants_exactly_what_kproxy_uses() {
    let expected: BTreeSet<(String, String, String)> = [
        ("", "services", "get"),
        ("", "services", "list"),
        ("", "services", "watch"),
        ("", "nodes", "get"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("discovery.k8s.io", "endpointslices", "get"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "events", "create"),
        ("", "events", "patch"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    ]
    .into_iter()
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
    .collect();
    each_overlay(|overlay, built| {
        let role = only(overlay, "ClusterRole", &built.cluster_roles);
        assert!(role.aggregation_rule.is_none());
        let mut granted = BTreeSet::new();
        for rule in role.rules.iter().flatten() {
            assert!(
                rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
                "{overlay}: {rule:?}"
            );
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        assert_ne!(verb, "*", "{overlay}: a wildcard verb");
                        granted.insert((group.clone(), resource.clone(), verb.clone()));
                    }
                }
            }
        }
        assert_eq!(granted, expected, "{overlay}");

        let account = only(overlay, "ServiceAccount", &built.service_accounts);
        assert_eq!(account.metadata.namespace.as_deref(), Some(NAMESPACE));
        let binding = only(overlay, "ClusterRoleBinding", &built.bindings);
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
        assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
        let subject = only(
            overlay,
            "subject",
            binding.subjects.as_deref().unwrap_or(&[]),
        );
        assert_eq!(subject.kind, "ServiceAccount");
        assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
        assert_eq!(subject.namespace.as_deref(), Some(NAMESPACE));

        let (ds, pod, _) = daemon_set(overlay, built);
        assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE));
        assert_eq!(pod.service_account_name, account.metadata.name);
    });
}

#[test]
fn the_daemon_set_runs_on_every_node_in_the_host_network() {
    each_overlay(|overlay, built| {
        let (ds, pod, container) = daemon_set(overlay, built);
        assert_eq!(pod.host_network, Some(true), "{overlay}");
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        // One toleration that matches every taint: operator Exists, no key,
        // no effect.
        assert!(
            pod.tolerations.iter().flatten().any(|t| {
                t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
            }),
            "{overlay}: {:?}",
            pod.tolerations
        );
        let spec = ds.spec.unwrap();
        let strategy = spec.update_strategy.unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        assert_eq!(
            strategy.rolling_update.unwrap().max_unavailable,
            Some(IntOrString::Int(1))
        );
        // The selector picks the template's pods.
        let labels = spec.template.metadata.unwrap().labels.unwrap();
        for (key, value) in spec.selector.match_labels.unwrap() {
            assert_eq!(labels.get(&key), Some(&value), "{overlay}: selector {key}");
        }
        let node_name = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "NODE_NAME")
            .expect("NODE_NAME");
        let field = node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .expect("NODE_NAME from the downward API");
        assert_eq!(field.field_path, "spec.nodeName");
        assert!(
            container
                .args
                .iter()
                .flatten()
                .any(|a| a == "--hostname-override=$(NODE_NAME)"),
            "{overlay}: {:?}",
            container.args
        );
        let security = container
            .security_context
            .as_ref()
            .expect("securityContext");
        assert_eq!(security.privileged, Some(true), "{overlay}");
        let requests = container
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .expect("resource requests");
        assert!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "{overlay}"
        );
        assert!(
            container
                .image
                .as_deref()
                .is_some_and(|i| i.contains("kproxy"))
        );
    });
}

#[test]
fn the_daemon_set_mounts_the_xtables_lock_and_the_modules() {
    each_overlay(|overlay, built| {
        let (_, pod, container) = daemon_set(overlay, built);
        let mounts = container.volume_mounts.clone().unwrap_or_default();
        let mount = |path: &str| {
            mounts
                .iter()
                .find(|m| m.mount_path == path)
                .unwrap_or_else(|| panic!("{overlay}: nothing mounted at {path}"))
                .clone()
        };

        let lock = mount("/run/xtables.lock");
        assert_ne!(lock.read_only, Some(true), "the lock is taken, so written");
        let host = volume(&pod, &lock.name)
            .host_path
            .clone()
            .expect("hostPath");
        assert_eq!(host.path, "/run/xtables.lock");
        assert_eq!(host.type_.as_deref(), Some("FileOrCreate"));

        let modules = mount("/lib/modules");
        assert_eq!(modules.read_only, Some(true), "{overlay}");
        let host = volume(&pod, &modules.name)
            .host_path
            .clone()
            .expect("hostPath");
        assert_eq!(host.path, "/lib/modules");
    });
}

#[test]
fn the_probes_ask_the_health_server_kproxy_runs() {
    each_overlay(|overlay, built| {
        let (_, _, container) = daemon_set(overlay, built);
        let http = |probe: Option<&k8s_openapi::api::core::v1::Probe>, what: &str| {
            let get = probe
                .and_then(|p| p.http_get.clone())
                .unwrap_or_else(|| panic!("{overlay}: no HTTP {what} probe"));
            (get.path.unwrap_or_default(), get.port)
        };
        let readiness = http(container.readiness_probe.as_ref(), "readiness");
        let liveness = http(container.liveness_probe.as_ref(), "liveness");
        assert_eq!(readiness, ("/healthz".to_string(), IntOrString::Int(10256)));
        // /livez: /healthz without the node's state, so that a node being
        // drained does not get its proxy restarted.
        assert_eq!(liveness, ("/livez".to_string(), IntOrString::Int(10256)));
    });
}

/// The file the DaemonSet's `--config` names, found through its mount: the
/// ConfigMap's name and the key.
fn config_source(overlay: &str, pod: &PodSpec, container: &Container) -> (String, String, String) {
    let config = container
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--config="))
        .unwrap_or_else(|| panic!("{overlay}: no --config"));
    let path = Path::new(config);
    let dir = path.parent().unwrap().to_str().unwrap();
    let key = path.file_name().unwrap().to_str().unwrap();
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .unwrap_or_else(|| panic!("{overlay}: --config={config}, but nothing is mounted at {dir}"));
    assert_eq!(
        mount.read_only,
        Some(true),
        "{overlay}: the config is read-only"
    );
    let source = volume(pod, &mount.name)
        .config_map
        .clone()
        .unwrap_or_else(|| panic!("{overlay}: {dir} is not a ConfigMap"));
    (config.to_string(), source.name, key.to_string())
}

/// kproxy's settings as the DaemonSet starts it on node `node-1`, with the
/// configuration file's text.
fn settings(container: &Container, config_text: &str, config_path: &str) -> cli::Args {
    let argv: Vec<String> = std::iter::once("kproxy".to_string())
        .chain(
            container
                .args
                .iter()
                .flatten()
                .map(|a| a.replace("$(NODE_NAME)", "node-1")),
        )
        .collect();
    let (mut args, given) = cli::try_parse_from(argv).expect("kproxy takes the DaemonSet's args");
    let file = kproxy::config::parse(config_text, Path::new(config_path))
        .expect("kproxy reads the configuration");
    assert_eq!(
        file.ignored,
        vec![],
        "every field of the shipped file is used"
    );
    file.apply(&mut args, &given)
        .expect("the configuration applies");
    args
}

#[test]
fn the_configuration_is_one_kproxy_reads() {
    each_overlay(|overlay, built| {
        let (_, pod, container) = daemon_set(overlay, built);
        let (config_path, config_map, key) = config_source(overlay, &pod, &container);
        let probe_port = match container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
        {
            Some(get) => get.port.clone(),
            None => panic!("{overlay}: no readiness probe"),
        };
        let args = if overlay == "kubeadm" {
            // kubeadm's own ConfigMap, as it is on the cluster; its
            // kubeconfig.conf sits beside config.conf in the same mount.
            assert_eq!(config_map, "kube-proxy");
            assert!(
                built.config_maps.is_empty(),
                "kubeadm: the cluster's ConfigMap, not one of ours"
            );
            let text = std::fs::read_to_string(Path::new(ROOT).join(KUBEADM_FIXTURE)).unwrap();
            let args = settings(&container, &text, &config_path);
            let kubeconfig = args
                .kubeconfig
                .clone()
                .expect("kubeadm's file names a kubeconfig");
            assert_eq!(
                kubeconfig.parent(),
                Path::new(&config_path).parent(),
                "kubeconfig.conf is in the mounted ConfigMap"
            );
            assert_eq!(args.mode, ProxyMode::Iptables, "kubeadm's default mode");
            args
        } else {
            let map = built
                .config_maps
                .iter()
                .find(|m| m.metadata.name.as_ref() == Some(&config_map))
                .unwrap_or_else(|| {
                    panic!("{overlay}: the DaemonSet mounts {config_map}, which is not built")
                });
            assert_eq!(map.metadata.namespace.as_deref(), Some(NAMESPACE));
            let text = map
                .data
                .as_ref()
                .and_then(|d| d.get(&key))
                .unwrap_or_else(|| panic!("{overlay}: {config_map} has no key {key}"));
            let args = settings(&container, text, &config_path);
            let expected = match overlay {
                "ipvs" => ProxyMode::Ipvs,
                _ => ProxyMode::Iptables,
            };
            assert_eq!(args.mode, expected, "{overlay}");
            args
        };
        assert_eq!(args.hostname().as_deref(), Some("node-1"), "{overlay}");
        // The probes reach the health server where kproxy will serve it.
        let BindAddress(Some(healthz)) = args.healthz_bind_address else {
            panic!("{overlay}: the health server is off");
        };
        assert_eq!(
            IntOrString::Int(healthz.port().into()),
            probe_port,
            "{overlay}"
        );
        assert!(
            healthz.ip().is_unspecified(),
            "{overlay}: the kubelet probes the node's IP"
        );
    });
}
