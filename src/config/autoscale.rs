//! The `autoscale` table of an upstream: raw serde types, their defaults (documented in
//! `scalegate.example.toml`) and their validation into [`AutoscaleConfig`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Problems;
use crate::autoscale::policy::{
    Bounds, Metric, PolicyConfig, PolicyKind, ScalingPolicy, ScalingRules, SelectPolicy,
};
use crate::autoscale::schedule::{Cron, Schedule};

#[derive(Debug, Deserialize)]
pub struct RawAutoscale {
    #[serde(default = "one")]
    pub min: u32,
    pub max: Option<u32>,
    #[serde(default = "process")]
    pub provider: String,
    #[serde(default)]
    pub target: BTreeMap<String, f64>,
    #[serde(default = "tolerance")]
    pub tolerance: f64,
    #[serde(default = "sync_period")]
    pub sync_period: String,
    pub scale_up: Option<RawRules>,
    pub scale_down: Option<RawRules>,
    #[serde(default)]
    pub schedules: Vec<RawSchedule>,
    #[serde(default = "startup_grace")]
    pub startup_grace: String,
    pub drain_timeout: Option<String>,
    // provider = "process"
    pub stop_grace: Option<String>,
    pub unhealthy_restart: Option<String>,
    pub command: Option<String>,
    pub port_range: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    // provider = "exec"
    pub scale_command: Option<String>,
    pub replicas_command: Option<String>,
    pub command_timeout: Option<String>,
    pub discover: Option<RawDiscover>,
}

fn one() -> u32 {
    1
}
fn process() -> String {
    "process".into()
}
fn tolerance() -> f64 {
    0.1
}
fn sync_period() -> String {
    "15s".into()
}
fn startup_grace() -> String {
    "5s".into()
}
fn discover_interval() -> String {
    "10s".into()
}

#[derive(Debug, Deserialize)]
pub struct RawRules {
    pub stabilization: Option<String>,
    pub select_policy: Option<String>,
    pub policies: Option<Vec<RawPolicy>>,
}

#[derive(Debug, Deserialize)]
pub struct RawPolicy {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: u32,
    pub period: String,
}

#[derive(Debug, Deserialize)]
pub struct RawSchedule {
    pub cron: String,
    pub min: Option<u32>,
    pub max: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct RawDiscover {
    pub dns: String,
    #[serde(default = "discover_interval")]
    pub interval: String,
}

/// The validated autoscaler settings of one upstream.
#[derive(Debug, Clone)]
pub struct AutoscaleConfig {
    pub bounds: Bounds,
    pub targets: Vec<(Metric, f64)>,
    pub policy: PolicyConfig,
    pub sync_period: Duration,
    pub schedules: Vec<Schedule>,
    /// New instances count as capacity but not as load for this long after they start.
    pub startup_grace: Duration,
    pub drain_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when an instance is stopped.
    pub stop_grace: Duration,
    /// Process provider: a child failing its checks (or not listening) this long is restarted;
    /// zero: never.
    pub unhealthy_restart: Duration,
    pub provider: ProviderConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProviderConfig {
    Process(ProcessConfig),
    Exec(ExecConfig),
}

/// Local child processes, one per instance.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessConfig {
    /// Program and arguments; `{self}` and `{port}` are filled in at spawn.
    pub command: Vec<String>,
    pub ports: (u16, u16),
    pub env: Vec<(String, String)>,
    pub workdir: Option<PathBuf>,
}

/// An external scaler (e.g. `kubectl scale`) plus instance discovery.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecConfig {
    /// Program and arguments; `{replicas}` and `{upstream}` are filled in.
    pub scale_command: Vec<String>,
    /// Program and arguments (`{upstream}` filled in) that print the cluster's replica count,
    /// read at each sync: a count changed outside the gateway is the one worked from.
    pub replicas_command: Option<Vec<String>>,
    pub timeout: Duration,
    pub discover: Option<DiscoverConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DiscoverConfig {
    /// `host:port` re-resolved every `interval`.
    pub dns: String,
    pub interval: Duration,
}

impl AutoscaleConfig {
    /// The keys, set up when the autoscaler starts, whose values differ in `next`: a reload
    /// cannot change them. (Bounds, targets, behavior and schedules reload.)
    pub fn restart_keys(&self, next: &AutoscaleConfig) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut differ = |key, differs: bool| {
            if differs {
                keys.push(key);
            }
        };
        // Also when inherited from the upstream: `Config::place_in_file` then names the
        // upstream's key, the one the file has.
        differ("drain_timeout", self.drain_timeout != next.drain_timeout);
        differ("stop_grace", self.stop_grace != next.stop_grace);
        match (&self.provider, &next.provider) {
            (ProviderConfig::Process(a), ProviderConfig::Process(b)) => {
                differ("command", a.command != b.command);
                differ("port_range", a.ports != b.ports);
                differ("env", a.env != b.env);
                differ("workdir", a.workdir != b.workdir);
            }
            (ProviderConfig::Exec(a), ProviderConfig::Exec(b)) => {
                differ("scale_command", a.scale_command != b.scale_command);
                differ("replicas_command", a.replicas_command != b.replicas_command);
                differ("command_timeout", a.timeout != b.timeout);
                differ("discover", a.discover != b.discover);
            }
            _ => differ("provider", true),
        }
        keys
    }
}

/// Validates `raw` (at `key`, e.g. `upstreams.app.autoscale`); `drain_default` is the
/// upstream's own `drain_timeout`.
pub(super) fn validate(
    p: &mut Problems,
    key: &str,
    raw: &RawAutoscale,
    drain_default: Duration,
) -> AutoscaleConfig {
    if raw.min == 0 {
        p.push(format!("{key}.min"), "must be at least 1");
    }
    let max = raw.max.unwrap_or_else(|| {
        p.push(
            format!("{key}.max"),
            "is required (the most instances to run)",
        );
        raw.min
    });
    if max < raw.min {
        p.push(
            format!("{key}.max"),
            format!("must be at least min ({})", raw.min),
        );
    }
    if max > 1000 {
        p.push(format!("{key}.max"), "must be at most 1000");
    }
    let targets = validate_targets(p, key, raw);
    if !(0.0..1.0).contains(&raw.tolerance) {
        p.push(
            format!("{key}.tolerance"),
            "a fraction from 0 up to (not including) 1",
        );
    }
    let sync_period = p.positive_duration(&format!("{key}.sync_period"), &raw.sync_period);
    let scale_up = validate_rules(p, &format!("{key}.scale_up"), raw.scale_up.as_ref(), true);
    let scale_down = validate_rules(
        p,
        &format!("{key}.scale_down"),
        raw.scale_down.as_ref(),
        false,
    );
    let schedules = raw
        .schedules
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let skey = format!("{key}.schedules[{i}]");
            if let (Some(min), Some(max)) = (s.min, s.max) {
                if min > max {
                    p.push(format!("{skey}.max"), "must be at least min");
                }
            }
            if s.min.is_none() && s.max.is_none() {
                p.push(&skey, "give min, max or both");
            }
            // Alone in force, it would run with `max`, and its min would be lowered to that.
            if let (Some(min), None) = (s.min, s.max) {
                if min > max {
                    let message = format!("is above max ({max}): give the schedule a max too");
                    p.push(format!("{skey}.min"), message);
                }
            }
            // At 0 instances no load is ever measured, so nothing would start one again.
            if s.min == Some(0) {
                p.push(format!("{skey}.min"), "must be at least 1");
            }
            match s.max {
                Some(0) => p.push(format!("{skey}.max"), "must be at least 1"),
                Some(max) if max > 1000 => p.push(format!("{skey}.max"), "must be at most 1000"),
                _ => {}
            }
            match Cron::parse(&s.cron) {
                Ok(cron) => Some(Schedule {
                    cron,
                    min: s.min,
                    max: s.max,
                }),
                Err(err) => {
                    p.push(format!("{skey}.cron"), err);
                    None
                }
            }
        })
        .collect();
    // The most instances ever asked for: `max`, or a schedule's.
    let most = raw
        .schedules
        .iter()
        .filter_map(|s| s.max)
        .fold(max, u32::max);
    let provider = match raw.provider.as_str() {
        "process" => ProviderConfig::Process(validate_process(p, key, raw, most)),
        "exec" => ProviderConfig::Exec(validate_exec(p, key, raw)),
        other => {
            p.push(
                format!("{key}.provider"),
                format!("`{other}`: expected process or exec"),
            );
            ProviderConfig::Process(validate_process(p, key, raw, most))
        }
    };
    AutoscaleConfig {
        bounds: Bounds { min: raw.min, max },
        targets,
        policy: PolicyConfig {
            tolerance: raw.tolerance,
            scale_up,
            scale_down,
        },
        sync_period,
        schedules,
        startup_grace: p.duration(&format!("{key}.startup_grace"), &raw.startup_grace),
        drain_timeout: raw.drain_timeout.as_ref().map_or(drain_default, |d| {
            p.duration(&format!("{key}.drain_timeout"), d)
        }),
        stop_grace: p.duration(
            &format!("{key}.stop_grace"),
            raw.stop_grace.as_deref().unwrap_or("10s"),
        ),
        unhealthy_restart: p.duration(
            &format!("{key}.unhealthy_restart"),
            raw.unhealthy_restart.as_deref().unwrap_or("60s"),
        ),
        provider,
    }
}

fn validate_targets(p: &mut Problems, key: &str, raw: &RawAutoscale) -> Vec<(Metric, f64)> {
    if raw.target.is_empty() {
        p.push(
            format!("{key}.target"),
            "give at least one of in_flight_per_instance, rps_per_instance, p95_latency_ms, cpu_percent",
        );
    }
    let mut targets = Vec::new();
    for (name, &value) in &raw.target {
        let tkey = format!("{key}.target.{name}");
        let Some(metric) = Metric::ALL.into_iter().find(|m| m.name() == name) else {
            p.push(
                tkey,
                "unknown target: expected in_flight_per_instance, rps_per_instance, p95_latency_ms or cpu_percent",
            );
            continue;
        };
        if !(value.is_finite() && value > 0.0) {
            p.push(&tkey, "must be more than 0");
        }
        if metric == Metric::CpuPercent && raw.provider == "exec" {
            p.push(
                &tkey,
                "needs provider = \"process\" (CPU is read from the child processes)",
            );
        }
        targets.push((metric, value));
    }
    targets
}

/// HPA's bounds: the decisions of a window are kept in memory, one per sync period, and a
/// longer one is a mistyped unit more often than a wish.
const LONGEST_STABILIZATION: Duration = Duration::from_secs(3600);
const LONGEST_POLICY_PERIOD: Duration = Duration::from_secs(1800);

fn validate_rules(p: &mut Problems, key: &str, raw: Option<&RawRules>, up: bool) -> ScalingRules {
    let mut rules = if up {
        ScalingRules::default_up()
    } else {
        ScalingRules::default_down()
    };
    let Some(raw) = raw else {
        return rules;
    };
    if let Some(text) = &raw.stabilization {
        let skey = format!("{key}.stabilization");
        rules.stabilization = p.duration(&skey, text);
        if rules.stabilization > LONGEST_STABILIZATION {
            p.push(&skey, "must be at most 1h (as in HPA)");
        }
    }
    if let Some(select) = &raw.select_policy {
        rules.select = match select.as_str() {
            "max" => SelectPolicy::Max,
            "min" => SelectPolicy::Min,
            "disabled" => SelectPolicy::Disabled,
            other => {
                p.push(
                    format!("{key}.select_policy"),
                    format!("`{other}`: expected max, min or disabled"),
                );
                SelectPolicy::Max
            }
        };
    }
    if let Some(policies) = &raw.policies {
        if policies.is_empty() && rules.select != SelectPolicy::Disabled {
            p.push(
                format!("{key}.policies"),
                "give at least one policy, or select_policy = \"disabled\"",
            );
        }
        rules.policies = policies
            .iter()
            .enumerate()
            .map(|(i, policy)| {
                let pkey = format!("{key}.policies[{i}]");
                let kind = match policy.kind.as_str() {
                    "pods" => PolicyKind::Pods,
                    "percent" => PolicyKind::Percent,
                    other => {
                        p.push(
                            format!("{pkey}.type"),
                            format!("`{other}`: expected pods or percent"),
                        );
                        PolicyKind::Pods
                    }
                };
                if policy.value == 0 {
                    p.push(format!("{pkey}.value"), "must be at least 1");
                }
                let period_key = format!("{pkey}.period");
                let period = p.positive_duration(&period_key, &policy.period);
                if period > LONGEST_POLICY_PERIOD {
                    p.push(&period_key, "must be at most 30m (as in HPA)");
                }
                ScalingPolicy {
                    kind,
                    value: policy.value,
                    period,
                }
            })
            .collect();
    }
    rules
}

/// Splits a command line with POSIX shell quoting rules (no expansion).
fn split_command(p: &mut Problems, key: &str, text: &str) -> Vec<String> {
    match shell_words::split(text) {
        Ok(words) if !words.is_empty() => words,
        Ok(_) => {
            p.push(key, "is empty");
            Vec::new()
        }
        Err(err) => {
            p.push(key, format!("cannot split into words: {err}"));
            Vec::new()
        }
    }
}

fn misplaced(p: &mut Problems, key: &str, names: &[(&str, bool)], provider: &str) {
    for (name, given) in names {
        if *given {
            p.push(
                format!("{key}.{name}"),
                format!("not used by provider = \"{provider}\""),
            );
        }
    }
}

fn validate_process(p: &mut Problems, key: &str, raw: &RawAutoscale, most: u32) -> ProcessConfig {
    misplaced(
        p,
        key,
        &[
            ("scale_command", raw.scale_command.is_some()),
            ("replicas_command", raw.replicas_command.is_some()),
            ("command_timeout", raw.command_timeout.is_some()),
            ("discover", raw.discover.is_some()),
        ],
        "process",
    );
    let command = match &raw.command {
        Some(text) => {
            let words = split_command(p, &format!("{key}.command"), text);
            if !words.is_empty() && !words.iter().any(|w| w.contains("{port}")) {
                p.push(
                    format!("{key}.command"),
                    "must pass {port} to the instance (e.g. \"my-app --port {port}\")",
                );
            }
            words
        }
        None => {
            p.push(
                format!("{key}.command"),
                "is required with provider = \"process\" (e.g. \"{self} demo-backend --port {port}\")",
            );
            Vec::new()
        }
    };
    let range_text = raw.port_range.as_deref().unwrap_or("3001-3100");
    let ports = parse_port_range(range_text).unwrap_or_else(|| {
        p.push(
            format!("{key}.port_range"),
            format!("`{range_text}`: expected FIRST-LAST, e.g. 3001-3100"),
        );
        (1, 1)
    });
    if u32::from(ports.1 - ports.0) + 1 < most {
        p.push(
            format!("{key}.port_range"),
            format!("has fewer ports than the most instances max or a schedule allows ({most})"),
        );
    }
    ProcessConfig {
        command,
        ports,
        env: raw
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        workdir: raw.workdir.as_ref().map(PathBuf::from),
    }
}

fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let (low, high) = text.split_once('-')?;
    let low: u16 = low.trim().parse().ok()?;
    let high: u16 = high.trim().parse().ok()?;
    (low > 0 && low <= high).then_some((low, high))
}

fn validate_exec(p: &mut Problems, key: &str, raw: &RawAutoscale) -> ExecConfig {
    misplaced(
        p,
        key,
        &[
            ("command", raw.command.is_some()),
            ("port_range", raw.port_range.is_some()),
            ("env", !raw.env.is_empty()),
            ("workdir", raw.workdir.is_some()),
            ("stop_grace", raw.stop_grace.is_some()),
            ("unhealthy_restart", raw.unhealthy_restart.is_some()),
        ],
        "exec",
    );
    let scale_command = match &raw.scale_command {
        Some(text) => {
            let words = split_command(p, &format!("{key}.scale_command"), text);
            if !words.is_empty() && !words.iter().any(|w| w.contains("{replicas}")) {
                p.push(
                    format!("{key}.scale_command"),
                    "must pass {replicas} (e.g. \"kubectl scale deployment/api --replicas={replicas}\")",
                );
            }
            words
        }
        None => {
            p.push(
                format!("{key}.scale_command"),
                "is required with provider = \"exec\"",
            );
            Vec::new()
        }
    };
    let discover = raw.discover.as_ref().map(|d| {
        let dkey = format!("{key}.discover");
        let port_ok = d
            .dns
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            p.push(
                format!("{dkey}.dns"),
                format!("`{}`: expected NAME:PORT", d.dns),
            );
        }
        DiscoverConfig {
            dns: d.dns.clone(),
            interval: p.positive_duration(&format!("{dkey}.interval"), &d.interval),
        }
    });
    let replicas_command = raw.replicas_command.as_ref().map(|text| {
        let words = split_command(p, &format!("{key}.replicas_command"), text);
        if words.iter().any(|w| w.contains("{replicas}")) {
            p.push(
                format!("{key}.replicas_command"),
                "reads the count and cannot be passed {replicas} (e.g. \"kubectl get deployment/api -o jsonpath={.spec.replicas}\")",
            );
        }
        words
    });
    ExecConfig {
        scale_command,
        replicas_command,
        timeout: raw
            .command_timeout
            .as_ref()
            .map_or(Duration::from_secs(60), |t| {
                p.positive_duration(&format!("{key}.command_timeout"), t)
            }),
        discover,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ProviderConfig};

    #[test]
    fn process_autoscale_with_defaults() {
        let text = r#"
[upstreams.app]
autoscale = { max = 4, command = "{self} demo-backend --port {port}", target = { in_flight_per_instance = 8 } }
[[routes]]
upstream = "app"
"#;
        let config = Config::from_toml(text).unwrap();
        let auto = config.upstreams[0].autoscale.as_ref().unwrap();
        assert_eq!((auto.bounds.min, auto.bounds.max), (1, 4));
        assert_eq!(auto.sync_period.as_secs(), 15);
        assert_eq!(auto.policy.scale_down.stabilization.as_secs(), 300);
        assert_eq!(auto.policy.scale_up.policies.len(), 2);
        let ProviderConfig::Process(process) = &auto.provider else {
            panic!("process expected")
        };
        assert_eq!(
            process.command,
            ["{self}", "demo-backend", "--port", "{port}"]
        );
        assert_eq!(process.ports, (3001, 3100));
    }

    #[test]
    fn the_documented_example_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scalegate.example.toml");
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let auto = config
            .upstream("workers")
            .unwrap()
            .autoscale
            .as_ref()
            .unwrap();
        assert_eq!(auto.targets.len(), 2);
        assert_eq!(auto.schedules.len(), 1);
        let quickstart =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.toml");
        assert!(Config::load(&quickstart).unwrap().upstreams[0]
            .autoscale
            .is_some());
    }

    #[test]
    fn a_schedule_min_above_the_max_it_runs_with_is_refused() {
        let text = "[upstreams.app]\ninstances = []\n[upstreams.app.autoscale]\nmax = 4\n\
            command = \"app {port}\"\ntarget = { in_flight_per_instance = 4 }\n\
            schedules = [{ cron = \"* * * * *\", min = 6 }, { cron = \"* * * * *\", min = 6, max = 8 }]\n\
            [[routes]]\nupstream = \"app\"\n";
        let errors = Config::from_toml(text).unwrap_err().0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["upstreams.app.autoscale.schedules[0].min"]);
    }

    #[test]
    fn a_reload_names_each_setup_key_that_changed() {
        let autoscale = |table: &str| {
            let text = format!(
                "[upstreams.app]\ninstances = []\n[upstreams.app.autoscale]\nmax = 4\ntarget = {{ rps_per_instance = 10 }}\n{table}\n[[routes]]\nupstream = \"app\"\n"
            );
            Config::from_toml(&text).unwrap().upstreams[0]
                .autoscale
                .clone()
                .unwrap()
        };
        let running = autoscale("command = \"app --port {port}\"\nenv = { A = \"1\" }");
        let same_but_bounds =
            autoscale("command = \"app --port {port}\"\nenv = { A = \"1\" }\nmin = 2");
        assert!(running.restart_keys(&same_but_bounds).is_empty());
        let changed = autoscale(
            "command = \"app2 --port {port}\"\nenv = { A = \"2\" }\nport_range = \"4001-4010\"",
        );
        assert_eq!(
            running.restart_keys(&changed),
            ["command", "port_range", "env"]
        );
        let exec = autoscale("provider = \"exec\"\nscale_command = \"kubectl {replicas}\"");
        assert_eq!(running.restart_keys(&exec), ["provider"]);
    }

    #[test]
    fn keys_of_the_process_provider_are_refused_under_exec() {
        let text = "[upstreams.app]\ninstances = []\n[upstreams.app.autoscale]\nmax = 4\n\
            provider = \"exec\"\nscale_command = \"kubectl {replicas}\"\n\
            target = { rps_per_instance = 10 }\nstop_grace = \"5s\"\nunhealthy_restart = \"0s\"\n\
            [[routes]]\nupstream = \"app\"\n";
        let errors = Config::from_toml(text).unwrap_err().0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "upstreams.app.autoscale.stop_grace",
                "upstreams.app.autoscale.unhealthy_restart"
            ]
        );
    }

    #[test]
    fn every_bad_autoscale_key_is_named() {
        let text = r#"
[upstreams.app]
[upstreams.app.autoscale]
min = 0
tolerance = 2
sync_period = "0s"
command = "my-app"
port_range = "9-1"
scale_command = "x {replicas}"
replicas_command = "kubectl get deployment/api"
target = { in_flight_per_instance = 0, queue_depth = 3 }
scale_up = { select_policy = "most", policies = [{ type = "pods", value = 0, period = "soon" }] }
scale_down = { stabilization = "61m", policies = [{ type = "share", value = 1, period = "1m" }, { type = "pods", value = 1, period = "31m" }] }
schedules = [{ cron = "* 25 * * *", min = 3 }, { cron = "* * * * *", min = 5, max = 2 }, { cron = "* * * * *", min = 0, max = 2000 }, { cron = "* * * * *", max = 0 }]

[upstreams.cluster]
instances = []
autoscale = { max = 3, provider = "exec", target = { cpu_percent = 70 }, discover = { dns = "nohost" }, replicas_command = "get --replicas={replicas}" }

[[routes]]
upstream = "app"
"#;
        let errors = Config::from_toml(text).unwrap_err().0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for key in [
            "upstreams.app.autoscale.min",
            "upstreams.app.autoscale.max",
            "upstreams.app.autoscale.tolerance",
            "upstreams.app.autoscale.sync_period",
            "upstreams.app.autoscale.command",
            "upstreams.app.autoscale.port_range",
            "upstreams.app.autoscale.scale_command",
            "upstreams.app.autoscale.replicas_command",
            "upstreams.app.autoscale.target.in_flight_per_instance",
            "upstreams.app.autoscale.target.queue_depth",
            "upstreams.app.autoscale.scale_up.select_policy",
            "upstreams.app.autoscale.scale_up.policies[0].value",
            "upstreams.app.autoscale.scale_up.policies[0].period",
            "upstreams.app.autoscale.scale_down.policies[0].type",
            "upstreams.app.autoscale.scale_down.stabilization",
            "upstreams.app.autoscale.scale_down.policies[1].period",
            "upstreams.app.autoscale.schedules[0].cron",
            "upstreams.app.autoscale.schedules[1].max",
            "upstreams.app.autoscale.schedules[2].min",
            "upstreams.app.autoscale.schedules[2].max",
            "upstreams.app.autoscale.schedules[3].max",
            "upstreams.cluster.autoscale.target.cpu_percent",
            "upstreams.cluster.autoscale.scale_command",
            "upstreams.cluster.autoscale.discover.dns",
            "upstreams.cluster.autoscale.replicas_command",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert!(!keys.contains(&"upstreams.app.instances"), "{keys:?}");
    }
}
