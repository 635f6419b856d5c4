//! Test support: starts real `scalegate` processes (demo backends, gateways) on ephemeral
//! loopback ports and stops them when dropped.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of the built `scalegate` binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_scalegate")
}

/// A child process killed on drop, with the addresses it announced on stdout.
pub struct Proc {
    pub child: Child,
    /// Each `NAME listening on ADDR` line seen before start-up finished, as (NAME, ADDR).
    pub addrs: Vec<(String, SocketAddr)>,
}

impl Proc {
    /// First announced address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0].1
    }

    /// Address announced as `NAME listening on ADDR`.
    pub fn named(&self, name: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} address in {:?}", self.addrs))
            .1
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `scalegate ARGS` and waits until it printed `expect` lines of the form
/// `[NAME ]listening on ADDR` on stdout (at most 20 s). Stdout after that is drained.
pub fn spawn(args: &[&str], expect: usize) -> Proc {
    spawn_with_env(args, expect, &[])
}

pub fn spawn_with_env(args: &[&str], expect: usize, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn scalegate");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = 0;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sent < expect {
                if let Some((name, addr)) = line.split_once("listening on ") {
                    let name = name.trim().to_string();
                    if let Ok(addr) = addr.trim().parse::<SocketAddr>() {
                        sent += 1;
                        let _ = tx.send((name, addr));
                    }
                }
            }
        }
    });
    let mut addrs = Vec::new();
    while addrs.len() < expect {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(pair) => addrs.push(pair),
            Err(_) => {
                let _ = child.kill();
                panic!("scalegate {args:?} did not announce {expect} address(es); got {addrs:?}");
            }
        }
    }
    Proc { child, addrs }
}

/// Starts a demo backend on a free port with extra flags.
pub fn demo_backend(extra: &[&str]) -> Proc {
    let mut args = vec!["demo-backend", "--port", "0"];
    args.extend_from_slice(extra);
    spawn(&args, 1)
}
