//! The fake API server driven by the real kube-rs client, watcher and reflector.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kproxy_fake_apiserver::{DownMode, ExpiredWatch, FakeApiServer, Kind, ServerOptions};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const STEP: Duration = Duration::from_secs(15);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn service(ns: &str, name: &str, port: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![ServicePort {
                name: Some("p".into()),
                port,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn labelled(mut svc: Service, key: &str, value: &str) -> Service {
    svc.labels_mut().insert(key.into(), value.into());
    svc
}

fn slice(ns: &str, name: &str, service: &str, ip: &str) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".into(),
                service.into(),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint {
            addresses: vec![ip.into()],
            ..Default::default()
        }],
        ports: None,
    }
}

fn node(name: &str, zone: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "topology.kubernetes.io/zone".into(),
                zone.into(),
            )])),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn port_of(svc: &Service) -> i32 {
    svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port
}

/// A watcher polled continuously in the background (a watcher only opens its watch when polled),
/// its events collected for the test to inspect.
struct Watched<K> {
    events: mpsc::UnboundedReceiver<Event<K>>,
    task: JoinHandle<()>,
}

impl<K: Send + 'static> Watched<K> {
    fn spawn(
        stream: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    ) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                if let Ok(event) = item
                    && tx.send(event).is_err()
                {
                    return;
                }
            }
        });
        Watched { events, task }
    }

    /// Events up to and including the first one matching `pred`; fails on timeout.
    async fn until(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&Event<K>) -> bool,
    ) -> Vec<Event<K>> {
        let mut seen = Vec::new();
        within(what, async {
            loop {
                let event = self.events.recv().await.expect("watcher task ended");
                let done = pred(&event);
                seen.push(event);
                if done {
                    return;
                }
            }
        })
        .await;
        seen
    }
}

impl<K> Drop for Watched<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn describe(events: &[Event<Service>]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            Event::Init => "Init".to_string(),
            Event::InitApply(s) => format!("InitApply {} {}", s.name_any(), port_of(s)),
            Event::InitDone => "InitDone".to_string(),
            Event::Apply(s) => format!("Apply {} {}", s.name_any(), port_of(s)),
            Event::Delete(s) => format!("Delete {}", s.name_any()),
        })
        .collect()
}

async fn start(options: ServerOptions) -> (FakeApiServer, Client) {
    let server = FakeApiServer::start_with(options)
        .await
        .expect("start fake API server");
    let client = server.client().expect("kube client");
    (server, client)
}

#[tokio::test]
async fn list_paginates_over_a_consistent_snapshot() {
    let (server, client) = start(ServerOptions::default()).await;
    for (i, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        server.apply(&service("ns1", name, 80 + i as i32)).unwrap();
    }
    server.apply(&service("ns2", "other", 1)).unwrap();
    let api: Api<Service> = Api::namespaced(client.clone(), "ns1");

    let first = within("first page", api.list(&ListParams::default().limit(2)))
        .await
        .unwrap();
    let snapshot_rv = first.metadata.resource_version.clone().unwrap();
    assert_eq!(first.items.len(), 2);
    // Changes between pages must not leak into the remaining pages.
    server.apply(&service("ns1", "c", 999)).unwrap();
    server.delete(Kind::Service, "ns1", "d").unwrap();

    let mut names: Vec<String> = first.items.iter().map(|s| s.name_any()).collect();
    let mut token = first.metadata.continue_.clone();
    let mut pages = 1;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = within(
            "next page",
            api.list(&ListParams::default().limit(2).continue_token(&t)),
        )
        .await
        .unwrap();
        assert_eq!(
            page.metadata.resource_version.as_deref(),
            Some(snapshot_rv.as_str())
        );
        for s in &page.items {
            if s.name_any() == "c" {
                assert_eq!(
                    port_of(s),
                    82,
                    "a continued page shows the snapshot, not the update"
                );
            }
        }
        names.extend(page.items.iter().map(|s| s.name_any()));
        token = page.metadata.continue_.clone();
        pages += 1;
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    assert_eq!(pages, 3);

    let lists: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_list_of(Kind::Service))
        .collect();
    assert_eq!(lists.len(), 3);
    assert!(lists.iter().all(|r| r.param("limit") == Some("2")));
    assert_eq!(
        lists
            .iter()
            .filter(|r| r.param("continue").is_some())
            .count(),
        2
    );
    assert_eq!(lists[0].path, "/api/v1/namespaces/ns1/services");

    // A fresh list sees the changes; a cluster-wide one sees both namespaces.
    let now = api.list(&ListParams::default()).await.unwrap();
    let now: Vec<_> = now
        .items
        .iter()
        .map(|s| (s.name_any(), port_of(s)))
        .collect();
    assert_eq!(
        now,
        [
            ("a".into(), 80),
            ("b".into(), 81),
            ("c".into(), 999),
            ("e".into(), 84)
        ]
    );
    let all = Api::<Service>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(all.items.len(), 5);
}

#[tokio::test]
async fn stale_continue_token_is_gone_after_compaction() {
    let (server, client) = start(ServerOptions::default()).await;
    for name in ["a", "b", "c"] {
        server.apply(&service("ns1", name, 80)).unwrap();
    }
    let api: Api<Service> = Api::all(client);
    let first = api.list(&ListParams::default().limit(1)).await.unwrap();
    let token = first.metadata.continue_.unwrap();
    server.compact();
    let err = api
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .expect_err("stale continue token");
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected a 410 Status, got {other:?}"),
    }
}

#[tokio::test]
async fn selectors_filter_lists_and_single_gets_work() {
    let (server, client) = start(ServerOptions::default()).await;
    server
        .apply(&labelled(service("ns1", "a", 80), "app", "web"))
        .unwrap();
    server
        .apply(&labelled(
            service("ns1", "b", 80),
            "service.kubernetes.io/service-proxy-name",
            "x",
        ))
        .unwrap();
    server.apply(&service("ns1", "c", 80)).unwrap();
    let api: Api<Service> = Api::all(client.clone());
    let names = |l: kube::core::ObjectList<Service>| {
        l.items.iter().map(|s| s.name_any()).collect::<Vec<_>>()
    };

    let web = api
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(names(web), ["a"]);
    let proxied = api
        .list(&ListParams::default().labels("!service.kubernetes.io/service-proxy-name"))
        .await
        .unwrap();
    assert_eq!(names(proxied), ["a", "c"]);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=c"))
        .await
        .unwrap();
    assert_eq!(names(by_name), ["c"]);

    server.apply(&node("n1", "z1")).unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    assert_eq!(
        nodes.get("n1").await.unwrap().labels()["topology.kubernetes.io/zone"],
        "z1"
    );
    match nodes.get("missing").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("expected 404, got {other:?}"),
    }
    let svc = Api::<Service>::namespaced(client, "ns1")
        .get("a")
        .await
        .unwrap();
    assert!(svc.metadata.uid.is_some() && svc.metadata.creation_timestamp.is_some());
}

#[tokio::test]
async fn watcher_sees_added_modified_deleted_in_order() {
    let (server, client) = start(ServerOptions::default()).await;
    server.apply(&service("ns1", "existing", 1)).unwrap();
    let api: Api<Service> = Api::all(client);
    let mut stream = Watched::spawn(watcher::watcher(api, watcher::Config::default()));
    let init = stream
        .until("initial list", |e| matches!(e, Event::InitDone))
        .await;
    assert_eq!(
        describe(&init),
        ["Init", "InitApply existing 1", "InitDone"]
    );

    assert!(
        server
            .wait_until(STEP, |s| s.open_watches(Kind::Service) == 1)
            .await
    );
    server.apply(&service("ns1", "web", 80)).unwrap();
    server.apply(&service("ns1", "web", 8080)).unwrap();
    server.apply(&node("n1", "z1")).unwrap(); // other kinds never show up
    server.delete(Kind::Service, "ns1", "web").unwrap();
    server.delete(Kind::Service, "ns1", "existing").unwrap();

    let seen = stream
        .until(
            "delete of existing",
            |e| matches!(e, Event::Delete(s) if s.name_any() == "existing"),
        )
        .await;
    assert_eq!(
        describe(&seen),
        [
            "Apply web 80",
            "Apply web 8080",
            "Delete web",
            "Delete existing"
        ]
    );

    let watches: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_watch_of(Kind::Service))
        .collect();
    assert_eq!(watches.len(), 1);
    assert_eq!(watches[0].param("allowWatchBookmarks"), Some("true"));
    let lists: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_list_of(Kind::Service))
        .collect();
    assert_eq!(lists.len(), 1);
    assert_eq!(lists[0].param("limit"), Some("500"));
    // The watch starts where the list left off.
    assert_eq!(watches[0].param("resourceVersion").unwrap(), "2");
}

#[tokio::test]
async fn label_selected_watch_sees_objects_move_in_and_out() {
    let (server, client) = start(ServerOptions::default()).await;
    let api: Api<Service> = Api::all(client);
    let mut stream = Watched::spawn(watcher::watcher(
        api,
        watcher::Config::default().labels("app=web"),
    ));
    stream
        .until("initial list", |e| matches!(e, Event::InitDone))
        .await;
    assert!(
        server
            .wait_until(STEP, |s| s.open_watches(Kind::Service) == 1)
            .await
    );

    server
        .apply(&labelled(service("ns1", "a", 1), "app", "db"))
        .unwrap();
    server
        .apply(&labelled(service("ns1", "a", 2), "app", "web"))
        .unwrap();
    server
        .apply(&labelled(service("ns1", "a", 3), "app", "db"))
        .unwrap();
    server
        .apply(&labelled(service("ns1", "marker", 4), "app", "web"))
        .unwrap();
    let seen = stream
        .until(
            "marker",
            |e| matches!(e, Event::Apply(s) if s.name_any() == "marker"),
        )
        .await;
    assert_eq!(describe(&seen), ["Apply a 2", "Delete a", "Apply marker 4"]);
}

#[tokio::test]
async fn node_watch_with_field_selector_sees_only_its_node() {
    let (server, client) = start(ServerOptions::default()).await;
    server.apply(&node("n1", "z1")).unwrap();
    server.apply(&node("n2", "z1")).unwrap();
    let api: Api<Node> = Api::all(client);
    let mut stream = Watched::spawn(watcher::watcher(
        api,
        watcher::Config::default().fields("metadata.name=n1"),
    ));
    let init = stream
        .until("initial list", |e| matches!(e, Event::InitDone))
        .await;
    let names: Vec<_> = init
        .iter()
        .filter_map(|e| match e {
            Event::InitApply(n) => Some(n.name_any()),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["n1"]);
    assert!(
        server
            .wait_until(STEP, |s| s.open_watches(Kind::Node) == 1)
            .await
    );

    server.apply(&node("n2", "z2")).unwrap();
    server.apply(&node("n1", "z3")).unwrap();
    let seen = stream
        .until("n1 update", |e| matches!(e, Event::Apply(_)))
        .await;
    match seen.as_slice() {
        [Event::Apply(n)] => {
            assert_eq!(n.name_any(), "n1");
            assert_eq!(n.labels()["topology.kubernetes.io/zone"], "z3");
        }
        other => panic!("expected only n1's update, got {} events", other.len()),
    }
    let watch = server
        .requests()
        .into_iter()
        .find(|r| r.is_watch_of(Kind::Node))
        .unwrap();
    assert_eq!(watch.path, "/api/v1/nodes");
    assert_eq!(watch.param("fieldSelector"), Some("metadata.name=n1"));
}

#[tokio::test]
async fn namespaced_endpointslice_reflector_tracks_its_namespace() {
    let (server, client) = start(ServerOptions::default()).await;
    server
        .apply(&slice("ns1", "web-1", "web", "10.0.0.1"))
        .unwrap();
    server
        .apply(&slice("ns2", "web-1", "web", "10.0.9.9"))
        .unwrap();
    let api: Api<EndpointSlice> = Api::namespaced(client, "ns1");
    let (reader, writer) = reflector::store();
    let mut stream = reflector(writer, watcher::watcher(api, watcher::Config::default()))
        .default_backoff()
        .boxed();
    let driver = tokio::spawn(async move { while stream.next().await.is_some() {} });
    within("store ready", reader.wait_until_ready())
        .await
        .unwrap();
    assert_eq!(reader.state().len(), 1);

    server
        .apply(&slice("ns1", "web-2", "web", "10.0.0.2"))
        .unwrap();
    server
        .apply(&slice("ns2", "web-2", "web", "10.0.9.8"))
        .unwrap();
    assert!(server.wait_until(STEP, |_| reader.state().len() == 2).await);
    let mut ips: Vec<String> = reader
        .state()
        .iter()
        .map(|s| s.endpoints[0].addresses[0].clone())
        .collect();
    ips.sort();
    assert_eq!(ips, ["10.0.0.1", "10.0.0.2"]);
    let watch = server
        .requests()
        .into_iter()
        .find(|r| r.is_watch_of(Kind::EndpointSlice))
        .unwrap();
    assert_eq!(
        watch.path,
        "/apis/discovery.k8s.io/v1/namespaces/ns1/endpointslices"
    );
    driver.abort();
}

#[tokio::test]
async fn bookmarks_arrive_periodically_and_on_demand() {
    let (server, client) = start(ServerOptions {
        bookmark_interval: None,
        ..Default::default()
    })
    .await;
    server.apply(&service("ns1", "a", 80)).unwrap();
    let api: Api<Service> = Api::all(client.clone());
    let rv = server.resource_version().to_string();
    let mut events = within("watch start", api.watch(&WatchParams::default(), &rv))
        .await
        .unwrap()
        .boxed();
    server.apply(&node("n1", "z1")).unwrap(); // moves the global RV without a Service event
    server.bookmark_now();
    let first = within("bookmark", events.next()).await.unwrap().unwrap();
    match first {
        WatchEvent::Bookmark(b) => assert_eq!(
            b.metadata.resource_version,
            server.resource_version().to_string()
        ),
        other => panic!("expected a bookmark, got {other:?}"),
    }

    let (periodic, client) = start(ServerOptions {
        bookmark_interval: Some(Duration::from_millis(100)),
        ..Default::default()
    })
    .await;
    let api: Api<Service> = Api::all(client);
    let rv = periodic.resource_version().to_string();
    let mut events = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    for _ in 0..3 {
        match within("periodic bookmark", events.next())
            .await
            .unwrap()
            .unwrap()
        {
            WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, rv),
            other => panic!("expected a bookmark, got {other:?}"),
        }
    }
    // Without allowWatchBookmarks none are sent: the next event is the real change.
    let mut quiet = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    periodic.apply(&service("ns1", "b", 80)).unwrap();
    match within("event", quiet.next()).await.unwrap().unwrap() {
        WatchEvent::Added(s) => assert_eq!(s.name_any(), "b"),
        other => panic!("expected ADDED, got {other:?}"),
    }
}

#[tokio::test]
async fn compaction_and_dropped_watches_make_the_watcher_relist() {
    let (server, client) = start(ServerOptions::default()).await;
    server.apply(&service("ns1", "a", 80)).unwrap();
    let api: Api<Service> = Api::all(client);
    let mut stream = Watched::spawn(watcher::watcher(api, watcher::Config::default()));
    stream
        .until("initial list", |e| matches!(e, Event::InitDone))
        .await;
    assert!(
        server
            .wait_until(STEP, |s| s.open_watches(Kind::Service) == 1)
            .await
    );
    let old_rv = server.resource_version();

    server.clear_requests();
    server.compact();
    server.drop_watches();
    server.apply(&service("ns1", "b", 81)).unwrap();

    let relist = stream
        .until("relist", |e| matches!(e, Event::InitDone))
        .await;
    let relist = describe(&relist);
    assert_eq!(
        relist,
        ["Init", "InitApply a 80", "InitApply b 81", "InitDone"]
    );

    let requests = server.requests();
    let resumed = requests
        .iter()
        .position(|r| {
            r.is_watch_of(Kind::Service) && r.param("resourceVersion") == Some(&old_rv.to_string())
        })
        .expect("the watcher first tries to resume from its old RV");
    let listed = requests
        .iter()
        .position(|r| r.is_list_of(Kind::Service))
        .expect("the watcher relists");
    assert!(resumed < listed);

    // Back to normal afterwards: new changes arrive as plain events.
    assert!(
        server
            .wait_until(STEP, |s| s.open_watches(Kind::Service) == 1)
            .await
    );
    server.apply(&service("ns1", "c", 82)).unwrap();
    let seen = stream.until("c", |e| matches!(e, Event::Apply(_))).await;
    assert_eq!(describe(&seen), ["Apply c 82"]);
}

#[tokio::test]
async fn dropped_watches_without_compaction_resume_without_relisting() {
    let (server, client) = start(ServerOptions::default()).await;
    let api: Api<Service> = Api::all(client);
    let mut stream = Watched::spawn(watcher::watcher(api, watcher::Config::default()));
    stream
        .until("initial list", |e| matches!(e, Event::InitDone))
        .await;
    assert!(
        server
            .wait_until(STEP, |s| s.open_watches(Kind::Service) == 1)
            .await
    );
    server.clear_requests();

    server.drop_watches();
    server.apply(&service("ns1", "while-dropped", 80)).unwrap();
    let seen = stream
        .until("change made while the watch was down", |e| {
            matches!(e, Event::Apply(_))
        })
        .await;
    assert_eq!(describe(&seen), ["Apply while-dropped 80"]);
    let requests = server.requests();
    assert!(requests.iter().any(|r| r.is_watch_of(Kind::Service)));
    assert!(!requests.iter().any(|r| r.is_list_of(Kind::Service)));
}

#[tokio::test]
async fn expired_watch_answers_both_ways() {
    for mode in [ExpiredWatch::ErrorEvent, ExpiredWatch::HttpGone] {
        let (server, client) = start(ServerOptions {
            expired_watch: mode,
            ..Default::default()
        })
        .await;
        server.apply(&service("ns1", "a", 80)).unwrap();
        let stale = server.resource_version().to_string();
        server.compact();
        let api: Api<Service> = Api::all(client);
        let started = within("watch", api.watch(&WatchParams::default(), &stale)).await;
        match (mode, started) {
            (ExpiredWatch::ErrorEvent, Ok(events)) => {
                let events: Vec<_> = within("events", events.collect::<Vec<_>>()).await;
                match events.as_slice() {
                    [Ok(WatchEvent::Error(status))] => {
                        assert_eq!(status.code, 410);
                        assert_eq!(status.reason, "Expired");
                    }
                    other => panic!("expected one ERROR event, got {other:?}"),
                }
            }
            (ExpiredWatch::HttpGone, Err(kube::Error::Api(status))) => assert_eq!(status.code, 410),
            (mode, Ok(_)) => panic!("{mode:?}: expected an HTTP error"),
            (mode, Err(e)) => panic!("{mode:?}: unexpected error {e:?}"),
        }
        let record = server
            .requests()
            .into_iter()
            .find(|r| r.is_watch())
            .unwrap();
        let expected = if mode == ExpiredWatch::HttpGone {
            410
        } else {
            200
        };
        assert_eq!(record.status, expected);
    }
}

#[tokio::test]
async fn bounded_history_expires_lagging_resumes() {
    let (server, client) = start(ServerOptions {
        max_history: Some(2),
        ..Default::default()
    })
    .await;
    let api: Api<Service> = Api::all(client);
    let start_rv = server.resource_version().to_string();
    for port in 1..=3 {
        server.apply(&service("ns1", "a", port)).unwrap();
    }
    let events: Vec<_> = within("expired watch", async {
        api.watch(&WatchParams::default(), &start_rv)
            .await
            .unwrap()
            .collect::<Vec<_>>()
            .await
    })
    .await;
    assert!(matches!(events.as_slice(), [Ok(WatchEvent::Error(s))] if s.code == 410));

    // Resuming inside the retained window replays the retained changes in order.
    let inside = (server.resource_version() - 2).to_string();
    let mut events = api
        .watch(&WatchParams::default(), &inside)
        .await
        .unwrap()
        .boxed();
    match within("replay", events.next()).await.unwrap().unwrap() {
        WatchEvent::Modified(s) => assert_eq!(port_of(&s), 2),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
}

#[tokio::test]
async fn streaming_list_mode_works() {
    let (server, client) = start(ServerOptions::default()).await;
    server.apply(&service("ns1", "a", 80)).unwrap();
    server.apply(&service("ns1", "b", 81)).unwrap();
    let api: Api<Service> = Api::all(client);
    let mut stream = Watched::spawn(watcher::watcher(
        api,
        watcher::Config::default().streaming_lists(),
    ));
    let init = stream
        .until("initial events", |e| matches!(e, Event::InitDone))
        .await;
    assert_eq!(
        describe(&init),
        ["Init", "InitApply a 80", "InitApply b 81", "InitDone"]
    );
    server.apply(&service("ns1", "a", 90)).unwrap();
    let seen = stream
        .until("update", |e| matches!(e, Event::Apply(_)))
        .await;
    assert_eq!(describe(&seen), ["Apply a 90"]);
    let watch = server
        .requests()
        .into_iter()
        .find(|r| r.is_watch())
        .unwrap();
    assert_eq!(watch.param("sendInitialEvents"), Some("true"));
    assert!(!server.requests().iter().any(|r| r.is_list()));
}

async fn down_and_back(mode: DownMode) {
    let (server, client) = start(ServerOptions {
        down_mode: mode,
        ..Default::default()
    })
    .await;
    server.apply(&service("ns1", "keep", 80)).unwrap();
    server.apply(&service("ns1", "gone", 81)).unwrap();
    let api: Api<Service> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let mut stream = reflector(
        writer,
        watcher::watcher(api.clone(), watcher::Config::default()),
    )
    .default_backoff()
    .boxed();
    let driver = tokio::spawn(async move { while stream.next().await.is_some() {} });
    within("store ready", reader.wait_until_ready())
        .await
        .unwrap();
    assert!(
        server
            .wait_until(STEP, |s| s.open_watches(Kind::Service) == 1)
            .await
    );

    let port = server.addr().port();
    server.set_down(true);
    assert!(
        server
            .wait_until(STEP, |s| s.open_watches(Kind::Service) == 0)
            .await
    );
    // kube retries 503s for minutes, so a bounded wait that times out also counts as failing.
    let attempt =
        tokio::time::timeout(Duration::from_secs(1), api.list(&ListParams::default())).await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "{mode:?}: a list must fail while the server is down"
    );
    if mode == DownMode::Unavailable {
        assert!(server.requests().iter().any(|r| r.status == 503));
    }
    server.apply(&service("ns1", "new", 82)).unwrap();
    server.apply(&service("ns1", "keep", 8080)).unwrap();
    server.delete(Kind::Service, "ns1", "gone").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let names = |r: &reflector::Store<Service>| {
        let mut v: Vec<_> = r
            .state()
            .iter()
            .map(|s| (s.name_any(), port_of(s)))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&reader),
        [("gone".to_string(), 81), ("keep".to_string(), 80)],
        "{mode:?}: the cache keeps the last state while down"
    );

    server.set_down(false);
    assert_eq!(server.addr().port(), port);
    let want = [("keep".to_string(), 8080), ("new".to_string(), 82)];
    assert!(
        server
            .wait_until(Duration::from_secs(30), |_| names(&reader) == want)
            .await,
        "{mode:?}: changes made while down arrive after recovery, store is {:?}",
        names(&reader)
    );
    driver.abort();
}

#[tokio::test]
async fn down_server_resets_connections_and_recovers() {
    down_and_back(DownMode::Reset).await;
}

#[tokio::test]
async fn down_server_answers_503_and_recovers() {
    down_and_back(DownMode::Unavailable).await;
}

#[tokio::test]
async fn kubeconfig_and_discovery_work_with_kube() {
    let server = FakeApiServer::start().await.unwrap();
    server
        .apply(&service("default", "kubernetes", 443))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("kpt-fake-apiserver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        server.url()
    );
    let client = Client::try_from(config).unwrap();

    let svc = Api::<Service>::default_namespaced(client.clone())
        .get("kubernetes")
        .await
        .unwrap();
    assert_eq!(port_of(&svc), 443);
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "34")
    );
    let discovery = kube::Discovery::new(client).run().await.unwrap();
    let mut kinds: Vec<String> = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .map(|(r, _)| r.kind)
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["EndpointSlice", "Node", "Service"]);
}
