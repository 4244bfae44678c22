//! Integration tests: the sidecar in-process on loopback, against the real `oidc-provider`
//! authorization server (tests/authz) and a recording upstream; fault injection through a small
//! fake token endpoint.
//!
//! Run `npm ci --prefix tests/authz` once before (the README's test command does).

mod support;

mod cli;
mod core;
mod dev;
mod faults;
mod hostile;
mod limits;
mod ops;
mod props;
mod reliability;
mod routing;
mod shutdown;
mod streaming;
