//! Integration tests: the sidecar in-process on loopback, against the real `oidc-provider`
//! authorization server (tests/authz) and a recording upstream; fault injection through a small
//! fake token endpoint.
//!
//! The authorization server's npm packages (`npm ci --prefix tests/authz`) are installed by the
//! first test that needs them when missing (support::authz); without npm the run stops at once
//! with one line naming the command.
//!
//! Property tests of configuration text are here (props_config); those of the token response
//! parser, backoff, the refresh schedule and routing sit next to their code (src/token/props.rs,
//! src/proxy/props.rs).

mod support;

mod admin;
mod cli;
mod clients;
mod core;
mod dev;
mod dev_layering;
mod discovery;
mod evictions;
mod faults;
mod federated;
mod hostile;
mod hosts;
mod limits;
mod mtls;
mod ops;
mod paths;
mod props_config;
mod reliability;
mod routing;
mod runtime;
mod shutdown;
mod streaming;
mod targets;
mod token_endpoint;
