//! /metrics end to end: exact counts after known traffic, and promtool's lint on the output.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::*;

fn sample(text: &str, prefix: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no sample {prefix} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn metrics_count_known_traffic_exactly_and_pass_promtool() {
    let a = demo_backend(&[]);
    let b = demo_backend(&[]);
    let config = format!(
        "[upstreams.app]\ninstances = [\"{}\", \"{}\"]\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"app\"\n\
         [[routes]]\nname = \"odd \\\"route\\\" \\\\ name\\nline\"\npath_prefix = \"/odd\"\nupstream = \"app\"\n",
        a.addr(),
        b.addr()
    );
    let gw = gateway(&config);
    let client = client();
    for _ in 0..5 {
        assert_eq!(get(&client, &gw.url("/api/x")).await.status, 200);
    }
    for _ in 0..2 {
        let reply = request(&client, "POST", &gw.url("/api/y"), &[], "body")
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    assert_eq!(get(&client, &gw.url("/elsewhere")).await.status, 404);
    // A route name with a quote, a backslash and a line feed is escaped in its label.
    assert_eq!(get(&client, &gw.url("/odd")).await.status, 200);

    let reply = get(&client, &gw.admin_url("/metrics")).await;
    assert_eq!(reply.status, 200);
    assert!(reply
        .header("content-type")
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let odd = r#"route="odd \"route\" \\ name\nline",upstream="app",method="GET",status="2xx""#;
    assert_eq!(
        sample(&text, &format!("scalegate_requests_total{{{odd}}}")),
        1.0
    );
    let api = r#"route="api",upstream="app""#;
    assert_eq!(
        sample(
            &text,
            &format!(r#"scalegate_requests_total{{{api},method="GET",status="2xx"}}"#)
        ),
        5.0
    );
    assert_eq!(
        sample(
            &text,
            &format!(r#"scalegate_requests_total{{{api},method="POST",status="2xx"}}"#)
        ),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            r#"scalegate_requests_total{route="-",upstream="-",method="GET",status="4xx"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            &format!("scalegate_request_duration_seconds_count{{{api}}}")
        ),
        7.0
    );
    assert_eq!(
        sample(
            &text,
            &format!(r#"scalegate_request_duration_seconds_bucket{{le="+Inf",{api}}}"#)
        ),
        7.0
    );
    let per_instance: f64 = [a.addr(), b.addr()]
        .iter()
        .map(|addr| {
            sample(
                &text,
                &format!(
                    r#"scalegate_instance_requests_total{{upstream="app",instance="{addr}"}}"#
                ),
            )
        })
        .sum();
    assert_eq!(per_instance, 8.0);
    // A stats page's hrsp_2xx: every answer by status class, in /metrics and /api/upstreams.
    let answered: f64 = [a.addr(), b.addr()]
        .iter()
        .map(|addr| {
            sample(
                &text,
                &format!(
                    r#"scalegate_instance_answers_total{{upstream="app",instance="{addr}",status="2xx"}}"#
                ),
            )
        })
        .sum();
    assert_eq!(answered, 8.0);
    // Classes that have not happened yet are there at 0, so that Prometheus's increase() sees
    // the first ones: for each instance, and for every method a route has seen (GET always).
    for addr in [a.addr(), b.addr()] {
        let none = format!(
            r#"scalegate_instance_answers_total{{upstream="app",instance="{addr}",status="5xx"}}"#
        );
        assert_eq!(sample(&text, &none), 0.0);
    }
    for (method, class) in [("GET", "5xx"), ("POST", "4xx")] {
        let none =
            format!(r#"scalegate_requests_total{{{api},method="{method}",status="{class}"}}"#);
        assert_eq!(sample(&text, &none), 0.0);
    }
    assert!(
        !text.contains(&format!(r#"{{{api},method="PUT""#)),
        "a method never seen has no series"
    );
    let listed = get(&client, &gw.admin_url("/api/upstreams")).await.json();
    let by_api: u64 = listed["upstreams"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["answers"]["2xx"].as_u64().unwrap() + i["answers"]["5xx"].as_u64().unwrap())
        .sum();
    assert_eq!(by_api, 8);
    assert_eq!(
        sample(
            &text,
            &format!(
                r#"scalegate_instance_up{{upstream="app",instance="{}"}}"#,
                a.addr()
            )
        ),
        1.0
    );
    assert_eq!(sample(&text, "scalegate_in_flight_requests "), 0.0);
    assert!(sample(&text, "scalegate_process_resident_memory_bytes ") > 1e6);
    assert!(sample(&text, "scalegate_process_open_fds ") >= 3.0);

    let detailed = get(&client, &gw.admin_url("/health/detailed")).await;
    assert_eq!(detailed.status, 200);
    let detailed = detailed.json();
    assert_eq!(detailed["status"], "ok");
    assert_eq!(detailed["components"][0]["name"], "app");
    assert_eq!(detailed["components"][0]["status"], "ok");
    assert_eq!(
        detailed["components"][0]["reason"],
        "2 of 2 instances healthy"
    );

    // OpenMetrics for scrapers that ask for it.
    let om = request(
        &client,
        "GET",
        &gw.admin_url("/metrics"),
        &[("accept", "application/openmetrics-text; version=1.0.0")],
        "",
    )
    .await
    .unwrap();
    assert!(om
        .header("content-type")
        .starts_with("application/openmetrics-text"));
    assert!(String::from_utf8_lossy(&om.body).ends_with("# EOF\n"));

    let promtool = ["promtool", "/usr/bin/promtool"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok())
        .expect("promtool is installed by scripts/test (Debian package prometheus)");
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A retry is counted when it happens: with two dead instances and `retries = 2`, each request
/// is tried on both, so one retry each, not one per failed attempt.
#[tokio::test]
async fn retries_count_the_attempts_that_were_made() {
    let (a, b) = (dead_addr(), dead_addr());
    let config = format!(
        "[upstreams.app]\ninstances = [\"{a}\", \"{b}\"]\nretries = 2\nmax_fails = 0\n\n[[routes]]\nupstream = \"app\"\n"
    );
    let gw = gateway(&config);
    let client = client();
    for _ in 0..4 {
        assert_eq!(get(&client, &gw.url("/")).await.status, 502);
    }
    let text =
        String::from_utf8(get(&client, &gw.admin_url("/metrics")).await.body.to_vec()).unwrap();
    let total = |name: &str| -> f64 {
        [a, b]
            .iter()
            .map(|addr| {
                sample(
                    &text,
                    &format!(r#"{name}{{upstream="app",instance="{addr}"}}"#),
                )
            })
            .sum()
    };
    assert_eq!(total("scalegate_instance_failures_total"), 8.0);
    assert_eq!(total("scalegate_instance_retries_total"), 4.0);
}
