//! deskgen: a desk photo in, an improved desk-setup image and shopping links out.
//!
//! A request enters through [`api`] (gRPC, grpc-web or REST on one listener), is parsed once into
//! the [`core`] model, becomes a task in [`tasks`], and a worker runs it through [`pipeline`],
//! which uses the models in [`inference`]. [`core`] knows no transport, queue or command line.

pub mod api;
pub mod commands;
pub mod config;
pub mod core;
pub mod eval;
pub mod fetch;
pub mod hub;
pub mod inference;
pub mod intake;
pub mod pipeline;
pub mod server;
pub mod shopping;
pub mod storage;
pub mod tasks;
pub mod telemetry;
pub mod webhook;
