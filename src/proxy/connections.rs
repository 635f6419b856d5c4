//! Connection admission: a cap on open client connections in total and per client IP, counted
//! while each connection lives, checked once per connection, never per request; and what is
//! said when accepting fails.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How long accepting must go without a failure before an episode of failures (out of file
/// descriptors, say) counts as over. With descriptors at the limit, every one freed lets one
/// accept through before the next fails: ending the episode there logged it again each time.
const ACCEPT_QUIET: Duration = Duration::from_secs(1);

/// What to log of one accept, given the last failure of the episode in progress, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptLog {
    /// The first failure of an episode: a warning.
    Failing,
    /// A failure within an episode, or a success while it may still go on: debug at most.
    Quiet,
    /// The first success after [`ACCEPT_QUIET`] without a failure: the episode is over.
    Recovered,
}

/// The log line for an accept at `now` that `failed` or not, and the episode's last failure
/// after it.
fn accept_log(
    last_failure: Option<Instant>,
    failed: bool,
    now: Instant,
) -> (AcceptLog, Option<Instant>) {
    match (last_failure, failed) {
        (None, true) => (AcceptLog::Failing, Some(now)),
        // A failure a quiet second after the last one starts another episode, even when no
        // accept came in between to end this one.
        (Some(at), true) if now.duration_since(at) >= ACCEPT_QUIET => {
            (AcceptLog::Failing, Some(now))
        }
        (Some(_), true) => (AcceptLog::Quiet, Some(now)),
        (Some(at), false) if now.duration_since(at) >= ACCEPT_QUIET => (AcceptLog::Recovered, None),
        (episode, false) => (AcceptLog::Quiet, episode),
    }
}

/// How long a listener waits after a failed accept before it tries again: out of file
/// descriptors, an accept at once would fail again and spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// The accept failures of one listener ([`accept_log`]), for the gateway's listener and the
/// admin API's alike.
#[derive(Default)]
pub struct AcceptFailures {
    last_failure: Option<Instant>,
}

impl AcceptFailures {
    /// The connection `accepted` gave; on a failure `None`, once the failure was logged as
    /// [`accept_log`] says and [`ACCEPT_BACKOFF`] has passed. `listener` names it in the log.
    pub async fn accepted<T>(
        &mut self,
        listener: &'static str,
        accepted: std::io::Result<T>,
    ) -> Option<T> {
        let (log, episode) = accept_log(self.last_failure, accepted.is_err(), Instant::now());
        self.last_failure = episode;
        match accepted {
            Ok(conn) => {
                if log == AcceptLog::Recovered {
                    tracing::info!(listener, "accepting connections again");
                }
                Some(conn)
            }
            Err(err) => {
                if log == AcceptLog::Failing {
                    tracing::warn!(
                        listener,
                        %err,
                        "accept failed: retrying every 20 ms until it works"
                    );
                } else {
                    tracing::debug!(listener, %err, "accept failed");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                None
            }
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    TooManyConnections,
    TooManyFromClient,
}

/// Descriptors kept for everything but client connections and their instance connections:
/// listeners, the admin API's clients, Redis, health probes, idle pooled connections, logs.
const DESCRIPTOR_RESERVE: u64 = 128;

/// The most client connections `nofile` descriptors carry, each with a connection to an
/// instance beside it (HAProxy derives its `maxconn` from `ulimit -n` the same way). Admitting
/// more lets clients take the descriptors their requests need: every request then fails for
/// want of one, and keep-alive clients hold them.
pub fn connections_within(nofile: u64) -> usize {
    let budget = nofile.saturating_sub(DESCRIPTOR_RESERVE) / 2;
    usize::try_from(budget).unwrap_or(usize::MAX).max(1)
}

/// Raises the soft limit on open files to the hard one, as the Go runtime does at start (a
/// shell's default soft limit of 1024 is far below what a gateway needs), and returns the
/// limit in force; `None` when it cannot be read.
pub fn raise_descriptor_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

/// Whether one more connection fits; a limit of 0 means none.
pub fn admit_decision(
    open: usize,
    max_open: usize,
    open_from_ip: usize,
    max_per_ip: usize,
) -> Result<(), ConnRefusal> {
    if max_open > 0 && open >= max_open {
        Err(ConnRefusal::TooManyConnections)
    } else if max_per_ip > 0 && open_from_ip >= max_per_ip {
        Err(ConnRefusal::TooManyFromClient)
    } else {
        Ok(())
    }
}

/// The limits in force (a reload changes them for the connections that come after it; open
/// ones count toward them either way, per IP too: every connection is counted by its IP, with
/// or without a per-IP limit, so that one a reload sets finds the connections already open).
#[derive(Debug, Default)]
pub struct ConnectionLimits {
    /// What the descriptor limit allows ([`connections_within`]); 0 when unknown.
    within_descriptors: usize,
    max_open: AtomicUsize,
    max_per_ip: AtomicUsize,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    pub refused_total: AtomicU64,
    pub refused_per_ip: AtomicU64,
}

impl ConnectionLimits {
    /// `nofile`: the process's descriptor limit, which caps `max_open`.
    pub fn new(max_open: usize, max_per_ip: usize, nofile: Option<u64>) -> ConnectionLimits {
        let limits = ConnectionLimits {
            within_descriptors: nofile.map_or(0, connections_within),
            ..ConnectionLimits::default()
        };
        limits.set_limits(max_open, max_per_ip);
        limits
    }

    /// Sets the limits; `max_open` (0: none) is capped by the descriptor limit, and the cap is
    /// logged when it applies.
    pub fn set_limits(&self, max_open: usize, max_per_ip: usize) {
        let fits = self.within_descriptors;
        let capped = fits > 0 && (max_open == 0 || max_open > fits);
        let asked = max_open;
        let max_open = if capped { fits } else { max_open };
        let before = self.max_open.swap(max_open, Ordering::Relaxed);
        // Said at start, and again only when a reload changes what is admitted.
        if capped && before != max_open {
            tracing::info!(
                max_connections = asked,
                admitted = fits,
                "client connections capped by the file descriptor limit (ulimit -n): two per connection, one for its instance"
            );
        }
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A permit for a new connection from `ip`, held for the connection's life.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, ConnRefusal> {
        let mut per_ip = self.per_ip.lock().expect("connection limits lock");
        let from_ip = per_ip.get(&ip).copied().unwrap_or(0);
        let max_open = self.max_open.load(Ordering::Relaxed);
        let max_per_ip = self.max_per_ip.load(Ordering::Relaxed);
        if let Err(refusal) = admit_decision(self.open(), max_open, from_ip, max_per_ip) {
            let counter = match refusal {
                ConnRefusal::TooManyConnections => &self.refused_total,
                ConnRefusal::TooManyFromClient => &self.refused_per_ip,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return Err(refusal);
        }
        per_ip.insert(ip, from_ip + 1);
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionPermit {
            limits: self.clone(),
            ip,
        })
    }
}

/// Counts a connection as open until dropped.
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        // Per-IP first: whoever sees the total drop may rely on the per-IP slot being free too.
        let mut per_ip = self.limits.per_ip.lock().expect("connection limits lock");
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
        drop(per_ip);
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_accept_failure_episode_is_logged_once_and_ends_after_a_quiet_second() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let (log, episode) = accept_log(None, true, t0);
        assert_eq!((log, episode), (AcceptLog::Failing, Some(t0)));
        // A descriptor freed lets one accept through; the next fails: still the same episode.
        let (log, episode) = accept_log(episode, false, at(20));
        assert_eq!((log, episode), (AcceptLog::Quiet, Some(t0)));
        let (log, episode) = accept_log(episode, true, at(40));
        assert_eq!((log, episode), (AcceptLog::Quiet, Some(at(40))));
        let (log, episode) = accept_log(episode, false, at(1039));
        assert_eq!(log, AcceptLog::Quiet);
        let (log, episode) = accept_log(episode, false, at(1040));
        assert_eq!((log, episode), (AcceptLog::Recovered, None));
        assert_eq!(accept_log(None, false, at(2000)), (AcceptLog::Quiet, None));
        assert_eq!(accept_log(None, true, at(3000)).0, AcceptLog::Failing);
        // An episode whose last accept worked, then nothing for a while: the next failure is
        // a new episode, said again.
        let (_, episode) = accept_log(Some(at(3000)), false, at(3020));
        assert_eq!(accept_log(episode, true, at(3999)).0, AcceptLog::Quiet);
        assert_eq!(accept_log(episode, true, at(4000)).0, AcceptLog::Failing);
    }

    #[test]
    fn limits_apply_and_zero_means_none() {
        assert_eq!(admit_decision(9, 10, 0, 0), Ok(()));
        assert_eq!(
            admit_decision(10, 10, 0, 0),
            Err(ConnRefusal::TooManyConnections)
        );
        assert_eq!(admit_decision(10, 0, 3, 4), Ok(()));
        assert_eq!(
            admit_decision(10, 0, 4, 4),
            Err(ConnRefusal::TooManyFromClient)
        );
    }

    #[test]
    fn the_descriptor_limit_caps_client_connections() {
        // Two descriptors per connection once 128 are kept aside.
        assert_eq!(connections_within(1024), 448);
        assert_eq!(connections_within(20_000), 9936);
        assert_eq!(connections_within(64), 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        // 130 descriptors carry one connection: the configured 10, or no cap at all, give one.
        for configured in [10, 0] {
            let limits = Arc::new(ConnectionLimits::new(configured, 0, Some(130)));
            let _only = limits.admit(a).unwrap();
            assert_eq!(limits.admit(a).err(), Some(ConnRefusal::TooManyConnections));
        }
        // Within the budget, the configured limit holds.
        let limits = Arc::new(ConnectionLimits::new(1, 0, Some(1024)));
        let _only = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_err());
    }

    #[test]
    fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        // One under the hard limit first, so that a raise that did nothing shows (other tests
        // in this process keep all but one descriptor).
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, hard - 1, hard).unwrap();
        let raised = raise_descriptor_limit().expect("a limit");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((raised, soft), (hard, hard));
    }

    #[test]
    fn permits_count_per_ip_and_free_on_drop() {
        let limits = Arc::new(ConnectionLimits::new(3, 2, None));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).err(), Some(ConnRefusal::TooManyFromClient));
        let _third = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).err(), Some(ConnRefusal::TooManyConnections));
        drop(first);
        assert!(limits.admit(a).is_ok());
        assert_eq!(limits.refused_total.load(Ordering::Relaxed), 1);
        assert_eq!(limits.refused_per_ip.load(Ordering::Relaxed), 1);
        assert!(limits.per_ip.lock().unwrap().len() <= 2);
    }

    #[test]
    fn a_per_ip_limit_set_later_counts_the_connections_already_open() {
        let limits = Arc::new(ConnectionLimits::new(0, 0, None));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let before = limits.admit(a).unwrap();
        let _also_before = limits.admit(a).unwrap();
        limits.set_limits(10, 2);
        assert_eq!(limits.admit(a).err(), Some(ConnRefusal::TooManyFromClient));
        drop(before);
        let _after = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).err(), Some(ConnRefusal::TooManyFromClient));
    }
}
