//! End-to-end tests of rate limits, API keys and concurrency limits: real gateways, demo
//! backends and a real `redis-server` on loopback ports.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

fn redis_config(redis: &Redis, backend: &Proc, routes: &str) -> String {
    format!(
        "[state]\nredis_url = \"{}\"\n\n[rate_limit]\nstore = \"redis\"\n\n[upstreams.app]\ninstances = [\"{}\"]\n\n{routes}",
        redis.url(),
        backend.addr()
    )
}

/// [`redis_config`] without Redis: the limits in memory.
fn memory_config(backend: &Proc, routes: &str) -> String {
    format!(
        "[upstreams.app]\ninstances = [\"{}\"]\n\n{routes}",
        backend.addr()
    )
}

/// Fires `n` GETs at once, alternating over `urls`; returns the replies.
async fn burst(client: &Client, urls: &[String], n: usize, headers: &[(&str, &str)]) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let url = urls[i % urls.len()].clone();
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            tokio::spawn(async move {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                request(&client, "GET", &url, &headers, "").await.unwrap()
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    replies
}

fn count(replies: &[Reply], status: u16) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

async fn admin_json(client: &Client, gw: &Gateway, path: &str) -> (u16, serde_json::Value) {
    let reply = get(client, &gw.admin_url(path)).await;
    (reply.status, reply.json())
}

/// 20 a minute per client, one route per algorithm.
const BOTH_ALGORITHMS: &str = r#"
[[routes]]
name = "sw"
path_prefix = "/sw"
upstream = "app"
rate_limits = [{ name = "per_ip_window", limit = 20, period = "1m", algorithm = "sliding_window" }]

[[routes]]
name = "gcra"
path_prefix = "/gcra"
upstream = "app"
rate_limits = [{ name = "per_ip_gcra", limit = 20, period = "1m", burst = 19 }]
"#;

/// A Redis that answers PING but refuses writes (out of memory under `noeviction`) is down
/// until writes pass again: one outage, said once, with `/health/redis` 503 throughout. The
/// link flapped down and up at every request, and the health said 200.
#[tokio::test]
async fn a_redis_refusing_writes_is_one_outage_until_it_takes_them() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let gw = gateway(&redis_config(&redis, &backend, BOTH_ALGORITHMS));
    let client = client();
    let config_set = |value: &str| {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(value)
            .query(&mut redis.conn())
            .unwrap();
    };
    config_set("1");
    // Found by the health check of a gateway no request reached yet, too.
    let (status, health) = admin_json(&client, &gw, "/health/redis").await;
    assert_eq!(status, 503, "{health}");
    for _ in 0..20 {
        assert_eq!(get(&client, &gw.url("/sw")).await.status, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, health) = admin_json(&client, &gw, "/health/redis").await;
    assert_eq!(status, 503, "{health}");
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    assert_eq!(report["redis_outages"], 1, "{report}");
    config_set("0");
    let back = eventually(Duration::from_secs(5), || async {
        admin_json(&client, &gw, "/health/redis").await.0 == 200
    });
    assert!(back.await, "the link never came back");
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    assert_eq!(
        (report["redis_up"].clone(), report["redis_outages"].clone()),
        (true.into(), 1.into())
    );
}

/// The config of [`redis_config`] (both algorithms) connecting as the ACL user `name`, made
/// with `rules`.
fn as_acl_user(redis: &Redis, backend: &Proc, name: &str, rules: &[&str]) -> String {
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(name)
        .arg("on")
        .arg(">secret-pass")
        .arg(rules)
        .query(&mut redis.conn())
        .unwrap();
    redis_config(redis, backend, BOTH_ALGORITHMS).replace(
        "redis://127.0.0.1",
        &format!("redis://{name}:secret-pass@127.0.0.1"),
    )
}

/// A user whose ACL covers the rate-limit keys only (not the link's probe key) is taken as it
/// is: its NOPERM on the probe write neither stops the start nor keeps the limits local.
#[tokio::test]
async fn an_acl_covering_only_the_limits_still_shares_them() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let config = as_acl_user(&redis, &backend, "limits", &["~scalegate:rl:*", "+@all"]);
    let gw = gateway(&config);
    let client = client();
    let replies = burst(&client, &[gw.url("/gcra")], 25, &[]).await;
    assert_eq!(count(&replies, 200), 20);
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    assert_eq!(report["redis_up"], true, "{report}");
    assert_eq!(report["rules"][1]["fallback"], 0, "{report}");
    let (status, health) = admin_json(&client, &gw, "/health/redis").await;
    assert_eq!(status, 200, "{health}");
}

/// A user whose ACL does not let it run scripts (`-evalsha`), or whose key patterns leave out
/// the limiter's keys, could decide nothing: the gateway refuses to start, naming the ACL,
/// rather than take the link down and up with every request.
#[tokio::test]
async fn an_acl_without_scripts_or_the_limit_keys_stops_the_start() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let users: [(&str, &[&str]); 2] = [
        ("noscripts", &["~*", "+@all", "-evalsha"]),
        ("otherkeys", &["~app:*", "+@all"]),
    ];
    for (user, rules) in users {
        let config = as_acl_user(&redis, &backend, user, rules);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl.toml");
        let body =
            format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{config}");
        std::fs::write(&path, body).unwrap();
        let stderr = refused_start(&["serve", "--config", path.to_str().unwrap()]);
        assert!(stderr.contains("state.redis_url"), "{user}: {stderr}");
        assert!(stderr.contains("ACL"), "{user}: {stderr}");
    }
}

/// A rate-limit key of another type (left by the rule's other algorithm, or written by
/// something else) is replaced: the decision stays Redis's and exact. It failed every decision
/// on it, took the whole link down and let the limits pass several times over.
#[tokio::test]
async fn a_key_of_the_wrong_type_is_replaced_not_an_outage() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let gw = gateway(&redis_config(&redis, &backend, BOTH_ALGORITHMS));
    let mut conn = redis.conn();
    let () = redis::cmd("HSET")
        .arg("scalegate:rl:per_ip_gcra:ip:127.0.0.1")
        .arg("w")
        .arg(1)
        .query(&mut conn)
        .unwrap();
    let () = redis::cmd("SET")
        .arg("scalegate:rl:per_ip_window:ip:127.0.0.1")
        .arg("garbage")
        .query(&mut conn)
        .unwrap();
    let client = client();
    for path in ["/gcra", "/sw"] {
        let replies = burst(&client, &[gw.url(path)], 25, &[]).await;
        assert_eq!(count(&replies, 200), 20, "{path}");
    }
    // Numbers that are no numbers (nan, inf) are no state either: replaced, never read as a
    // limit that lets everything through.
    let () = redis::cmd("SET")
        .arg("scalegate:rl:per_ip_gcra:ip:127.0.0.1")
        .arg("nan")
        .query(&mut conn)
        .unwrap();
    let () = redis::cmd("HSET")
        .arg("scalegate:rl:per_ip_window:ip:127.0.0.1")
        .arg("w")
        .arg("inf")
        .query(&mut conn)
        .unwrap();
    for path in ["/gcra", "/sw"] {
        let replies = burst(&client, &[gw.url(path)], 25, &[]).await;
        assert_eq!(count(&replies, 200), 20, "{path} after nan");
    }
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    assert_eq!(report["redis_up"], true, "{report}");
    for rule in report["rules"].as_array().unwrap() {
        assert_eq!(rule["fallback"], 0, "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_of_twenty_five_pass_through_two_replicas_sharing_redis() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let config = redis_config(&redis, &backend, BOTH_ALGORITHMS);
    let a = gateway(&config);
    let b = gateway(&config);
    let client = client();
    for path in ["/sw", "/gcra"] {
        let urls = vec![a.url(path), b.url(path)];
        let replies = burst(&client, &urls, 25, &[]).await;
        assert_eq!(count(&replies, 200), 20, "{path}");
        assert_eq!(count(&replies, 429), 5, "{path}");
        for reply in replies.iter().filter(|r| r.status == 429) {
            let retry_after: u64 = reply.header("retry-after").parse().unwrap();
            // Up to a window, plus the 3 s (60 s / 20) a sliding window's previous count takes
            // to make room for one more when the burst fell at the start of a minute.
            assert!((1..=63).contains(&retry_after), "{retry_after}");
            assert!(reply.header("ratelimit-policy").contains(";q=20;w=60"));
            assert!(reply.header("ratelimit").contains(";r=0;t="));
            assert_eq!(reply.json()["error"], "rate_limited");
            assert!(!reply.json()["request_id"].as_str().unwrap().is_empty());
        }
        let remaining: Vec<u64> = replies
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| {
                let header = r.header("ratelimit");
                header
                    .split(";r=")
                    .nth(1)
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        // Each pass saw a different remaining count: one quota, shared by both replicas.
        let mut sorted = remaining.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<u64>>(), "{path}");
    }
    // Rejections never reached the instance.
    assert_eq!(backend_requests(&client, &backend).await, 40);

    // Keys are namespaced and expire on their own.
    let mut conn = redis.conn();
    let window_ttl: i64 = redis::cmd("PTTL")
        .arg("scalegate:rl:per_ip_window:ip:127.0.0.1")
        .query(&mut conn)
        .unwrap();
    assert!((1..=120_000).contains(&window_ttl), "{window_ttl}");
    let gcra_ttl: i64 = redis::cmd("PTTL")
        .arg("scalegate:rl:per_ip_gcra:ip:127.0.0.1")
        .query(&mut conn)
        .unwrap();
    // Expires at the TAT: 20 requests × 3 s from now.
    assert!((1..=61_000).contains(&gcra_ttl), "{gcra_ttl}");

    let (status, health) = admin_json(&client, &a, "/health/redis").await;
    assert_eq!(status, 200);
    assert_eq!(health["store"], "redis");
    assert!(health["latency_ms"].as_f64().unwrap() >= 0.0);
    // Each replica counts its own decisions.
    let (mut allowed, mut limited) = (0, 0);
    for gw in [&a, &b] {
        let (_, report) = admin_json(&client, gw, "/api/ratelimit").await;
        for rule in report["rules"].as_array().unwrap() {
            allowed += rule["allowed"].as_u64().unwrap();
            limited += rule["limited"].as_u64().unwrap();
            assert_eq!(rule["fallback"], 0, "{report}");
        }
    }
    assert_eq!((allowed, limited), (40, 10));

    // Redis forgets the script: the next decision loads it again and is still Redis's.
    let () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
    assert_eq!(get(&client, &a.url("/gcra")).await.status, 429);
    let (_, report) = admin_json(&client, &a, "/api/ratelimit").await;
    for rule in report["rules"].as_array().unwrap() {
        assert_eq!(rule["fallback"], 0, "{report}");
    }
}

/// A route under a one-a-second rule and a three-an-hour rule, hit ten times at once, then
/// once more a second later: the nine the first rule refused must not have spent the hourly
/// quota. Returns the statuses and the rules' (name, allowed, limited) counts.
async fn retries_under_two_rules(gw: &Gateway) -> (Vec<u16>, Vec<(String, u64, u64)>) {
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(get(&client, &gw.url("/")).await.status);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    statuses.push(get(&client, &gw.url("/")).await.status);
    let (_, report) = admin_json(&client, gw, "/api/ratelimit").await;
    let counts = report["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| {
            (
                rule["name"].as_str().unwrap().to_string(),
                rule["allowed"].as_u64().unwrap(),
                rule["limited"].as_u64().unwrap(),
            )
        })
        .collect();
    (statuses, counts)
}

/// The dashboard's refused requests per second count each 429 once: two rules refusing the same
/// request counted it twice, so 9 refusals showed as 18.
#[tokio::test]
async fn the_dashboard_counts_a_request_two_rules_refuse_once() {
    let backend = demo_backend(&[]);
    let routes = r#"
[[routes]]
upstream = "app"
rate_limits = [
  { name = "per_ip", key = "ip", limit = 1, period = "1m" },
  { name = "everyone", key = "route", limit = 1, period = "1m" },
]
"#;
    let gw = gateway(&memory_config(&backend, routes));
    let client = client();
    let mut replies = Vec::new();
    for _ in 0..10 {
        replies.push(get(&client, &gw.url("/")).await);
    }
    assert_eq!(count(&replies, 429), 9);
    // Each second's point says how many were refused in it, per second.
    let refused = || async {
        let (_, stats) = admin_json(&client, &gw, "/api/stats").await;
        stats["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|point| point["limited_per_s"].as_f64().unwrap_or(0.0))
            .sum::<f64>()
    };
    let counted = eventually(Duration::from_secs(5), || async { refused().await > 6.0 }).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let total = refused().await;
    assert!(counted && (7.0..=11.0).contains(&total), "{total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_one_rule_refuses_does_not_count_against_the_others() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let routes = r#"
[[routes]]
upstream = "app"
rate_limits = [
  { name = "per_second", limit = 1, period = "1s" },
  { name = "per_hour", limit = 3, period = "1h", algorithm = "sliding_window" },
]
"#;
    let shared = redis_config(&redis, &backend, routes);
    let local = shared.replace("store = \"redis\"", "store = \"memory\"");
    let mut expected = vec![200];
    expected.extend([429; 9]);
    expected.push(200);
    for config in [shared, local] {
        let gw = gateway(&config);
        let (statuses, counts) = retries_under_two_rules(&gw).await;
        assert_eq!(statuses, expected, "{config}");
        assert_eq!(
            counts,
            // In the config's order.
            [
                ("per_second".to_string(), 2, 9),
                ("per_hour".to_string(), 2, 0)
            ],
            "{config}"
        );
    }
    // The hourly rule at Redis counted the two that passed.
    let mut conn = redis.conn();
    let count: i64 = redis::cmd("HGET")
        .arg("scalegate:rl:per_hour:ip:127.0.0.1")
        .arg("c")
        .query(&mut conn)
        .unwrap();
    assert_eq!(count, 2);
}

/// Redis drops every client connection (as a restart or a failover does): the next decisions
/// open a new connection and are still made at Redis, none by the fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_redis_connection_is_replaced_without_falling_back() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let routes = r#"
[[routes]]
upstream = "app"
rate_limits = [{ name = "per_ip", limit = 20, period = "1m", burst = 19 }]
"#;
    let config = redis_config(&redis, &backend, routes);
    let (a, b) = (gateway(&config), gateway(&config));
    let client = client();
    let urls = vec![a.url("/"), b.url("/")];
    assert_eq!(count(&burst(&client, &urls, 10, &[]).await, 200), 10);
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query(&mut redis.conn())
        .unwrap();
    assert!(killed >= 2, "{killed}");
    let replies = burst(&client, &urls, 15, &[]).await;
    assert_eq!((count(&replies, 200), count(&replies, 429)), (10, 5));
    for gw in [&a, &b] {
        let (_, report) = admin_json(&client, gw, "/api/ratelimit").await;
        assert_eq!(report["rules"][0]["fallback"], 0, "{report}");
        assert_eq!(report["redis_outages"], 0, "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_falls_back_to_local_limits_and_recovers() {
    let mut redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let routes = r#"
[[routes]]
upstream = "app"
rate_limits = [{ name = "per_client", key = "header:X-Client", limit = 5, period = "1m", burst = 4 }]
"#;
    let gw = gateway(&redis_config(&redis, &backend, routes));
    let client = client();
    let statuses =
        |replies: Vec<Reply>| -> (usize, usize) { (count(&replies, 200), count(&replies, 429)) };
    let url = vec![gw.url("/")];
    assert_eq!(
        statuses(burst(&client, &url, 7, &[("x-client", "a")]).await),
        (5, 2)
    );

    // Background load across the outage: never a 5xx.
    let stop = Arc::new(AtomicBool::new(false));
    let server_errors = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn({
        let (client, url) = (client.clone(), gw.url("/"));
        let (stop, server_errors) = (stop.clone(), server_errors.clone());
        async move {
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let reply = request(&client, "GET", &url, &[("x-client", "load")], "")
                    .await
                    .unwrap();
                if reply.status >= 500 {
                    server_errors.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.kill();
    // The same rule, decided locally: 5 of 7 still pass for a new client.
    assert_eq!(
        statuses(burst(&client, &url, 7, &[("x-client", "b")]).await),
        (5, 2)
    );
    let (status, health) = admin_json(&client, &gw, "/health/redis").await;
    assert_eq!(status, 503, "{health}");
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    assert_eq!(report["redis_up"], false);
    assert!(
        report["rules"][0]["fallback"].as_u64().unwrap() >= 7,
        "{report}"
    );

    redis.restart();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (status, health) = admin_json(&client, &gw, "/health/redis").await;
            status == 200 && health["shared"] == true
        })
        .await
    );
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(server_errors.load(Ordering::Relaxed), 0);
    // Shared again: the decision is made in Redis, where the key now lives.
    assert_eq!(
        statuses(burst(&client, &url, 7, &[("x-client", "c")]).await),
        (5, 2)
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg("scalegate:rl:per_client:h:c")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(exists, 1);
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    assert_eq!(report["redis_outages"], 1);
}

/// A read-only replica answers PING but refuses every write: it is down for the shared state,
/// said once, shown by `/health/redis` and `redis_up`, and decisions fall back to this
/// instance; the link does not flap up at every probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replica_is_not_taken_for_a_serving_redis() {
    let primary = Redis::start(None);
    let primary_port = primary.port.to_string();
    let replica = Redis::start_with(None, &["--replicaof", "127.0.0.1", &primary_port], None);
    let backend = demo_backend(&[]);
    let routes = "[[routes]]\nupstream = \"app\"\nrate_limits = [{ name = \"ro\", limit = 100, period = \"1m\", burst = 99 }]\n";
    let gw = gateway_logging(&redis_config(&replica, &backend, routes));
    let client = client();
    for _ in 0..10 {
        assert_eq!(get(&client, &gw.url("/")).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, health) = admin_json(&client, &gw, "/health/redis").await;
    assert_eq!(status, 503, "{health}");
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    assert_eq!(report["redis_up"], false, "{report}");
    assert_eq!(report["rules"][0]["fallback"], 10, "{report}");
    let lines = gw.proc.log_lines();
    let back_up = lines
        .iter()
        .filter(|l| l.contains("Redis answers again"))
        .count();
    assert_eq!(back_up, 0, "{lines:?}");
    // Said once, at start, naming the cause.
    let down = lines
        .iter()
        .filter(|l| l.contains("until it answers"))
        .count();
    assert_eq!(down, 1, "{lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("read-only replica")),
        "{lines:?}"
    );
    drop(primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_password_is_checked_at_start_and_a_change_falls_back() {
    let redis = Redis::start(Some("right-password"));
    let backend = demo_backend(&[]);
    let routes = "[[routes]]\nupstream = \"app\"\nrate_limits = [{ name = \"pw\", limit = 100, period = \"1m\", burst = 99 }]\n";

    // Wrong password: the gateway refuses to start and names the key, not the password.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refused.toml");
    let refused = |body: String| {
        std::fs::write(
            &path,
            format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{body}"),
        )
        .unwrap();
        refused_start(&["serve", "--config", path.to_str().unwrap()])
    };
    let wrong = redis_config(&redis, &backend, routes).replace("right-password", "wrong-password");
    let stderr = refused(wrong);
    assert!(stderr.contains("state.redis_url"), "{stderr}");
    assert!(!stderr.contains("wrong-password"), "{stderr}");
    // No password where Redis wants one (NOAUTH, though the connection opened) is the same
    // mistake.
    let none = redis_config(&redis, &backend, routes).replace(":right-password@", "");
    let stderr = refused(none);
    assert!(stderr.contains("refused the credentials"), "{stderr}");

    // Right password: decisions in Redis.
    let gw = gateway(&redis_config(&redis, &backend, routes));
    let client = client();
    assert_eq!(get(&client, &gw.url("/")).await.status, 200);
    let mut conn = redis.conn();
    let exists: i64 = redis::cmd("EXISTS")
        .arg("scalegate:rl:pw:ip:127.0.0.1")
        .query(&mut conn)
        .unwrap();
    assert_eq!(exists, 1);

    // The password changes under a running gateway: local limits, no 5xx.
    redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "new-password"])
        .query::<()>(&mut conn)
        .unwrap();
    let _ = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal"])
        .query::<()>(&mut conn);
    for _ in 0..20 {
        assert_eq!(get(&client, &gw.url("/")).await.status, 200);
    }
    let (status, _) = admin_json(&client, &gw, "/health/redis").await;
    assert_eq!(status, 503);
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    // Every one of the 20 was decided locally: a killed connection and a refused password leave
    // nothing to decide at Redis.
    assert_eq!(report["rules"][0]["fallback"], 20, "{report}");
    // Metrics count them once by outcome and once more in their own family, so a sum over
    // outcomes is the number of requests decided.
    let metrics = get(&client, &gw.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    for line in [
        "scalegate_rate_limit_decisions_total{rule=\"pw\",outcome=\"allowed\"} 21",
        "scalegate_rate_limit_fallback_decisions_total{rule=\"pw\"} 20",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in {metrics}"
        );
    }
    assert!(!metrics.contains("outcome=\"fallback\""), "{metrics}");
}

#[tokio::test]
async fn api_keys_guard_routes_and_key_rate_limits() {
    let backend = demo_backend(&[]);
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys");
    std::fs::write(&keys_file, "# one key a line\nfile-key-0002\n").unwrap();
    let config = format!(
        r#"[auth]
api_keys = ["inline-key-0001"]
api_keys_file = "{}"

[upstreams.app]
instances = ["{}"]

[[routes]]
upstream = "app"

[[routes]]
name = "private"
path_prefix = "/private"
upstream = "app"
auth = "api_key"
rate_limits = [{{ key = "api_key", limit = 2, period = "1m", burst = 1 }}]

[[routes]]
name = "metered"
path_prefix = "/metered"
upstream = "app"
rate_limits = [{{ key = "api_key", limit = 2, period = "1m", burst = 1 }}]
"#,
        keys_file.display(),
        backend.addr()
    );
    let gw = gateway(&config);
    let client = client();
    let url = gw.url("/private/x");
    let missing = get(&client, &url).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"], "unauthorized");
    assert_eq!(missing.json()["reason"], "missing API key");
    assert!(!missing.json()["request_id"].as_str().unwrap().is_empty());
    // RFC 9110 §15.5.2: a 401 names how to authenticate.
    assert_eq!(
        missing.header("www-authenticate"),
        "ApiKey header=\"x-api-key\""
    );
    let wrong = request(
        &client,
        "GET",
        &url,
        &[("x-api-key", "inline-key-0009")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["reason"], "wrong API key");
    // Refused keys count under the route's rules by address, as nginx limits before it checks
    // credentials: past two, guessing is throttled. The same path in disguise is the same
    // route (instances resolve these to /private/x), so its rule refuses them too.
    for disguised in [
        "/private/x",
        "/open/../private/x",
        "//private/x",
        "/./%70rivate/x",
    ] {
        let reply = request(
            &client,
            "GET",
            &gw.url(disguised),
            &[("x-api-key", "guess")],
            "",
        )
        .await
        .unwrap();
        assert_eq!(reply.status, 429, "{disguised}");
    }
    for key in ["inline-key-0001", "file-key-0002"] {
        let statuses: Vec<u16> = {
            let mut out = Vec::new();
            for _ in 0..3 {
                let reply = request(&client, "GET", &url, &[("x-api-key", key)], "")
                    .await
                    .unwrap();
                out.push(reply.status);
            }
            out
        };
        // Two per key (limit 2 with burst 1 at once), each key its own quota.
        assert_eq!(statuses, [200, 200, 429], "{key}");
    }
    assert_eq!(get(&client, &gw.url("/open")).await.status, 200);
    assert_eq!(backend_requests(&client, &backend).await, 5);
    // Only the four that went on count as allowed: not the two 401s that passed the rule.
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    let allowed: u64 = report["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| rule["allowed"].as_u64().unwrap())
        .sum();
    assert_eq!(allowed, 4, "{report}");

    // A route without auth still counts by the key presented; requests without a valid one
    // share their address's quota.
    let metered = gw.url("/metered");
    let mut statuses = Vec::new();
    for key in [
        "inline-key-0001",
        "inline-key-0001",
        "inline-key-0001",
        "file-key-0002",
        "",
        "inline-key-0009",
        "",
    ] {
        let headers: &[(&str, &str)] = if key.is_empty() {
            &[]
        } else {
            &[("x-api-key", key)]
        };
        let reply = request(&client, "GET", &metered, headers, "")
            .await
            .unwrap();
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [200, 200, 429, 200, 200, 200, 429]);
}

/// A rule keyed by a header on a route that requires a key: a guesser sending a new header
/// value with each wrong key still counts by its address, so past the limit its guesses get
/// 429, while a valid key keeps counting by the header.
#[tokio::test]
async fn key_guesses_count_by_address_under_a_header_keyed_rule() {
    let backend = demo_backend(&[]);
    let config = format!(
        r#"[auth]
api_keys = ["inline-key-0001"]

[upstreams.app]
instances = ["{}"]

[[routes]]
upstream = "app"
auth = "api_key"
rate_limits = [{{ name = "per_tenant", key = "header:X-Tenant", limit = 2, period = "1m", burst = 1 }}]
"#,
        backend.addr()
    );
    let gw = gateway(&config);
    let client = client();
    let url = gw.url("/x");
    let mut statuses = Vec::new();
    for tenant in 0..6 {
        let tenant = format!("tenant-{tenant}");
        let reply = request(
            &client,
            "GET",
            &url,
            &[("x-api-key", "guess"), ("x-tenant", &tenant)],
            "",
        )
        .await
        .unwrap();
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [401, 401, 429, 429, 429, 429]);
    // A valid key counts by its tenant, not by the address the guesses used up.
    let valid = request(
        &client,
        "GET",
        &url,
        &[("x-api-key", "inline-key-0001"), ("x-tenant", "tenant-0")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(valid.status, 200);
    assert_eq!(backend_requests(&client, &backend).await, 1);
}

/// The first route's concurrency limit: requests in flight and waiting in its queue.
async fn limit_state(client: &Client, gw: &Gateway) -> (u64, u64) {
    let (_, report) = admin_json(client, gw, "/api/ratelimit").await;
    let limit = &report["concurrency"]["routes"][0]["limit"];
    (
        limit["in_flight"].as_u64().unwrap(),
        limit["waiting"].as_u64().unwrap(),
    )
}

/// Waits until the limit reads `state`, for at most `within`.
async fn limit_reaches(client: &Client, gw: &Gateway, state: (u64, u64), within: Duration) -> bool {
    eventually(within, || async { limit_state(client, gw).await == state }).await
}

/// An instance slower than any wait below: a place freed before its answer was freed by the
/// client leaving.
const SLOW_MS: &str = "3000";
const WELL_BEFORE_THE_ANSWER: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_takes_its_request_and_its_place_with_it() {
    let backend = demo_backend(&["--latency-ms", SLOW_MS]);
    let config = format!(
        "[upstreams.app]\ninstances = [\"{}\"]\n\n[[routes]]\nupstream = \"app\"\n\
         max_in_flight = 1\nqueue_size = 1\nqueue_timeout = \"5s\"\n",
        backend.addr()
    );
    let gw = gateway(&config);
    let client = client();
    // One client is served, one waits in the queue.
    let mut leaving = Vec::new();
    for state in [(1, 0), (1, 1)] {
        let mut stream = std::net::TcpStream::connect(gw.proxy).unwrap();
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        leaving.push(stream);
        assert!(limit_reaches(&client, &gw, state, Duration::from_secs(5)).await);
    }
    // The served one reached the instance (on a loaded machine, after a while).
    let reached = || async { backend_requests(&client, &backend).await == 1 };
    assert!(eventually(Duration::from_secs(5), reached).await);
    // Both give up, the queued one first (so it cannot take the place the other frees): each
    // place is freed long before the instance would have answered.
    for state in [(1, 0), (0, 0)] {
        drop(leaving.pop());
        assert!(
            limit_reaches(&client, &gw, state, WELL_BEFORE_THE_ANSWER).await,
            "{state:?}"
        );
    }
    // A client that stays is served, and the queued request never reached the instance.
    assert_eq!(get(&client, &gw.url("/slow")).await.status, 200);
    assert_eq!(backend_requests(&client, &backend).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_after_sending_its_body_frees_its_place() {
    let backend = demo_backend(&["--latency-ms", SLOW_MS]);
    let config = format!(
        "[upstreams.app]\ninstances = [\"{}\"]\n\n[[routes]]\nupstream = \"app\"\n\
         max_in_flight = 1\nqueue_size = 0\n",
        backend.addr()
    );
    let gw = gateway(&config);
    let client = client();
    for expect in ["", "Expect: 100-continue\r\n"] {
        let mut leaving = std::net::TcpStream::connect(gw.proxy).unwrap();
        let head = format!("POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n{expect}\r\n");
        leaving.write_all(head.as_bytes()).unwrap();
        leaving.write_all(b"hello").unwrap();
        assert!(limit_reaches(&client, &gw, (1, 0), Duration::from_secs(5)).await);
        drop(leaving);
        assert!(
            limit_reaches(&client, &gw, (0, 0), WELL_BEFORE_THE_ANSWER).await,
            "{expect:?}"
        );
        // Without a queue, a request finding the place taken would get 503.
        assert_eq!(
            get(&client, &gw.url("/next")).await.status,
            200,
            "{expect:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_limit_queues_then_answers_503() {
    let backend = demo_backend(&["--latency-ms", "300"]);
    let config = format!(
        r#"[upstreams.app]
instances = ["{}"]

[[routes]]
upstream = "app"
max_in_flight = 1
queue_size = 1
queue_timeout = "2s"
"#,
        backend.addr()
    );
    let gw = gateway(&config);
    let client = client();
    let replies = burst(&client, &[gw.url("/slow")], 3, &[]).await;
    // One in flight, one waits its turn, the third finds the queue full.
    assert_eq!(count(&replies, 200), 2);
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].header("retry-after"), "2");
    assert_eq!(refused[0].json()["error"], "overloaded");
    assert_eq!(backend_requests(&client, &backend).await, 2);
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    assert_eq!(report["concurrency"]["routes"][0]["limit"]["in_flight"], 0);
    assert_eq!(report["concurrency"]["routes"][0]["limit"]["refused"], 1);
    assert_eq!(report["store"], "memory");
    let (status, health) = admin_json(&client, &gw, "/health/redis").await;
    assert_eq!((status, health["store"].as_str()), (200, Some("memory")));
}

/// A Redis restarted while a replica served nothing: no decision replaced its dead connection,
/// so its health check must, or it says 503 for good (and a readiness probe on it keeps the
/// replica out of traffic that would heal it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_replica_health_finds_a_restarted_redis() {
    let mut redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let gw = gateway(&redis_config(&redis, &backend, BOTH_ALGORITHMS));
    let client = client();
    assert_eq!(get(&client, &gw.url("/gcra")).await.status, 200);
    redis.kill();
    redis.restart();
    let healthy = eventually(Duration::from_secs(5), || async {
        admin_json(&client, &gw, "/health/redis").await.0 == 200
    })
    .await;
    assert!(
        healthy,
        "{}",
        admin_json(&client, &gw, "/health/redis").await.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_redis_at_start_follows_on_redis_error_then_shares() {
    // Nothing listens on the port yet.
    let mut redis = Redis::start(None);
    redis.kill();
    let backend = demo_backend(&[]);
    let routes = "[[routes]]\nupstream = \"app\"\nrate_limits = [{ name = \"start\", limit = 2, period = \"1m\", burst = 1 }]\n";
    let base = redis_config(&redis, &backend, routes);
    let with_policy = |policy: &str| {
        base.replace(
            "[rate_limit]",
            &format!("on_redis_error = \"{policy}\"\n[rate_limit]"),
        )
    };
    let local = gateway(&with_policy("local"));
    let allow = gateway(&with_policy("allow"));
    let deny = gateway(&with_policy("deny"));
    let client = client();
    let statuses = |replies: Vec<Reply>| -> Vec<u16> {
        let mut s: Vec<u16> = replies.iter().map(|r| r.status).collect();
        s.sort_unstable();
        s
    };
    assert_eq!(
        statuses(burst(&client, &[local.url("/")], 3, &[]).await),
        [200, 200, 429]
    );
    let allowed = burst(&client, &[allow.url("/")], 3, &[]).await;
    // Nothing was decided: no quota is told of.
    assert!(allowed.iter().all(|r| r.header("ratelimit").is_empty()));
    assert_eq!(statuses(allowed), [200, 200, 200]);
    // Yet counted, as allowed and as fallbacks alike.
    let (_, report) = admin_json(&client, &allow, "/api/ratelimit").await;
    let rule = &report["rules"][0];
    assert_eq!(
        (&rule["allowed"], &rule["fallback"]),
        (&3.into(), &3.into()),
        "{report}"
    );
    // The health says why Redis is down: the probe's own error.
    let (status, health) = admin_json(&client, &allow, "/health/redis").await;
    assert_eq!(status, 503);
    assert!(
        health["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("refused"),
        "{health}"
    );
    let denied = burst(&client, &[deny.url("/")], 3, &[]).await;
    assert!(denied
        .iter()
        .all(|r| r.status == 429 && r.header("retry-after") == "1"));

    // Redis comes up: every replica finds it and the quota is shared from then on.
    redis.restart();
    for gw in [&local, &allow, &deny] {
        assert!(
            eventually(Duration::from_secs(10), || async {
                let (status, health) = admin_json(&client, gw, "/health/redis").await;
                status == 200 && health["shared"] == true
            })
            .await
        );
    }
    let urls = vec![local.url("/"), allow.url("/"), deny.url("/")];
    assert_eq!(
        statuses(burst(&client, &urls, 3, &[]).await),
        [200, 200, 429]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_shares_limits_across_slots() {
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Redis> = (0..3)
        .map(|_| {
            Redis::start_with(
                None,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes-{port}.conf",
                ],
                Some(dir.path()),
            )
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(created.success());
    assert!(
        eventually(Duration::from_secs(15), || async {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut nodes[0].conn())
                .unwrap_or_default();
            info.contains("cluster_state:ok")
        })
        .await
    );

    let backend = demo_backend(&[]);
    let config = format!(
        "[state]\nredis_url = \"{}, {}\"\nredis_cluster = true\n\n[rate_limit]\nstore = \"redis\"\n\n[upstreams.app]\ninstances = [\"{}\"]\n\n[[routes]]\nupstream = \"app\"\nrate_limits = [{{ name = \"cl\", key = \"header:X-Client\", limit = 5, period = \"1m\", burst = 4 }}]\n\n[[routes]]\npath_prefix = \"/two\"\nupstream = \"app\"\nrate_limits = [{{ name = \"per_hour\", key = \"header:X-Client\", limit = 3, period = \"1h\", algorithm = \"sliding_window\" }}, {{ name = \"per_second\", key = \"header:X-Client\", limit = 1, period = \"1s\" }}]\n",
        nodes[0].url(),
        nodes[1].url(),
        backend.addr()
    );
    let a = gateway(&config);
    let b = gateway(&config);
    let client = client();
    // Clients whose keys hash to different slots (and so, nodes): each gets 5 of 7, through
    // either replica.
    for name in ["alice", "bob", "carol", "dave"] {
        let replies = burst(&client, &[a.url("/"), b.url("/")], 7, &[("x-client", name)]).await;
        assert_eq!(
            (count(&replies, 200), count(&replies, 429)),
            (5, 2),
            "{name}"
        );
    }
    let holding = nodes
        .iter()
        .filter(|n| redis::cmd("DBSIZE").query::<i64>(&mut n.conn()).unwrap() > 0)
        .count();
    assert!(holding >= 2, "keys on {holding} node(s)");
    let (status, health) = admin_json(&client, &a, "/health/redis").await;
    assert_eq!(status, 200, "{health}");
    // Two rules, decided one after the other on the cluster: what the hourly rule booked for
    // a request the per-second rule then refused is given back, so a client retrying on the
    // per-second 429 keeps its hourly quota.
    let two = [("x-client", "erin")];
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let reply = request(&client, "GET", &a.url("/two"), &two, "")
            .await
            .unwrap();
        statuses.push(reply.status);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for gw in [&a, &b] {
        let reply = request(&client, "GET", &gw.url("/two"), &two, "")
            .await
            .unwrap();
        statuses.push(reply.status);
    }
    let mut expected = vec![200];
    expected.extend([429; 9]);
    expected.extend([200, 429]);
    assert_eq!(statuses, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_are_shared_over_rediss_with_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let redis = tls_redis(dir.path());
    let port = redis.port;

    let backend = demo_backend(&[]);
    let config = |ca: &str| {
        format!(
            "[state]\nredis_url = \"rediss://127.0.0.1:{port}\"\n{ca}\n[rate_limit]\nstore = \"redis\"\n\n[upstreams.app]\ninstances = [\"{}\"]\n\n[[routes]]\nupstream = \"app\"\nrate_limits = [{{ name = \"tls\", limit = 3, period = \"1m\", burst = 2 }}]\n",
            backend.addr()
        )
    };
    let with_ca = format!("redis_ca = \"{}\"", path("ca.pem"));
    let a = gateway(&config(&with_ca));
    let b = gateway(&config(&with_ca));
    let client = client();
    for gw in [&a, &b] {
        let (status, health) = admin_json(&client, gw, "/health/redis").await;
        assert_eq!(
            (status, &health["shared"]),
            (200, &serde_json::json!(true)),
            "{health}"
        );
    }
    // One quota of 3 across both replicas, decided at Redis over TLS (no fallback).
    let replies = burst(&client, &[a.url("/"), b.url("/")], 6, &[]).await;
    assert_eq!((count(&replies, 200), count(&replies, 429)), (3, 3));
    for gw in [&a, &b] {
        let (_, report) = admin_json(&client, gw, "/api/ratelimit").await;
        assert_eq!(report["rules"][0]["fallback"], 0, "{report}");
    }

    // Without the CA the server's certificate is not trusted: not shared, limits stay local.
    let untrusting = gateway(&config(""));
    let (status, health) = admin_json(&client, &untrusting, "/health/redis").await;
    assert_eq!(status, 503, "{health}");
    let replies = burst(&client, &[untrusting.url("/")], 4, &[]).await;
    assert_eq!((count(&replies, 200), count(&replies, 429)), (3, 1));
}

/// A bare HTTP/1.1 instance whose responses stream: the head and a first chunk at once, the
/// rest only after the test adds a permit to `release`. `seen` counts the requests it got.
async fn streaming_instance(
    release: Arc<tokio::sync::Semaphore>,
    seen: Arc<AtomicU64>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (release, seen) = (release.clone(), seen.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    head.clear();
                    seen.fetch_add(1, Ordering::SeqCst);
                    let first =
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                    if stream.write_all(first).await.is_err() {
                        return;
                    }
                    release.acquire().await.unwrap().forget();
                    if stream.write_all(b"4\r\nlast\r\n0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streaming_body_keeps_its_concurrency_slot_until_it_ends() {
    use http_body_util::BodyExt;
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let instance = streaming_instance(release.clone(), Arc::default()).await;
    let gw = gateway(&format!(
        "[upstreams.app]\ninstances = [\"{instance}\"]\n\n[[routes]]\nupstream = \"app\"\nmax_in_flight = 1\nqueue_size = 0\n"
    ));
    let client = client();
    let request = || {
        http::Request::get(gw.url("/stream"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let response = client.request(request()).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first");

    // The head is back but the body still streams: the slot is taken.
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    assert_eq!(
        report["concurrency"]["routes"][0]["limit"]["in_flight"], 1,
        "{report}"
    );
    let refused = get(&client, &gw.url("/other")).await;
    assert_eq!(refused.status, 503);

    release.add_permits(1);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "last");
    // The body ended: the slot is free for the next request.
    release.add_permits(1);
    let next = get(&client, &gw.url("/next")).await;
    assert_eq!((next.status, &next.body[..]), (200, &b"firstlast"[..]));
    let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
    assert_eq!(
        report["concurrency"]["routes"][0]["limit"]["in_flight"], 0,
        "{report}"
    );
    assert_eq!(report["concurrency"]["routes"][0]["limit"]["refused"], 1);
}

/// `max_in_flight` lowered from 4 to 1 by a reload while 4 run and 3 wait: the queue does not
/// drain at the old limit. Nothing is let in until all 4 ended, then one at a time, each
/// when the one before it ended (the instance answers only when the test says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_limit_lowered_by_a_reload_holds_back_the_queue() {
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let seen = Arc::new(AtomicU64::new(0));
    let instance = streaming_instance(release.clone(), seen.clone()).await;
    let config = |max_in_flight: u32| {
        format!(
            "[upstreams.app]\ninstances = [\"{instance}\"]\n\n[[routes]]\nupstream = \"app\"\nmax_in_flight = {max_in_flight}\nqueue_size = 100\nqueue_timeout = \"30s\"\n"
        )
    };
    let gw = gateway(&config(4));
    let client = client();
    let replies: Vec<_> = (0..7)
        .map(|i| {
            let (client, url) = (client.clone(), gw.url(&format!("/{i}")));
            tokio::spawn(async move { request(&client, "GET", &url, &[], "").await })
        })
        .collect();
    // The state of the route's limit: (in flight, waiting, requests the instance got).
    let state = || async {
        let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
        let limit = &report["concurrency"]["routes"][0]["limit"];
        (
            limit["in_flight"].as_u64().unwrap(),
            limit["waiting"].as_u64().unwrap(),
            seen.load(Ordering::SeqCst),
        )
    };
    let reaches = |expected: (u64, u64, u64)| async move {
        eventually(Duration::from_secs(10), || async {
            state().await == expected
        })
        .await
    };
    assert!(reaches((4, 3, 4)).await, "{:?}", state().await);
    gw.write_config(&config(1));
    let reload = request(&client, "POST", &gw.admin_url("/api/reload"), &[], "")
        .await
        .unwrap();
    assert_eq!(reload.status, 200, "{:?}", reload.body);
    // Three of the four end: one still runs, which is the new limit, and the queue waits.
    release.add_permits(3);
    assert!(reaches((1, 3, 4)).await, "{:?}", state().await);
    // Then each one ending lets exactly one more in.
    for (waiting, seen) in [(2, 5), (1, 6), (0, 7)] {
        release.add_permits(1);
        assert!(reaches((1, waiting, seen)).await, "{:?}", state().await);
    }
    release.add_permits(1);
    for reply in replies {
        assert_eq!(reply.await.unwrap().unwrap().status, 200);
    }
    assert_eq!(state().await, (0, 0, 7));
}

/// A limit raised by a reload holds at once, in memory as in Redis: what the old limit booked
/// does not keep clients waiting as long as it said.
#[tokio::test]
async fn a_limit_raised_by_a_reload_holds_at_once() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let rule = |limit: &str| {
        format!("[[routes]]\nupstream = \"app\"\nrate_limits = [{{ name = \"r\", {limit} }}]\n")
    };
    let strict = rule("limit = 1, period = \"1h\"");
    let loose = rule("limit = 1000, period = \"1m\", burst = 100");
    let client = client();
    for (gw, loosened) in [
        (
            gateway(&memory_config(&backend, &strict)),
            memory_config(&backend, &loose),
        ),
        (
            gateway(&redis_config(&redis, &backend, &strict)),
            redis_config(&redis, &backend, &loose),
        ),
    ] {
        assert_eq!(get(&client, &gw.url("/")).await.status, 200);
        let refused = get(&client, &gw.url("/")).await;
        assert_eq!(refused.status, 429);
        assert!(refused.header("retry-after").parse::<u64>().unwrap() > 3000);
        gw.reload_with(&loosened);
        let passes = eventually(Duration::from_secs(5), || async {
            get(&client, &gw.url("/")).await.status == 200
        })
        .await;
        assert!(passes, "the raised limit did not hold");
        // The admin API lists the rules in force, not one a reload removed.
        gw.reload_with(&loosened.replace("name = \"r\"", "name = \"s\""));
        let listed = eventually(Duration::from_secs(5), || async {
            let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
            report["rules"]
                == serde_json::json!([
                    {"name": "s", "allowed": 0, "limited": 0, "delayed": 0, "fallback": 0}
                ])
        })
        .await;
        assert!(
            listed,
            "{}",
            admin_json(&client, &gw, "/api/ratelimit").await.1
        );
    }
}

/// nginx `limit_req burst=4` without `nodelay`, in memory as in Redis: of six fired at once,
/// five pass and leave spaced at the rate (100 ms), the sixth is refused at once; with
/// `delay = 2` the first three go together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rule_with_a_delay_spaces_a_burst_out_at_the_rate() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let rule = |delay: u64| {
        format!(
            "[[routes]]\nupstream = \"app\"\nrate_limits = [{{ name = \"paced\", limit = 10, \
             period = \"1s\", burst = 4, delay = {delay} }}]\n"
        )
    };
    let client = client();
    for (config, delay) in [
        (memory_config(&backend, &rule(0)), 0),
        (redis_config(&redis, &backend, &rule(0)), 0),
        (memory_config(&backend, &rule(2)), 2),
    ] {
        let gw = gateway(&config);
        // Warm the client's connections, then a quiet second for the quota to refill.
        assert_eq!(get(&client, &gw.url("/")).await.status, 200);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let start = std::time::Instant::now();
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let (client, url) = (client.clone(), gw.url("/"));
                tokio::spawn(async move {
                    let reply = get(&client, &url).await;
                    (reply.status, start.elapsed())
                })
            })
            .collect();
        let mut replies = Vec::new();
        for task in tasks {
            replies.push(task.await.unwrap());
        }
        replies.sort_by_key(|(_, took)| *took);
        let passed: Vec<Duration> = replies
            .iter()
            .filter(|(status, _)| *status == 200)
            .map(|(_, took)| *took)
            .collect();
        assert_eq!(passed.len(), 5, "{replies:?}");
        // Only lower bounds: the k-th past the undelayed ones waits k intervals at least.
        for (place, took) in passed.iter().enumerate().skip(delay + 1) {
            let wait = Duration::from_millis(100 * (place - delay) as u64 - 20);
            assert!(
                *took >= wait,
                "request {place} left after {took:?}: {replies:?}"
            );
        }
        let (_, report) = admin_json(&client, &gw, "/api/ratelimit").await;
        let rule = &report["rules"][0];
        assert_eq!(rule["delayed"], 4 - delay as u64, "{report}");
        assert_eq!(rule["limited"], 1, "{report}");
        let metrics = get(&client, &gw.admin_url("/metrics")).await;
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        let expected = format!(
            "scalegate_rate_limit_delayed_total{{rule=\"paced\"}} {}",
            4 - delay
        );
        assert!(text.contains(&expected), "{text}");
    }
}

/// A delay that can hold a request for more than a minute is said at start, naming the rule
/// and the wait (nginx takes such a `limit_req` silently).
#[tokio::test]
async fn a_delay_that_holds_requests_for_long_is_warned_of() {
    let backend = demo_backend(&[]);
    let gw = gateway_logging(&memory_config(
        &backend,
        "[[routes]]\nupstream = \"app\"\nrate_limits = [{ name = \"hourly\", limit = 1, \
         period = \"1h\", burst = 2, delay = 0 }, { name = \"brisk\", limit = 10, \
         period = \"1s\", burst = 5, delay = 0 }]\n",
    ));
    let warned = |rule: &str| {
        gw.proc.log_lines().iter().any(|line| {
            line.contains("a rate limit's delay can hold a request this long")
                && line.contains(&format!("\"rule\":\"{rule}\""))
        })
    };
    let said = eventually(Duration::from_secs(2), || async { warned("hourly") }).await;
    assert!(said, "{:?}", gw.proc.log_lines());
    assert!(gw
        .proc
        .log_lines()
        .iter()
        .any(|l| l.contains("\"longest_wait_secs\":7200")));
    assert!(!warned("brisk"));
}

/// A delayed POST whose client sent its whole body and left during the wait is not sent to
/// the instance after it (nginx answers it 499): its body is read while it waits, so the
/// client's connection is watched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_while_delayed_takes_its_request_with_it() {
    let backend = demo_backend(&[]);
    let gw = gateway_logging(&memory_config(
        &backend,
        "[[routes]]\nupstream = \"app\"\nrate_limits = [{ name = \"paced\", limit = 10, \
         period = \"1s\", burst = 20, delay = 0 }]\n",
    ));
    let client = client();
    assert_eq!(get(&client, &gw.url("/first")).await.status, 200);
    // Twenty more wait 100 ms to 2 s: each sent whole, then its client goes.
    let left: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            let mut left = std::net::TcpStream::connect(gw.proxy).unwrap();
            left.write_all(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
                .unwrap();
            left
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(left);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(backend_requests(&client, &backend).await, 1);
    // Each ended when its client left, before any instance was tried (logged 499, as nginx
    // does): none came as far as a connection to the instance after its wait.
    let lines = access_lines(&gw);
    let posts: Vec<&serde_json::Value> = lines.values().filter(|l| l["path"] == "/p").collect();
    assert_eq!(posts.len(), 20, "{lines:?}");
    for line in posts {
        assert_eq!(line["status"], 499, "{line}");
        assert_eq!(line["attempts"], 0, "{line}");
    }
}

/// A stop lets delayed requests whose turn comes within `shutdown_grace` be served, and
/// answers 503 at once to those it would cut before their turn: they were cut at the end of the
/// grace, unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_answers_the_delayed_requests_it_cannot_wait_for() {
    let backend = demo_backend(&[]);
    let gw = gateway_with_server_keys(
        "shutdown_grace = \"4s\"",
        &memory_config(
            &backend,
            "[[routes]]\nupstream = \"app\"\nrate_limits = [{ name = \"slow\", limit = 1, \
             period = \"2s\", burst = 5, delay = 0 }]\n",
        ),
    );
    let client = client();
    // Three at once: one goes, one waits 2 s (its answer has time within the grace), one 4 s
    // (none left: a second is kept for the answer).
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let (client, url) = (client.clone(), gw.url("/"));
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(gw.proc.pid(), "TERM");
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    let mut statuses: Vec<u16> = replies.iter().map(|reply| reply.status).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 503]);
    let refused = replies.iter().find(|reply| reply.status == 503).unwrap();
    assert_eq!(refused.json()["error"], "shutting_down");
    assert_eq!(refused.header("retry-after"), "1");
    assert_eq!(backend_requests(&client, &backend).await, 2);
    let status = gw.exit_status().await;
    assert!(status.success(), "{status:?}");
}

/// Requests delayed across a reload that swapped the instances go to the new ones: they were
/// held to the upstream they were routed to, and got 502 from the instance the reload took out
/// and the operator then stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_delayed_across_a_reload_go_to_the_instances_in_force() {
    let old = demo_backend(&[]);
    let new = demo_backend(&[]);
    let routes = "[[routes]]\nupstream = \"app\"\nrate_limits = [{ name = \"paced\", limit = 4, \
                  period = \"1s\", burst = 5, delay = 0 }]\n";
    let gw = gateway(&memory_config(&old, routes));
    let client = client();
    // Six at once: one goes, five wait 250 ms to 1.25 s.
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (client, url) = (client.clone(), gw.url("/"));
            tokio::spawn(async move { get(&client, &url).await.status })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.reload_with(&memory_config(&new, routes));
    let swapped = eventually(Duration::from_secs(2), || async {
        let listed = get(&client, &gw.admin_url("/api/upstreams")).await.json();
        listed["upstreams"][0]["instances"][0]["addr"] == new.addr().to_string()
    });
    assert!(swapped.await);
    drop(old);
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(statuses, [200; 6]);
    assert!(backend_requests(&client, &new).await >= 4);
}

/// A sliding window whose period a reload lengthened keeps its counts, in memory as in Redis:
/// 3 per minute used up stays used up as 3 per hour. The window index of the old period read
/// as nothing under the new one, and the client got 3 more at once.
#[tokio::test]
async fn a_window_period_changed_by_a_reload_keeps_its_counts() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let rule = |period: &str| {
        format!(
            "[[routes]]\nupstream = \"app\"\nrate_limits = [{{ name = \"w\", algorithm = \"sliding_window\", limit = 3, period = \"{period}\" }}]\n"
        )
    };
    let client = client();
    for (gw, lengthened) in [
        (
            gateway(&memory_config(&backend, &rule("1m"))),
            memory_config(&backend, &rule("1h")),
        ),
        (
            gateway(&redis_config(&redis, &backend, &rule("1m"))),
            redis_config(&redis, &backend, &rule("1h")),
        ),
    ] {
        let replies = burst(&client, &[gw.url("/")], 4, &[]).await;
        assert_eq!(count(&replies, 200), 3);
        gw.write_config(&lengthened);
        let reload = request(&client, "POST", &gw.admin_url("/api/reload"), &[], "").await;
        assert_eq!(reload.unwrap().status, 200);
        let replies = burst(&client, &[gw.url("/")], 3, &[]).await;
        assert_eq!(count(&replies, 429), 3, "the counts were lost");
    }
    // Redis holds the counts restated under the hour, to expire with the hour's windows.
    let mut conn = redis.conn();
    let key = "scalegate:rl:w:ip:127.0.0.1";
    let period: u64 = redis::cmd("HGET")
        .arg(key)
        .arg("l")
        .query(&mut conn)
        .unwrap();
    assert_eq!(period, 3_600_000_000);
    let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut conn).unwrap();
    assert!(ttl > 3_600_000, "{ttl}");
}

/// EVALSHA calls Redis counted so far.
fn evalsha_calls(redis: &Redis) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn())
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

/// Keeps `redis` busy for `millis` in a script of its own, from another thread.
fn hold_redis(redis: &Redis, millis: u64) -> std::thread::JoinHandle<()> {
    let mut conn = redis.conn();
    std::thread::spawn(move || {
        let busy = "local t0 = redis.call('TIME') repeat local t = redis.call('TIME') \
                    until (t[1] - t0[1]) * 1000000 + t[2] - t0[2] > tonumber(ARGV[1]) * 1000";
        let () = redis::cmd("EVAL")
            .arg(busy)
            .arg(0)
            .arg(millis)
            .query(&mut conn)
            .unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_waiting_for_redis_go_out_together_and_stay_exact() {
    use scalegate::config::limits::{OnRedisError, StateConfig};
    use scalegate::ratelimit::algorithm::{Algorithm, Quota};
    use scalegate::ratelimit::redis_store::RedisStore;
    use scalegate::ratelimit::{redis_prefix, LimitKey};
    use scalegate::redis_link::{LinkUser, RedisLink};

    let redis = Redis::start(None);
    let state = StateConfig {
        redis_urls: vec![redis.url()],
        redis_ca: None,
        redis_cluster: false,
        redis_timeout: Duration::from_secs(5),
        on_redis_error: OnRedisError::Local,
    };
    let link = RedisLink::new(&state, LinkUser::RateLimits);
    link.start().await.unwrap();
    let store = RedisStore::new(link);
    let minute = 60_000_000;
    let gcra = |burst| Quota {
        algorithm: Algorithm::Gcra,
        limit: 1,
        period_us: minute,
        burst,
    };
    let window = |limit| Quota {
        algorithm: Algorithm::SlidingWindow,
        limit,
        period_us: minute,
        burst: 0,
    };
    // 15 at once (the first and a burst of 14), then none for a minute; and the same rule after
    // a reload made it a window of 10 a minute.
    let (fifteen, ten) = (gcra(14), window(10));
    // A route with two rules: 5 at once by one, 3 a minute by the other.
    let (five, three) = (gcra(4), window(3));
    let (prefix, pair_a, pair_b) = (
        redis_prefix("batched"),
        redis_prefix("pair-a"),
        redis_prefix("pair-b"),
    );
    let key = LimitKey::Route("/");
    // Loads the script, so that every call counted below is a decision.
    let warm_up = redis_prefix("warm-up");
    store.decide(&[(&warm_up[..], &five, key)]).await.unwrap();
    let calls_before = evalsha_calls(&redis);

    let busy = hold_redis(&redis, 600);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Two requests while Redis is busy: their calls go out and wait with it.
    let first = [(&prefix[..], &fifteen, key)];
    let first = futures_util::future::join_all([store.decide(&first), store.decide(&first)]);
    // 50 more, which wait for the first two calls, then go out together: 20 under each form of
    // the one rule, in that order, with 10 under the two rules among them.
    let checks: Vec<Vec<_>> = (0..50)
        .map(|i| match i {
            0..20 => vec![(&prefix[..], &fifteen, key)],
            20..30 => vec![(&pair_a[..], &five, key), (&pair_b[..], &three, key)],
            _ => vec![(&prefix[..], &ten, key)],
        })
        .collect();
    let rest = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        futures_util::future::join_all(checks.iter().map(|check| store.decide(check))).await
    };
    let (first, decisions) = tokio::join!(first, rest);
    busy.join().unwrap();
    assert!(first
        .iter()
        .all(|decision| decision.as_ref().unwrap()[0].allowed));

    let decisions: Vec<_> = decisions
        .into_iter()
        .map(|decision| decision.expect("decided at Redis"))
        .collect();
    let passed = |range: std::ops::Range<usize>, rule: usize| {
        decisions[range]
            .iter()
            .filter(|rules| rules[rule].allowed)
            .count()
    };
    // 2 of the first 15 went first; the window starts afresh when the rule changes.
    assert_eq!(passed(0..20, 0), 13, "{decisions:?}");
    assert_eq!(passed(30..50, 0), 10, "{decisions:?}");
    // Both rules booked the 3 the window let pass, and only those: the first rule, which
    // would take 5, lets all 10 pass.
    assert_eq!(passed(20..30, 0), 10, "{decisions:?}");
    assert_eq!(passed(20..30, 1), 3, "{decisions:?}");
    let two_rule_passes = decisions[20..30]
        .iter()
        .filter(|rules| rules.iter().all(|rule| rule.allowed))
        .count();
    assert_eq!(two_rule_passes, 3);
    // The first two go out in one call or two (whether the second was asked for before the
    // first call left), and the 50 in one.
    let calls = evalsha_calls(&redis) - calls_before;
    assert!((2..=3).contains(&calls), "52 decisions took {calls} calls");
}
