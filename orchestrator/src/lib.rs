//! stub

pub mod autoscale;
