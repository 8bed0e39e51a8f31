//! Services, EndpointSlices and this node's Node, watched on the API server
//! with kube-rs watchers: each event is reduced to kproxy's small form at once
//! and handed to a [`Sink`].
//!
//! - A list (at start, or a relist after `410 Gone`) is buffered until it is
//!   complete and then replaces that kind whole, so a relist never shows an
//!   empty intermediate state.
//! - Errors back off (kube-rs's default backoff, as client-go's reflector).
//! - kube-rs 5 never relists when the API server answers a watch request with
//!   an HTTP 410 (kube-rs#1042): it retries the expired resourceVersion
//!   forever. The watcher stream is restarted instead, which relists.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::IpFamily;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::health::node_is_eligible;
use crate::inventory::Inventory;
use crate::translate::service::SERVICE_PROXY_NAME_LABEL;
use crate::translate::slice::HEADLESS_LABEL;

/// The annotation the EndpointSlice controller sets to when the change that
/// produced a slice happened (for the network programming latency).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// When the change an EndpointSlice carries was made, and the family of the
/// slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trigger {
    pub family: IpFamily,
    pub time: SystemTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        })
    }
}

/// Where watched changes go.
pub trait Sink: Send + Sync + 'static {
    /// One object changed: `apply` edits the inventory and returns whether
    /// anything kproxy keeps changed. `trigger` is the change's trigger time,
    /// if the object carried one.
    fn change(
        &self,
        kind: ObjectKind,
        trigger: Option<Trigger>,
        apply: &mut dyn FnMut(&mut Inventory) -> bool,
    );

    /// A complete list of `kind`: `apply` puts it in place of the old content.
    fn listed(&self, kind: ObjectKind, apply: &mut dyn FnMut(&mut Inventory) -> bool);

    /// This node should (or should no longer) get load-balancer traffic: it
    /// is being deleted or drained by the cluster autoscaler.
    fn node_eligible(&self, _eligible: bool) {}
}

/// What the watch loop needs to know of each kind.
trait Watched: Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static {
    const KIND: ObjectKind;
    fn add(inv: &mut Inventory, obj: &Self) -> bool;
    fn delete(inv: &mut Inventory, obj: &Self) -> bool;
    fn replace(inv: &mut Inventory, listed: Inventory) -> bool;
    fn trigger(_obj: &Self) -> Option<Trigger> {
        None
    }
    /// Called for every version of an object seen (`None`: deleted).
    fn seen(_obj: Option<&Self>, _sink: &dyn Sink) {}
}

impl Watched for Service {
    const KIND: ObjectKind = ObjectKind::Service;
    fn add(inv: &mut Inventory, obj: &Self) -> bool {
        inv.add_service(obj)
    }
    fn delete(inv: &mut Inventory, obj: &Self) -> bool {
        inv.delete_service(
            obj.namespace().as_deref().unwrap_or("default"),
            &obj.name_any(),
        )
    }
    fn replace(inv: &mut Inventory, listed: Inventory) -> bool {
        inv.replace_services(listed)
    }
}

impl Watched for EndpointSlice {
    const KIND: ObjectKind = ObjectKind::EndpointSlice;
    fn add(inv: &mut Inventory, obj: &Self) -> bool {
        inv.add_slice(obj)
    }
    fn delete(inv: &mut Inventory, obj: &Self) -> bool {
        inv.delete_slice(
            obj.namespace().as_deref().unwrap_or("default"),
            &obj.name_any(),
        )
    }
    fn replace(inv: &mut Inventory, listed: Inventory) -> bool {
        inv.replace_slices(listed)
    }
    fn trigger(obj: &Self) -> Option<Trigger> {
        let time = trigger_time(obj.annotations().get(TRIGGER_TIME_ANNOTATION)?)?;
        let family = if obj.address_type == "IPv6" {
            IpFamily::V6
        } else {
            IpFamily::V4
        };
        Some(Trigger { family, time })
    }
}

impl Watched for Node {
    const KIND: ObjectKind = ObjectKind::Node;
    fn add(inv: &mut Inventory, obj: &Self) -> bool {
        inv.add_node(obj)
    }
    fn delete(inv: &mut Inventory, obj: &Self) -> bool {
        inv.delete_node(&obj.name_any())
    }
    fn replace(inv: &mut Inventory, listed: Inventory) -> bool {
        inv.replace_nodes(listed)
    }
    fn seen(obj: Option<&Self>, sink: &dyn Sink) {
        sink.node_eligible(obj.is_some_and(node_is_eligible));
    }
}

/// An RFC 3339 time, as the annotation carries it.
pub fn trigger_time(text: &str) -> Option<SystemTime> {
    text.trim()
        .parse::<jiff::Timestamp>()
        .ok()
        .map(SystemTime::from)
}

/// Upstream's selector for Services and EndpointSlices: not another proxy's,
/// not headless.
pub fn proxied_selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}

/// Starts the three watchers; they run until aborted.
pub fn spawn_all(client: Client, node_name: &str, sink: Arc<dyn Sink>) -> Vec<JoinHandle<()>> {
    let selector = proxied_selector();
    let services = watcher::Config::default().labels(&selector);
    let slices = watcher::Config::default().labels(&selector);
    let node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    vec![
        tokio::spawn(watch(
            Api::<Service>::all(client.clone()),
            services,
            sink.clone(),
        )),
        tokio::spawn(watch(
            Api::<EndpointSlice>::all(client.clone()),
            slices,
            sink.clone(),
        )),
        tokio::spawn(watch(Api::<Node>::all(client), node, sink)),
    ]
}

/// A watch request refused with an HTTP 410: the resourceVersion kube-rs
/// resumes from has expired, and kube-rs would retry it forever.
fn expired_at_watch_start(err: &watcher::Error) -> bool {
    matches!(err, watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410)
}

/// The 410 that kube-rs handles itself, by relisting.
fn expired_in_stream(err: &watcher::Error) -> bool {
    matches!(err, watcher::Error::WatchError(status) if status.code == 410)
}

/// Delay before restarting a watcher stream the `n`-th time in a row.
fn restart_delay(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.min(5)).min(Duration::from_secs(30))
}

async fn watch<K>(api: Api<K>, config: watcher::Config, sink: Arc<dyn Sink>)
where
    K: Watched,
{
    let kind = K::KIND;
    let mut restarts = 0u32;
    loop {
        let stream = watcher::watcher(api.clone(), config.clone()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        // The objects of a list in progress.
        let mut listing: Option<Inventory> = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    restarts = 0;
                    handle(event, &mut listing, &*sink);
                }
                Err(err) if expired_at_watch_start(&err) => {
                    info!(%kind, "resourceVersion expired (410 Gone): relisting");
                    break;
                }
                Err(err) if expired_in_stream(&err) => {
                    info!(%kind, "resourceVersion expired (410 Gone): relisting");
                }
                Err(err) => warn!(%kind, "watch failed, retrying: {err}"),
            }
        }
        // Either kube-rs#1042 or (never expected) the end of the stream.
        let delay = restart_delay(restarts);
        restarts = restarts.saturating_add(1);
        debug!(%kind, "restarting the watcher in {delay:?}");
        tokio::time::sleep(delay).await;
    }
}

fn handle<K: Watched>(event: Event<K>, listing: &mut Option<Inventory>, sink: &dyn Sink) {
    let kind = K::KIND;
    match event {
        Event::Init => *listing = Some(Inventory::default()),
        Event::InitApply(obj) => {
            K::seen(Some(&obj), sink);
            K::add(listing.get_or_insert_with(Inventory::default), &obj);
        }
        Event::InitDone => {
            let listed = listing.take().unwrap_or_default();
            debug!(%kind, "list complete");
            let mut listed = Some(listed);
            sink.listed(kind, &mut |inv| {
                K::replace(inv, listed.take().unwrap_or_default())
            });
        }
        Event::Apply(obj) => {
            K::seen(Some(&obj), sink);
            sink.change(kind, K::trigger(&obj), &mut |inv| K::add(inv, &obj));
        }
        Event::Delete(obj) => {
            K::seen(None, sink);
            sink.change(kind, None, &mut |inv| K::delete(inv, &obj));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn trigger_times_are_rfc3339() {
        let t = trigger_time("2024-05-01T10:00:00Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_714_557_600
        );
        let t = trigger_time("2024-05-01T10:00:00.250+00:00").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
            1_714_557_600_250
        );
        assert_eq!(trigger_time("yesterday"), None);
    }

    #[test]
    fn the_selector_is_upstreams() {
        assert_eq!(
            proxied_selector(),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
    }

    #[test]
    fn restarts_back_off_up_to_thirty_seconds() {
        assert_eq!(restart_delay(0), Duration::from_secs(1));
        assert_eq!(restart_delay(1), Duration::from_secs(2));
        assert_eq!(restart_delay(10), Duration::from_secs(30));
    }

    /// Records what the watch loop hands over.
    #[derive(Default)]
    struct Recorder {
        inventory: Mutex<Inventory>,
        log: Mutex<Vec<String>>,
    }

    impl Sink for Recorder {
        fn change(
            &self,
            kind: ObjectKind,
            trigger: Option<Trigger>,
            apply: &mut dyn FnMut(&mut Inventory) -> bool,
        ) {
            let changed = apply(&mut self.inventory.lock().unwrap());
            self.log
                .lock()
                .unwrap()
                .push(format!("change {kind} {changed} {}", trigger.is_some()));
        }
        fn listed(&self, kind: ObjectKind, apply: &mut dyn FnMut(&mut Inventory) -> bool) {
            let changed = apply(&mut self.inventory.lock().unwrap());
            self.log
                .lock()
                .unwrap()
                .push(format!("listed {kind} {changed}"));
        }
    }

    fn svc(name: &str, ip: &str) -> Service {
        let mut s = crate::translate::testutil::service(&format!(
            "spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}"
        ));
        s.metadata.name = Some(name.into());
        s
    }

    #[test]
    fn a_relist_replaces_the_old_content_only_when_complete() {
        let rec = Recorder::default();
        let mut listing = None;
        handle(Event::<Service>::Init, &mut listing, &rec);
        handle(Event::InitApply(svc("a", "10.96.0.1")), &mut listing, &rec);
        handle(Event::<Service>::InitDone, &mut listing, &rec);
        assert_eq!(rec.inventory.lock().unwrap().services.len(), 1);

        // A relist: until InitDone the old content stays.
        handle(Event::<Service>::Init, &mut listing, &rec);
        handle(Event::InitApply(svc("b", "10.96.0.2")), &mut listing, &rec);
        assert_eq!(
            rec.inventory
                .lock()
                .unwrap()
                .services
                .iter()
                .next()
                .unwrap()
                .name,
            "a"
        );
        handle(Event::<Service>::InitDone, &mut listing, &rec);
        let inv = rec.inventory.lock().unwrap();
        let names: Vec<&str> = inv.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["b"]);
        drop(inv);

        handle(Event::Apply(svc("c", "10.96.0.3")), &mut listing, &rec);
        handle(Event::Delete(svc("b", "10.96.0.2")), &mut listing, &rec);
        assert_eq!(
            *rec.log.lock().unwrap(),
            [
                "listed Service true",
                "listed Service true",
                "change Service true false",
                "change Service true false"
            ]
        );
    }

    #[test]
    fn slice_events_carry_their_trigger_time() {
        let rec = Recorder::default();
        let mut listing = None;
        let mut slice = crate::translate::testutil::slice("endpoints: [{addresses: [10.244.0.1]}]");
        slice.metadata.annotations = Some(
            [(
                TRIGGER_TIME_ANNOTATION.to_string(),
                "2024-05-01T10:00:00Z".to_string(),
            )]
            .into(),
        );
        handle(Event::Apply(slice), &mut listing, &rec);
        assert_eq!(*rec.log.lock().unwrap(), ["change EndpointSlice true true"]);
    }
}
