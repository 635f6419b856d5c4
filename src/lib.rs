//! scalegate: one binary that takes a stateless HTTP service from one instance to many.
//! See DESIGN.md in the shared folder for the map; each module owns one capability.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod autoscale;
pub mod balance;
pub mod bench;
pub mod cache;
pub mod clock;
pub mod config;
pub mod demo;
pub mod health;
pub mod http1;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod redis_link;
pub mod tls;
