//! stub

pub mod autoscale;

pub mod asl;
pub mod pipeline;
